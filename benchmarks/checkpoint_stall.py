"""How long a checkpoint stops training: ``Checkpointer.save`` with synchronous vs asynchronous writes.

    python benchmarks/checkpoint_stall.py --device cpu --items 64600,646000 --channels 64,64 \\
        --json benchmarks/results/checkpoint_stall_cpu.json
    python benchmarks/checkpoint_stall.py --device cuda --items 646000 --channels 256 \\
        --json benchmarks/results/checkpoint_stall_<card>.json

The checkpoint is the one a T1 phase writes mid-phase (``ContinualLoop.checkpoint_phase``): the
model (NextItNet backbone, T1's embedding and sampled-softmax tables of ``--items`` rows), its
ownership records, ``meta.json``, ``phase.pt`` (RNG state and a copy of every trained parameter,
as the best epoch's) and the Adam state (both moments of every parameter, after one step). Per
size and mode, ``--repeats`` checkpoints are written under ``--out`` (default: a temporary local
folder), each after the previous one is done:

* ``save_s``: how long ``save`` blocks the caller, i.e. how long training stops;
* ``total_s``: from ``save`` until the checkpoint is committed (``wait()`` returned);
* ``first_save_s``: the first checkpoint's ``save_s`` (asynchronous writes reuse the host
  buffers of the previous snapshot afterwards; the medians are over the later runs);
* ``compute_s_alone`` / ``compute_s_during_write``: ``--compute-steps`` matrix products of a
  stand-in training step run alone, and right after an asynchronous ``save`` returned, in one
  more checkpoint (the writer thread shares the cores, which matters on a CPU);
* ``snapshot_ok``: every parameter changed right after an asynchronous ``save`` returned, the
  committed checkpoint holds the values from before.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import fsspec
import torch
from bench_report import emit, environment

from conure_dist.checkpoint.checkpointer import Checkpointer
from conure_dist.checkpoint.format import load_checkpoint
from conure_dist.continual.ownership import TaskOwnership
from conure_dist.dist import DistInfo
from conure_dist.fs import join
from conure_dist.model import ConureModel, TaskSpec


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--items", default="64600", help="T1 items per size, comma-separated")
    p.add_argument("--channels", default="64", help="channels per size, comma-separated (as many as --items)")
    p.add_argument("--dilations", default="1,2,4,8", help="one stack of block dilations")
    p.add_argument("--stacks", type=int, default=4, help="how many times the dilation stack repeats")
    p.add_argument("--repeats", type=int, default=3, help="checkpoints per size and mode")
    p.add_argument("--compute-steps", type=int, default=20, help="stand-in training steps timed during a write")
    p.add_argument("--out", default=None, help="where checkpoints go (any fsspec URL; default: a temporary folder)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)
    if len(args.items.split(",")) != len(args.channels.split(",")):
        p.error(f"--items ({args.items}) and --channels ({args.channels}) need as many values")
    return args


class _Adam:
    """The optimizer part as an engine saves it (``{"optimizer": ...}``)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}


