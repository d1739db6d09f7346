"""Throughput, memory, loading and communication of the TTL-sized model: plain path vs fast path.

    python benchmarks/run.py --device cpu  --json benchmarks/results/cpu.json
    python benchmarks/run.py --device cuda --json benchmarks/results/<card>.json

On CUDA the model has the paper's TTL sizes (646K T1 items, 16 conv layers of 256 channels,
sequences of 100, T2 over 18K items) in bf16; on CPU the same code runs a scaled-down model in
fp32 (``--items``, ``--channels``, batches; see ``PRESETS``). Each figure is taken through the
training engine the runs use (masked views, Adam, L2), after warm-up steps:

* ``t1_seq_per_s`` / ``_plain``: T1 steps (sampled softmax over 20% of the items, every position).
* ``later_seq_per_s`` / ``_plain``: a later task's steps (T1 pruned, masked backbone, frozen
  embedding, BPR on the last position).
* ``eval_users_per_s`` / ``_plain``: exact rank of each user's next item among all T1 items.
* ``peak_mem_gb``: peak GPU memory of the fast T1 step (CUDA), or the process's peak RSS (CPU).
  On CPU, ``t1_step_*_rss_gb_{plain,fast}`` also give one T1 step's memory at the paper's model
  sizes (646K items, 256 channels, batch 32), each path in a fresh process.
* ``loader_seq_per_s_per_core``: sequences decoded from local shards by ``iter_batches`` per
  second of CPU time of the one loading process.
* ``t1_comm_bytes_per_step``: bytes one rank contributes per T1 step for the item tables
  (embedding and softmax) with the row-sparse exchange, on 2 CPU processes (gloo) at the paper's
  T1 batch of 32; ``t1_dense_allreduce_bytes``: a dense all-reduce of the same tables.

The plain path is ``ConureModel(fast=False)``: full hidden states for every task and
materialized sampled-softmax logits, eager. The fast path is also compiled where ``--compile``
says (default: on CUDA, as runs do with ``dist.compile: auto``); ``*_warmup_s`` are the warm-up
steps' seconds, compilation included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from conure_dist import compiled
from conure_dist.continual.ownership import TaskOwnership
from conure_dist.continual.views import MaskedModel
from conure_dist.data.manifest import Manifest
from conure_dist.data.stream import iter_batches
from conure_dist.dist import DistInfo
from conure_dist.model import ConureModel, TaskSpec
from conure_dist.train.engine import TorchEngine
from conure_dist.train.loss import autocast_context
from conure_dist.train.metrics import target_ranks
from conure_dist.train.phase import phase_parameters
from conure_dist.train.samplers import SharedNegativeSampler


@dataclass
class Sizes:
    items: int
    later_items: int
    channels: int
    dilations: list[int]
    seq_len: int
    t1_batch: int
    later_batch: int
    eval_batch: int
    precision: str
    steps: int


PRESETS = {
    "cuda": Sizes(646_000, 18_000, 256, [1, 4] * 4, 100, 256, 4096, 4096, "bf16", 30),
    "cpu": Sizes(64_600, 1_800, 64, [1, 4] * 4, 100, 32, 512, 512, "fp32", 10),
}
PAPER_T1_BATCH = 32
NEGATIVE_FRACTION = 0.2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(sizes: Sizes, fast: bool, device: torch.device, compile_on: bool = False) -> tuple[ConureModel, MaskedModel]:
    torch.manual_seed(0)
    specs = [TaskSpec("t1", "sequence", sizes.items), TaskSpec("later", "item", sizes.later_items)]
    model = ConureModel(sizes.items, specs, sizes.channels, 3, sizes.dilations, fast=fast).to(device)
    if compile_on:
        compiled.compile_model(model)
    names = model.prunable_names()
    ownership = TaskOwnership.empty({n: p.shape for n, p in model.named_parameters() if n in names})
    return model, MaskedModel(model, ownership)


def random_sequences(n: int, sizes: Sizes, g: torch.Generator) -> torch.Tensor:
    """Zipf-like item ids (popular items small), 1..items-1."""
    ranks = torch.rand(n, sizes.seq_len, generator=g).pow(3.0)
    return (ranks * (sizes.items - 1)).long().clamp(max=sizes.items - 2) + 1


def time_steps(
    step, steps: int, device: torch.device, warmup: int = 3, out: dict | None = None, key: str = ""
) -> float:
    """Seconds per step after ``warmup`` steps (whose time, compilation included, goes to
    ``out[key + "_warmup_s"]``)."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    if out is not None:
        out[f"{key}_warmup_s"] = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def bench_training(
    sizes: Sizes, fast: bool, device: torch.device, dist: DistInfo, compile_on: bool = False
) -> dict[str, float]:
    model, masked = build(sizes, fast, device, compile_on)
    g = torch.Generator().manual_seed(1)
    sampler = SharedNegativeSampler(sizes.items, NEGATIVE_FRACTION)
    out: dict[str, float] = {}

    masked.set_view("train", 1)
    engine = TorchEngine(masked, phase_parameters(model, "t1", True), 1e-3, 0.02, dist, sizes.precision)
    seq = random_sequences(sizes.t1_batch, sizes, g).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_steps(
        lambda: engine.train_step([(seq, "t1", None, sampler.sample(g).to(device))]),
        sizes.steps,
        device,
        out=out,
        key="t1",
    )
    out["t1_seq_per_s"] = sizes.t1_batch / seconds
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30

    ownership = masked.ownership
    weights = dict(model.named_parameters())
    ownership.prune(1, {n: weights[n] for n in ownership.names}, 0.7)
    masked.set_view("train", 2)
    engine = TorchEngine(masked, phase_parameters(model, "later", False), 1e-4, 0.02, dist, sizes.precision)
    seq = random_sequences(sizes.later_batch, sizes, g).to(device)
    target = torch.randint(0, sizes.later_items, (sizes.later_batch,), generator=g).to(device)
    negative = torch.randint(0, sizes.later_items, (sizes.later_batch,), generator=g).to(device)
    seconds = time_steps(
        lambda: engine.train_step([(seq, "later", target, negative)]), sizes.steps, device, out=out, key="later"
    )
    out["later_seq_per_s"] = sizes.later_batch / seconds

    masked.set_view("infer", 1)
    masked.eval()
    seq = random_sequences(sizes.eval_batch, sizes, g).to(device)

    @torch.no_grad()
    def evaluate() -> None:
        with autocast_context(device, sizes.precision):
            scores = masked(seq, "t1")
        target_ranks(scores, seq[:, -1]).sum().item()

    out["eval_users_per_s"] = sizes.eval_batch / time_steps(
        evaluate, max(3, sizes.steps // 3), device, warmup=2, out=out, key="eval"
    )
    return out


def bench_plain(sizes: Sizes, device: torch.device, dist: DistInfo, report: dict) -> dict[str, float]:
    """The plain path's figures; ``{}`` (and ``plain_error`` in the report) when they do not fit on
    the GPU: the plain T1 step holds every sampled logit of the batch at once."""
    try:
        return bench_training(sizes, False, device, dist)
    except torch.cuda.OutOfMemoryError as error:
        report["plain_error"] = str(error).splitlines()[0]
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    return {}


def probe_t1_memory(sizes: Sizes, fast: bool) -> dict[str, float]:
    """One T1 step on CPU; peak RSS above what the model and optimizer state hold (own process)."""
    import gc

    device, dist = torch.device("cpu"), DistInfo(0, 1, 0, torch.device("cpu"), None)
    model, masked = build(sizes, fast, device)
    masked.set_view("train", 1)
    engine = TorchEngine(masked, phase_parameters(model, "t1", True), 1e-3, 0.02, dist, "fp32")
    g = torch.Generator().manual_seed(1)
    sampler = SharedNegativeSampler(sizes.items, NEGATIVE_FRACTION)
    seq = random_sequences(sizes.t1_batch, sizes, g)
    engine.train_step([(seq, "t1", None, sampler.sample(g))])  # creates Adam's state
    gc.collect()
    with open("/proc/self/statm") as f:
        resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    engine.train_step([(seq, "t1", None, sampler.sample(g))])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"steady_gb": resident / 2**30, "peak_gb": peak / 2**30}


