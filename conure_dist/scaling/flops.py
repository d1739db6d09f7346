"""Model FLOPs of a training sequence and the cards' peaks: the model FLOP utilisation (MFU)
that ``train.step_timing`` reports where the card is known."""

from __future__ import annotations

from conure_dist.config import RunConfig

PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H100": {"bf16": 989.4e12, "fp32": 66.9e12},
    "H200": {"bf16": 989.4e12, "fp32": 66.9e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
}
"""Dense peak FLOP/s per card (SXM, no sparsity) by precision; fp32 is the non-tensor-core rate."""


def peak_flops(device_name: str, precision: str) -> float | None:
    """The card's peak for ``precision``, or None where it is not known (CPUs, other cards)."""
    for card, peaks in PEAK_FLOPS.items():
        if card in device_name:
            return peaks[precision]
    return None


def train_flops_per_sequence(cfg: RunConfig, kind: str, seq_len: int, num_outputs: int, negatives: int) -> float:
    """Model FLOPs of one training sequence (backward counted as twice the forward): the causal
    convolutions over the positions a task reads (T1: every position; later tasks: the last
    position's receptive field) and the head (T1: target plus shared negatives per position;
    item tasks: target and one negative; class tasks: every class)."""
    m = cfg.model
    conv = 2 * m.kernel_size * m.channels * m.channels  # one conv, one position
    if kind == "sequence":
        positions = seq_len - 1
        head = positions * 2 * m.channels * (1 + negatives)
    else:
        reach = 1 + sum((m.kernel_size - 1) * 3 * d for d in m.block_dilations)
        positions = min(seq_len, reach)
        head = 2 * m.channels * (2 if kind == "item" else num_outputs)
    return 3.0 * (positions * len(m.block_dilations) * 2 * conv + head)
