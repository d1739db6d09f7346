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
