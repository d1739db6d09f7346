"""Per-step figures of a training phase (``StepMeter``) and the torch profiler over a range of
optimizer steps (``StepProfiler``, ``train.profile_steps``)."""

from __future__ import annotations

import os
import time
from typing import Any

import fsspec
import torch

from conure_dist.fs import join


class StepMeter:
    """Training loss, sequences per second and peak GPU memory over the steps since the last
    report (``train.log_every`` steps)."""

    def __init__(self, global_batch: int, device: torch.device) -> None:
        self.global_batch, self.device = global_batch, device
        self._reset()

    def _reset(self) -> None:
        self.steps, self.loss_total, self.start = 0, 0.0, time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def add(self, losses: list[float]) -> None:
        self.steps += len(losses)
        self.loss_total += sum(losses)

    def report(self, lr: float) -> dict[str, Any]:
        """The window's figures, and a new window."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {
            "loss": self.loss_total / max(self.steps, 1),
            "sequences_per_s": self.steps * self.global_batch / elapsed,
            "lr": lr,
            "gpu_memory_gb": None,
        }
        if self.device.type == "cuda":
            out["gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        self._reset()
        return out


TIMED_PARTS = ("data_wait", "forward_backward", "communication", "optimizer")


class StepTimer:
    """Where a phase's steps spend their time (``train.step_timing``): waiting for the batch,
    forward and backward, gradient exchange, optimizer; and what they exchanged (``comm``).

    ``mark(part)`` adds the time since the previous mark to ``part``, after synchronising the
    device so that queued kernels count where they were launched. The first ``warmup`` steps are
    left out (compilation, allocator warm-up). DDP's bucket all-reduces run while backward still
    computes: their time (launch to completion, ``CommCounter.ddp_seconds``) moves from
    forward/backward to communication, so communication is an upper bound of what was exposed.
    """

    def __init__(self, device: torch.device, warmup: int) -> None:
        from conure_dist.train.comm_count import CommCounter

        self.device, self.warmup = device, warmup
        self.totals = dict.fromkeys(TIMED_PARTS, 0.0)
        self.comm = CommCounter()
        self.comm.active = warmup == 0
        self.seen = self.steps = 0
        # The largest CUDA allocation peak seen at the end of a timed step: ``StepMeter`` resets
        # the device's counter every ``train.log_every`` steps, so the counter alone would hold
        # only the last window.
        self.cuda_peak = 0
        self.last = time.perf_counter()

    @property
    def active(self) -> bool:
        return self.seen >= self.warmup

    def mark_start(self) -> None:
        """Start the clock (a phase's epoch begins: validation before it is not a step's)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last = time.perf_counter()

    def mark(self, part: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self.active:
            self.totals[part] += now - self.last
        self.last = now

    def end_step(self) -> None:
        self.seen += 1
        if self.seen > self.warmup:
            self.steps += 1
            if self.device.type == "cuda":
                self.cuda_peak = max(self.cuda_peak, torch.cuda.max_memory_allocated(self.device))
        elif self.seen == self.warmup:
            self.comm.ddp_seconds = 0.0
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
        self.comm.active = self.active

    def report(self, global_batch: int, world_size: int) -> dict[str, Any]:
        """Per-step means over the timed steps: seconds per part, payload bytes per exchange,
        sequences per second (global and per rank), peak memory."""
        steps = max(self.steps, 1)
        parts = {k: v / steps for k, v in self.totals.items()}
        ddp = min(self.comm.ddp_seconds / steps, parts["forward_backward"])
        parts["forward_backward"] -= ddp
        parts["communication"] += ddp
        step_s = sum(parts.values())
        if self.device.type == "cuda":
            peak = self.cuda_peak
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {
            "timed_steps": self.steps,
            "step_seconds": step_s,
            "seconds": parts,
            "sequences_per_s": global_batch / step_s if step_s else None,
            "sequences_per_s_per_rank": global_batch / world_size / step_s if step_s else None,
            "bytes_per_step": self.comm.per_step(self.steps),
            "peak_memory_bytes": peak,
            "peak_memory_kind": "cuda_allocated" if self.device.type == "cuda" else "process_max_rss",
        }


class StepProfiler:
    """``torch.profiler`` over the run's optimizer steps ``start`` .. ``stop - 1`` (counted over all
    phases). Each rank writes a Chrome trace (open in chrome://tracing or Perfetto) and a table of
    the most expensive operators under ``{out}/profile/``."""

    def __init__(self, start: int, stop: int, out: str, rank: int) -> None:
        self.start, self.stop, self.out, self.rank = start, stop, join(out, "profile"), rank
        self.profile: torch.profiler.profile | None = None
        self.written: list[str] = []

    def before_step(self, step: int) -> None:
        if step == self.start and self.profile is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profile = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profile.__enter__()

    def after_step(self, step: int) -> None:
        """``step`` is the index of the step just taken."""
        if self.profile is not None and step + 1 >= self.stop:
            self.profile.__exit__(None, None, None)
            self._write(self.profile)
            self.profile = None

    def _write(self, profile: torch.profiler.profile) -> None:
        name = f"steps{self.start}-{self.stop}-rank{self.rank}"
        local = f"/tmp/conure-trace-{os.getpid()}-{name}.json"
        profile.export_chrome_trace(local)
        table = profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        fs, root = fsspec.core.url_to_fs(self.out)
        fs.makedirs(root, exist_ok=True)
        fs.put_file(local, f"{root}/trace-{name}.json")
        os.remove(local)
        with fs.open(f"{root}/top-ops-{name}.txt", "w") as f:
            f.write(table + "\n")
        self.written = [f"{root}/trace-{name}.json", f"{root}/top-ops-{name}.txt"]
