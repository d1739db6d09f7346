"""The positions a last-position state depends on, and the GEMM inputs of a causal conv at
chosen positions: the geometry that ``MultiTaskScorer`` computes with (see ``multitask``)."""

from __future__ import annotations

import math

import torch

from conure_dist.model.backbone import NextItNet
from conure_dist.model.conure_model import ConureModel

Span = tuple[int, int]
"""Positions ``(count, step)``: the last position and the ``count - 1`` before it, ``step`` apart."""


def conv_input_span(out: Span, kernel_size: int, dilation: int, length: int) -> Span:
    """The positions a causal conv reads to produce the positions ``out`` of a length-``length``
    sequence (positions before 0 are its zero padding and need nothing)."""
    count, step = out
    spacing = math.gcd(step, dilation) if count > 1 else dilation
    reach = step * (count - 1) + dilation * (kernel_size - 1)
    return min(reach // spacing + 1, (length - 1) // spacing + 1), spacing


def last_position_spans(backbone: NextItNet, length: int, depth: int | None = None) -> list[tuple[Span, Span, Span]]:
    """Per block (of the first ``depth``) the (input, conv1 output, output) positions the last
    position's state depends on: like ``NextItNet.last_position_windows``, without the positions
    in between that the dilations skip (the residual reads the output positions, which the input
    ones include)."""
    out, spans = (1, 1), []
    for block in reversed(backbone.blocks if depth is None else backbone.blocks[:depth]):
        mid = conv_input_span(out, block.conv2.kernel_size, block.conv2.dilation, length)
        spans.append((conv_input_span(mid, block.conv1.kernel_size, block.conv1.dilation, length), mid, out))
        out = spans[-1][0]
    return spans[::-1]


def model_spans(model: ConureModel, length: int, depth: int) -> list[tuple[Span, Span, Span]]:
    """The contiguous windows the model itself computes for a task running ``depth`` blocks: the
    fast path's receptive windows of the last position, or every position on the plain path."""
    if model.fast:
        return [((n, 1), (mid, 1), (out, 1)) for n, mid, out in model.backbone.last_position_windows(length, depth)]
    return [((length, 1),) * 3] * depth


def trim_span(span: Span, start: int, length: int) -> Span:
    """The positions of ``span`` at or after ``start`` (at least the last one)."""
    count, step = span
    return span if count == 1 else (min(count, (length - 1 - start) // step + 1), step)


def _ceil_div(a: int, b: int) -> int:
    return max(0, -(-a // b))


def shifted_input(
    src: torch.Tensor,
    src_span: Span,
    out_span: Span,
    kernel_size: int,
    dilation: int,
    out: torch.Tensor,
    length: int,
    left: torch.Tensor | None = None,
) -> torch.Tensor:
    """``CausalConv1d``'s GEMM input for the positions ``out_span`` of a length-``length``
    sequence, written into ``out`` ``[G, R, count, K*C]``: tap ``i`` of an output position reads
    the input ``(K-1-i)*d`` positions before it, from ``src`` ``[G, R, n, C]`` (holding
    ``src_span``), before that from ``left`` ``[G, length, C]`` (the same for every row), and
    before position 0 (or without ``left``) zero, as the per-task path's ``F.pad`` makes it."""
    (n, src_step), (count, step) = src_span, out_span
    step = step if count > 1 else 1
    stride = step // src_step if count > 1 else 1
    channels, src_first = src.shape[-1], length - 1 - src_step * (n - 1)
    for i in range(kernel_size):
        pos = length - 1 - step * (count - 1) - (kernel_size - 1 - i) * dilation  # output 0's tap
        below = min(count, _ceil_div(src_first - pos, step))  # taps before what src holds
        zeros = below if left is None else min(below, _ceil_div(-pos, step))
        tap = out[..., i * channels : (i + 1) * channels]
        if zeros:
            tap[:, :, :zeros].zero_()
        if zeros < below:
            tap[:, :, zeros:below].copy_(left[:, None, pos + zeros * step : pos + (below - 1) * step + 1 : step])
        if below < count:
            first = (pos + below * step - src_first) // src_step
            tap[:, :, below:].copy_(src[:, :, first : first + (count - 1 - below) * stride + 1 : stride])
    return out


def held_positions(x: torch.Tensor, x_span: Span, span: Span) -> torch.Tensor:
    """The positions ``span`` of ``x`` ``[..., n, C]`` holding ``x_span`` (all held there)."""
    (n, x_step), (count, step) = x_span, span
    stride = step // x_step if count > 1 else 1
    return x[..., n - 1 - (count - 1) * stride : n : stride, :]