def bench_t1_memory(sizes: Sizes) -> dict[str, float]:
    """Peak memory of a T1 step, plain vs fast, each in a fresh process (CPU RSS)."""
    import subprocess

    out = {}
    for path in ("plain", "fast"):
        cmd = [
            sys.executable,
            __file__,
            "--probe-t1-memory",
            path,
            "--items",
            str(sizes.items),
            "--channels",
            str(sizes.channels),
            "--t1-batch",
            str(sizes.t1_batch),
        ]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        out[f"t1_step_peak_rss_gb_{path}"] = result["peak_gb"]
        out[f"t1_step_extra_rss_gb_{path}"] = result["peak_gb"] - result["steady_gb"]
    out["t1_memory_probe"] = {"items": sizes.items, "channels": sizes.channels, "t1_batch": sizes.t1_batch}
    return out


def bench_loader(num_sequences: int, seq_len: int, items: int) -> dict[str, float]:
    """Write ``num_sequences`` T1 sequences as shards, then read the train split once."""
    from data_tools.shards import TaskData, write_dataset

    rng = np.random.default_rng(0)
    seqs = rng.integers(1, items, size=(num_sequences, seq_len), dtype=np.int32)
    with tempfile.TemporaryDirectory() as root:
        t1 = TaskData("t1", "sequence", seqs, np.arange(num_sequences, dtype=np.int64), None, num_items=items)
        write_dataset(
            root,
            dataset="bench",
            t1_seqs=seqs,
            tasks=[t1],
            seed=0,
            source={},
            skipped_rows={},
            instances_per_shard=100_000,
        )
        manifest = Manifest.load(root)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        cpu, wall, count = time.process_time(), time.perf_counter(), 0
        for batch in iter_batches(manifest, "t1", "train", 1024, shuffle=True, seed=0, epoch=0):
            count += batch.seq.shape[0]
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        torch.set_num_threads(threads)
    return {"loader_seq_per_s_per_core": count / cpu, "loader_seq_per_s_wall": count / wall, "loader_sequences": count}


