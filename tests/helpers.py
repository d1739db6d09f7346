"""Shared helpers for the end-to-end and multi-process tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, tasks, name: str = "c.yaml", data_root: str | None = None, **sections) -> Path:
    """A config that trains in seconds: 400 synthetic users, 16 channels, one epoch per phase."""
    cfg = {
        "seed": 3,
        "data": {
            "root": data_root or str(tmp_path / "data"),
            "source": "synthetic",
            "instances_per_shard": 150,
            "synthetic": {"num_users": 400, "num_items": 60, "seq_len": 10, "seed": 1},
        },
        "model": {"channels": 16, "block_dilations": [1, 2]},
        "train": {"progress": False, "eval_batch_size": 256, "keep_checkpoints": 50},
        "tasks": [
            {"name": n, "epochs": 1, "retrain_epochs": 1, "lr": 3e-3, "batch_size": 32, "prune_ratio": r}
            for n, r in tasks
        ],
    }
    for section, values in sections.items():
        cfg[section].update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def with_shards(cfg):
    """``cfg`` (a ``RunConfig``) once the shards it names exist: built as ``conure run`` builds them
    on first use (the library only reads shards)."""
    import torch

    from conure_dist.dist import DistInfo
    from data_tools.prepare import build_missing_shards

    build_missing_shards(cfg.data, DistInfo(0, 1, 0, torch.device("cpu"), None))
    return cfg


def run_conure(cfg, out: str, dist, resume: bool = False, force: bool = False) -> dict:
    """The library's ``run_conure`` after building missing shards, as ``conure run`` does."""
    from conure_dist.train.loop import run_conure as run

    return run(with_shards(cfg), out, dist, resume=resume, force=force)


def run_method(cfg, out: str, dist, resume: bool = False) -> dict:
    """The library's ``run_method`` after building missing shards, as ``conure run`` does."""
    from conure_dist.methods.run import run_method as run

    return run(with_shards(cfg), out, dist, resume=resume)


def build_context(cfg, out: str | None, dist):
    """The library's ``build_context`` after building missing shards, as ``conure run`` does."""
    from conure_dist.train.context import build_context as build

    return build(with_shards(cfg), out, dist)


def conure(
    *args: str, nproc: int = 1, max_restarts: int = 0, timeout: float = 900, popen: bool = False, cwd: Path = REPO
) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run the real CLI: ``python -m conure_dist`` or, with nproc > 1, under torchrun."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "conure_dist", *args]
    if nproc > 1 or max_restarts:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            "--max-restarts",
            str(max_restarts),
            "-m",
            "conure_dist",
            *args,
        ]
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def cli(*args: str, threads: int | None = 1) -> str:
    """The CLI's ``main`` in this process, and what it printed: the code ``conure`` runs, without
    starting an interpreter (importing torch takes seconds), for single-process commands. With
    ``threads`` torch threads (default 1, as ``conure`` gives its processes, so results equal
    theirs and torchrun workers' bit for bit; None: this process's count), restored after;
    ``train.num_threads`` still sets a run's own. What ``train.deterministic`` switches in torch
    (deterministic algorithms, no NaN fill of empty tensors) is restored too, so no later test
    inherits it."""
    import contextlib
    import io

    import torch

    from conure_dist.cli import main

    before, printed = torch.get_num_threads(), io.StringIO()
    deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with contextlib.redirect_stdout(printed):
            code = main(list(args))
    finally:
        torch.set_num_threads(before)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.utils.deterministic.fill_uninitialized_memory = deterministic[2]
    assert code == 0, f"conure {' '.join(args)} exited with {code} (its error is in the captured stderr)"
    return printed.getvalue()


def cli_on(nproc: int, *args: str) -> str:
    """A command on ``nproc`` processes, and what it printed: ``cli`` for one, ``conure`` under
    torchrun for more."""
    return cli(*args) if nproc == 1 else conure(*args, nproc=nproc).stdout


def shards_digest(manifest) -> str:
    """sha256 over a dataset's shard digests in manifest order: equal exactly when the shards are."""
    import hashlib

    digest = hashlib.sha256()
    for task in manifest.tasks:
        for split in ("train", "valid", "test"):
            for shard in task.splits[split].shards:
                digest.update(shard.sha256.encode())
    return digest.hexdigest()


def collect_scores(model, manifest, task, split: str, batch_size: int, device):
    """All scores (logits) of a split in manifest order, on one process: for no-forgetting checks."""
    import torch

    from conure_dist.data.stream import iter_batches

    model.eval()
    with torch.no_grad():
        out = [
            model(b.seq.to(device), task.name).float().cpu()
            for b in iter_batches(manifest, task.name, split, batch_size, shuffle=False, seed=0, epoch=0)
        ]
    return torch.cat(out)