def build(items: int, channels: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """A T1 mid-phase checkpoint's parts, the Adam moments filled by one step on random gradients."""
    dilations = [int(d) for d in args.dilations.split(",")] * args.stacks
    model = ConureModel(items, [TaskSpec("t1", "sequence", items)], channels, 3, dilations).to(device)
    params = dict(model.named_parameters())
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    for p in params.values():
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ownership = TaskOwnership.empty({n: params[n].shape for n in model.prunable_names()})
    best = {n: p.detach().clone() for n, p in params.items()}
    return {
        "model.pt": model,
        "ownership.pt": ownership,
        "meta.json": {"items": items, "channels": channels},
        "phase.pt": {"generator": torch.Generator().get_state(), "best": best},
        "optimizer.pt": _Adam(optimizer),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compute(steps: int, work: torch.Tensor) -> float:
    """Seconds for ``steps`` products of ``work`` with itself: a stand-in training step."""
    _sync(work.device)
    start = time.perf_counter()
    for _ in range(steps):
        work = (work @ work).tanh_()
    _sync(work.device)
    return time.perf_counter() - start


def measure(
    parts: dict[str, Any],
    async_writes: bool,
    out: str,
    args: argparse.Namespace,
    device: torch.device,
    work: torch.Tensor,
) -> dict[str, Any]:
    """``--repeats`` checkpoints, each committed before the next; in asynchronous mode the
    stand-in training runs while the last one is written."""
    dist = DistInfo(0, 1, 0, device, None)
    ckpt = Checkpointer(out, dist, keep=2, async_writes=async_writes)
    saves, totals = [], []
    for index in range(1, args.repeats + 1):
        _sync(device)
        start = time.perf_counter()
        ckpt.write(index, "t1-train-e1-s1", parts, {})
        saves.append(time.perf_counter() - start)
        ckpt.wait()
        totals.append(time.perf_counter() - start)
    path = ckpt.committed()[-1]
    nbytes = sum(ckpt.fs.size(f) for f in ckpt.fs.ls(path, detail=False))
    later = slice(1, None) if args.repeats > 1 else slice(None)
    result = {
        "save_s": statistics.median(saves[later]),
        "total_s": statistics.median(totals[later]),
        "first_save_s": saves[0],
        "save_runs_s": saves,
        "total_runs_s": totals,
        "checkpoint_bytes": nbytes,
    }
    if async_writes:  # one more checkpoint, the stand-in training running while it is written
        ckpt.write(args.repeats + 1, "t1-train-e1-s1", parts, {})
        result["compute_s_during_write"] = compute(args.compute_steps, work)
        ckpt.wait()
    return result


def snapshot_ok(parts: dict[str, Any], out: str, device: torch.device) -> bool:
    """Change every parameter right after an asynchronous ``save``: the checkpoint keeps the old values."""
    model = parts["model.pt"]
    before = {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()}
    ckpt = Checkpointer(out, DistInfo(0, 1, 0, device, None), keep=1, async_writes=True)
    path = ckpt.write(ckpt.last_index() + 1, "snapshot-check", parts, {})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ckpt.wait()
    saved = load_checkpoint(path, fs=ckpt.fs).model
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(1.0)
    return saved.keys() == before.keys() and all(torch.equal(saved[n], t) for n, t in before.items())


def run_size(items: int, channels: int, args: argparse.Namespace, device: torch.device, out: str) -> dict[str, Any]:
    parts = build(items, channels, args, device)
    work = torch.randn(512, 512, device=device) / 512**0.5
    compute(2, work)  # warm-up
    alone = compute(args.compute_steps, work)
    modes = {}
    for mode, async_writes in (("sync", False), ("async", True)):
        modes[mode] = measure(parts, async_writes, join(out, f"{items}x{channels}-{mode}"), args, device, work)
    model = parts["model.pt"]
    return {
        "items": items,
        "channels": channels,
        "parameters": sum(p.numel() for p in model.parameters()),
        "compute_s_alone": alone,
        **modes,
        "stall_reduction": modes["sync"]["save_s"] / modes["async"]["save_s"],
        "snapshot_ok": snapshot_ok(parts, join(out, f"{items}x{channels}-check"), device),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    out = args.out or tempfile.mkdtemp(prefix="checkpoint-stall-")
    report = {
        **environment("benchmarks/checkpoint_stall.py", argv, args.device),
        "out": "temporary local folder" if args.out is None else args.out,
        "filesystem": type(fsspec.core.url_to_fs(out)[0]).__name__,
        "dilations": [int(d) for d in args.dilations.split(",")] * args.stacks,
        "repeats": args.repeats,
        "load_average_before": os.getloadavg(),
    }
    try:
        report["results"] = [
            run_size(int(i), int(c), args, device, out)
            for i, c in zip(args.items.split(","), args.channels.split(","), strict=True)
        ]
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    report["load_average_after"] = os.getloadavg()
    emit(report, args.json)
    return report


if __name__ == "__main__":
    main()
