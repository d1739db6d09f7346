"""``StepTimer``'s CUDA peak memory covers every timed step, though ``StepMeter`` resets the
device's peak counter at each logging window (the allocator's counters faked on CPU)."""

import torch

from conure_dist.train.profile import StepMeter, StepTimer


class FakeAllocator:
    """``max_memory_allocated`` and ``reset_peak_memory_stats`` over a list of per-step peaks."""

    def __init__(self) -> None:
        self.peak = 0

    def step(self, allocated: int) -> None:
        self.peak = max(self.peak, allocated)

    def max_memory_allocated(self, device=None) -> int:
        return self.peak

    def reset_peak_memory_stats(self, device=None) -> None:
        self.peak = 0


def test_the_timed_peak_spans_every_logging_window(monkeypatch):
    fake = FakeAllocator()
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", fake.max_memory_allocated)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", fake.reset_peak_memory_stats)
    cuda = torch.device("cuda", 0)
    timer, meter = StepTimer(cuda, warmup=1), StepMeter(8, cuda)
    # Step 1 is warm-up (its 900 is left out); the largest timed step (700) is in the first window.
    windows = []
    for step, allocated in enumerate([900, 500, 700, 300, 200], start=1):
        fake.step(allocated)
        timer.end_step()
        if step % 2 == 0:  # train.log_every = 2: the meter reports and resets the counter
            windows.append(meter.report(1e-3)["gpu_memory_gb"] * 1e9)
    assert windows == [500, 700]  # the timer's reset after warm-up cleared step 1's 900
    assert timer.steps == 4
    assert timer.report(8, 1)["peak_memory_bytes"] == 700
