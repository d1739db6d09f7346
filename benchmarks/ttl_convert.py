"""Memory and time of ``conure data ttl`` on synthetic files in the layout of the TTL release.

    python benchmarks/ttl_convert.py --users 150000,450000,1470000 --items 646000 \\
        --work /tmp/ttl_bench --json benchmarks/results/ttl_convert_cpu.json

For each ``--users`` count it writes, under ``--work``, the files ``conure data ttl`` reads (see
``data_tools/ttl.py``): ``pretrain.csv`` (one user per line, ``--seq-len`` comma-separated item
tokens out of ``--items``, Zipf-popular, left-padded with ``0``), ``clicks.csv`` (half of the
users, 1 to 3 targets out of 18,000 items; a tenth of the sources are pretraining rows shifted by
one item, new sequences) and
``age.csv`` (a third of the users, one of 8 labels). Then it runs the converter as a user would,
``conure data ttl --pretrain ... --task click=item:... --task age=class:... --out ...``, in its own
process under ``/usr/bin/time -v``, and records its wall time and peak resident memory, with the
input and output sizes. The files are deleted after each size unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np
from bench_report import emit, environment

CLICK_ITEMS, AGE_CLASSES, CHUNK_ROWS = 18_000, 8, 50_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", default="150000", help="T1 users per size, comma-separated")
    p.add_argument("--items", type=int, default=646_000, help="T1 item tokens")
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--work", required=True, help="a local folder for the files and shards")
    p.add_argument("--keep", action="store_true", help="keep each size's files and shards")
    p.add_argument("--json", default=None, help="also write the report here")
    return p.parse_args(argv)


def _rows(rng: np.random.Generator, n: int, items: int, seq_len: int) -> np.ndarray:
    """``n`` sequences of Zipf-popular item ids 1..items, each left-padded to ``seq_len``."""
    ranks = np.minimum(rng.zipf(1.2, size=(n, seq_len)), items)
    rows = rng.permutation(items)[ranks - 1] + 1  # popularity not in id order
    lengths = rng.integers(seq_len // 2, seq_len + 1, size=n)
    rows[np.arange(seq_len)[None, :] < (seq_len - lengths)[:, None]] = 0
    return rows


def _write_lines(path: str, lines: list[str]) -> None:
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


def write_files(folder: str, users: int, items: int, seq_len: int, seed: int = 0) -> dict[str, int]:
    """The three TTL files for ``users`` users; their sizes in bytes."""
    rng = np.random.default_rng(seed)
    paths = {name: os.path.join(folder, f"{name}.csv") for name in ("pretrain", "clicks", "age")}
    for first in range(0, users, CHUNK_ROWS):
        n = min(CHUNK_ROWS, users - first)
        rows = _rows(rng, n, items, seq_len)
        sources = [",".join(r) for r in rows.astype(str)]
        _write_lines(paths["pretrain"], sources)
        # A tenth of the click sources are new sequences of known items: a pretraining row with
        # its last item dropped (an input-only row of the T1 table).
        shifted = [",".join(r) for r in np.concatenate([np.zeros((n, 1), rows.dtype), rows[:, :-1]], 1).astype(str)]
        clicked = np.flatnonzero(rng.random(n) < 0.5)
        clicks = [
            (shifted[j] if rng.random() < 0.1 else sources[j])
            + ",,"
            + ",".join(map(str, rng.integers(0, CLICK_ITEMS, size=rng.integers(1, 4))))
            for j in clicked
        ]
        _write_lines(paths["clicks"], clicks)
        aged = np.flatnonzero(rng.random(n) < 1 / 3)
        _write_lines(paths["age"], [f"{sources[j]},,{rng.integers(AGE_CLASSES)}" for j in aged])
    return {name: os.path.getsize(path) for name, path in paths.items()}


def convert(folder: str) -> dict[str, Any]:
    """``conure data ttl`` on the files in ``folder``, in its own process: wall time, peak RSS."""
    out = os.path.join(folder, "shards")
    command = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "conure_dist",
        "data",
        "ttl",
        "--pretrain",
        os.path.join(folder, "pretrain.csv"),
        "--task",
        f"click=item:{os.path.join(folder, 'clicks.csv')}",
        "--task",
        f"age=class:{os.path.join(folder, 'age.csv')}",
        "--out",
        out,
    ]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"conure data ttl failed:\n{result.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    shard_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(peak_kb / 2**20, 3), "shard_bytes": shard_bytes}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report: dict[str, Any] = {**environment("benchmarks/ttl_convert.py", argv, "cpu"), "sizes": []}
    for users in (int(u) for u in args.users.split(",")):
        folder = os.path.join(args.work, f"users_{users}")
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        start = time.perf_counter()
        inputs = write_files(folder, users, args.items, args.seq_len)
        entry = {
            "users": users,
            "items": args.items,
            "seq_len": args.seq_len,
            "input_bytes": inputs,
            "write_inputs_s": round(time.perf_counter() - start, 1),
            **convert(folder),
        }
        print(entry, flush=True)
        report["sizes"].append(entry)
        if not args.keep:
            shutil.rmtree(folder)
    emit(report, args.json)
    return report


if __name__ == "__main__":
    main()