def _comm_worker(rank: int, init: str, sizes: Sizes, steps: int, results: dict) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        dist = DistInfo(rank, 2, rank, torch.device("cpu"), "gloo")
        model, masked = build(sizes, True, dist.device)
        masked.set_view("train", 1)
        engine = TorchEngine(
            masked,
            phase_parameters(model, "t1", True),
            1e-3,
            0.02,
            dist,
            "fp32",
            row_sparse=[f"model.{n}" for n in model.item_table_names()],
        )
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own sequences
        shared = torch.Generator().manual_seed(7)  # negatives shared by the global batch
        sampler = SharedNegativeSampler(sizes.items, NEGATIVE_FRACTION)
        sent = []
        for _ in range(steps):
            seq = random_sequences(PAPER_T1_BATCH // 2, sizes, g)
            engine.train_step([(seq, "t1", None, sampler.sample(shared))])
            sent.append(engine.sparse.bytes_last_step)
        results[rank] = {
            "t1_comm_bytes_per_step": float(np.mean(sent)),
            "t1_dense_allreduce_bytes": engine.sparse.dense_bytes(),
        }
    finally:
        tdist.destroy_process_group()


def bench_comm(sizes: Sizes, steps: int = 5) -> dict[str, float]:
    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_comm_worker, args=(f"file://{tmp}/store", sizes, steps, results), nprocs=2, join=True)
    out = dict(results[0])
    out["t1_comm_fraction_of_dense"] = out["t1_comm_bytes_per_step"] / out["t1_dense_allreduce_bytes"]
    out["comm_items"], out["comm_channels"], out["comm_global_batch"] = sizes.items, sizes.channels, PAPER_T1_BATCH
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--items", type=int, help="T1 vocabulary (default: the device preset)")
    parser.add_argument("--channels", type=int)
    parser.add_argument("--t1-batch", type=int)
    parser.add_argument("--later-batch", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--precision", choices=["fp32", "bf16"])
    parser.add_argument(
        "--compile",
        choices=["auto", "always", "never"],
        default="auto",
        help="torch.compile on the fast path, as dist.compile (auto: on CUDA only)",
    )
    parser.add_argument("--loader-sequences", type=int, default=200_000)
    parser.add_argument("--comm-items", type=int, help="T1 vocabulary of the 2-process communication run")
    parser.add_argument(
        "--memory-items",
        type=int,
        default=646_000,
        help="CPU: T1 vocabulary of the plain-vs-fast T1 memory probe (paper size)",
    )
    parser.add_argument(
        "--memory-channels",
        type=int,
        default=PRESETS["cuda"].channels,
        help="CPU: channels of the T1 memory probe (paper size)",
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["loader", "comm", "memory"])
    parser.add_argument("--probe-t1-memory", choices=["plain", "fast"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    sizes = Sizes(**PRESETS[args.device].__dict__)
    for key in ("items", "channels", "t1_batch", "later_batch", "steps", "precision"):
        if getattr(args, key) is not None:
            setattr(sizes, key, getattr(args, key))
    if args.probe_t1_memory:
        print(json.dumps(probe_t1_memory(sizes, args.probe_t1_memory == "fast")))
        return
    device = torch.device(args.device)
    dist = DistInfo(0, 1, 0, device, None)
    report: dict = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "sizes": sizes.__dict__.copy(),
    }
    plain = bench_plain(sizes, device, dist, report)
    report["compile"] = compiled.resolve(args.compile, device)
    fast = bench_training(sizes, True, device, dist, report["compile"])
    report.update(fast)
    for key, value in plain.items():
        report[f"{key}_plain"] = value
    for key in ("t1_seq_per_s", "later_seq_per_s", "eval_users_per_s"):
        if key in plain:
            report[f"{key}_speedup"] = fast[key] / plain[key]
    if device.type == "cpu":
        report["peak_mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if device.type == "cpu" and "memory" not in args.skip:
        report.update(
            bench_t1_memory(
                Sizes(
                    **{
                        **PRESETS["cuda"].__dict__,
                        "items": args.memory_items,
                        "channels": args.memory_channels,
                        "t1_batch": PAPER_T1_BATCH,
                    }
                )
            )
        )
    if "loader" not in args.skip:
        report.update(bench_loader(args.loader_sequences, sizes.seq_len, sizes.items))
    if "comm" not in args.skip:
        comm_sizes = Sizes(**{**PRESETS["cpu"].__dict__, "items": args.comm_items or PRESETS["cpu"].items})
        report.update(bench_comm(comm_sizes))
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
