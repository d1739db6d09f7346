"""T1's sampled softmax as fused Triton kernels: the negatives' logits never reach memory.

Same function as ``conure_dist.model.chunked_softmax.negative_logsumexp``: per row n the
log-sum-exp of ``h_n . w_j + b_j`` over the negatives j that are not row n's target (an
accidental hit), fp32, with gradients for the hidden rows, the negatives' (gathered) weight
rows and biases. The chunked path writes each [rows, chunk] block of logits to memory and reads
it back several times; here each program multiplies a tile of rows by a tile of negatives in
registers, masks and reduces it at once (the log-sum-exp online, as flash attention does), and
the backward pass recomputes the tiles.

Three kernels, no atomics, so results are deterministic:

* forward: grid (row blocks, splits of the negatives); each program keeps a running max and sum
  per row over its tiles and writes one partial log-sum-exp; torch combines the splits.
* backward, hidden: the same grid; each program accumulates softmax @ weights for its rows.
* backward, weights and bias: grid (negative blocks, splits of the rows); each program
  computes the logits transposed ([negatives, rows], so that the softmax is the left operand
  as it is: a transpose in registers spilled) and accumulates softmax^T @ hidden and the
  softmax's column sums for its negatives.

The products run in the compute dtype (bf16 under autocast) with fp32 accumulation; unlike the
chunked path, the logits are not rounded to that dtype before the bias is added (more precise;
in fp32 the two agree to rounding). As in the chunked path, the softmax is narrowed to the
compute dtype before the two backward products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from conure_dist.kernels.common import (
    INTERPRETED,
    INTERPRETER_TILES,
    Tiles,
    block_channels,
    cast_for_dot,
    check_offsets,
    input_precision,
    launch_options,
    load_rows,
    num_splits,
    split_ranges,
    tl_dtype,
)
from conure_dist.kernels.dispatch import product_dtype

GPU_TILES = {
    "16-bit": {"forward": Tiles(128, 128, 8, 3), "hidden": Tiles(64, 32, 8, 2), "weight": Tiles(32, 64, 8, 2)},
    "fp32": {"forward": Tiles(32, 32, 8, 2), "hidden": Tiles(32, 32, 8, 2), "weight": Tiles(32, 32, 8, 2)},
}
"""Tile sizes (rows, negatives, warps, stages) per kernel on a GPU, for 256 channels (the
paper's): tiles that ptxas compiles for sm_90 without spilling registers (``python -m
conure_dist.kernels.aot``), in 16 bits the largest such with 64 rows or negatives on the
accumulator's side (Hopper's warp-group products need 64). fp32 (full-precision products, only
under ``kernel='triton'``) needs small tiles. Not yet timed on a GPU; ``benchmarks/kernels.py``
tries others (``tiles=``)."""


@triton.jit
def _load_negatives(
    w_ptr, b_ptr, neg_ptr, cols, S, C, BLOCK_C: tl.constexpr, DOT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr
):
    """A block of negatives: weight rows [cols, channels] in the product dtype, fp32 biases, ids."""
    ch = tl.arange(0, BLOCK_C)
    w = tl.load(w_ptr + cols[:, None] * C + ch[None, :], mask=(cols[:, None] < S) & (ch[None, :] < C), other=0.0)
    b = tl.load(b_ptr + cols, mask=cols < S, other=0.0).to(tl.float32)
    neg = tl.load(neg_ptr + cols, mask=cols < S, other=-1)
    return cast_for_dot(w, DOT_DTYPE, INTERPRET), b, neg


@triton.jit
def _masked_logits(h, tgt, w, b, neg, cols, S, PRECISION: tl.constexpr):
    """fp32 [rows, cols] logits plus bias; a row's own target and the padding columns at -inf."""
    x = tl.dot(h, tl.trans(w), input_precision=PRECISION, out_dtype=tl.float32) + b[None, :]
    hit = (neg[None, :] == tgt[:, None]) | (cols[None, :] >= S)
    return tl.where(hit, float("-inf"), x)


@triton.jit
def _forward_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    neg_ptr,
    tgt_ptr,
    out_ptr,
    N,
    S,
    C,
    num_tiles,
    tiles_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Partial log-sum-exp of one row block over one split of the negatives: out[split, rows]."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    h, tgt = load_rows(h_ptr, tgt_ptr, rows, N, C, BLOCK_C, DOT_DTYPE, INTERPRET)
    run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_N], tl.float32)
    for tile in range(split * tiles_per_split, tl.minimum((split + 1) * tiles_per_split, num_tiles)):
        cols = tile * BLOCK_S + tl.arange(0, BLOCK_S)
        w, b, neg = _load_negatives(w_ptr, b_ptr, neg_ptr, cols, S, C, BLOCK_C, DOT_DTYPE, INTERPRET)
        x = _masked_logits(h, tgt, w, b, neg, cols, S, PRECISION)
        new_max = tl.maximum(run_max, tl.max(x, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row masked so far: no nan
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        run_max = new_max
    lse = tl.where(run_sum > 0, run_max + tl.log(tl.where(run_sum > 0, run_sum, 1.0)), float("-inf"))
    tl.store(out_ptr + split * N + rows, lse, mask=rows < N)


@triton.jit
def _hidden_grad_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    neg_ptr,
    tgt_ptr,
    lse_ptr,
    scale_ptr,
    out_ptr,
    N,
    S,
    C,
    num_tiles,
    tiles_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Partial d loss / d hidden of one row block over one split: out[split, rows, channels]."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ch = tl.arange(0, BLOCK_C)
    h, tgt = load_rows(h_ptr, tgt_ptr, rows, N, C, BLOCK_C, DOT_DTYPE, INTERPRET)
    lse = tl.load(lse_ptr + rows, mask=rows < N, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=rows < N, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    for tile in range(split * tiles_per_split, tl.minimum((split + 1) * tiles_per_split, num_tiles)):
        cols = tile * BLOCK_S + tl.arange(0, BLOCK_S)
        w, b, neg = _load_negatives(w_ptr, b_ptr, neg_ptr, cols, S, C, BLOCK_C, DOT_DTYPE, INTERPRET)
        p = tl.exp(_masked_logits(h, tgt, w, b, neg, cols, S, PRECISION) - lse[:, None]) * scale[:, None]
        acc += tl.dot(cast_for_dot(p, DOT_DTYPE, INTERPRET), w, input_precision=PRECISION, out_dtype=tl.float32)
    out = out_ptr + (split * N + rows[:, None]) * C + ch[None, :]
    tl.store(out, acc, mask=(rows[:, None] < N) & (ch[None, :] < C))


@triton.jit
def _weight_grad_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    neg_ptr,
    tgt_ptr,
    lse_ptr,
    scale_ptr,
    dw_ptr,
    db_ptr,
    N,
    S,
    C,
    num_tiles,
    tiles_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Partial d loss / d weight rows and bias of one block of negatives over one split of the
    rows: dw[split, cols, channels], db[split, cols]."""
    split = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    ch = tl.arange(0, BLOCK_C)
    w, b, neg = _load_negatives(w_ptr, b_ptr, neg_ptr, cols, S, C, BLOCK_C, DOT_DTYPE, INTERPRET)
    acc_w = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    acc_b = tl.zeros([BLOCK_S], tl.float32)
    for tile in range(split * tiles_per_split, tl.minimum((split + 1) * tiles_per_split, num_tiles)):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        h, tgt = load_rows(h_ptr, tgt_ptr, rows, N, C, BLOCK_C, DOT_DTYPE, INTERPRET)
        lse = tl.load(lse_ptr + rows, mask=rows < N, other=0.0)
        scale = tl.load(scale_ptr + rows, mask=rows < N, other=0.0)
        # Transposed logits [cols, rows]: the softmax is then the left operand as it is.
        x_t = tl.dot(w, tl.trans(h), input_precision=PRECISION, out_dtype=tl.float32) + b[:, None]
        hit = (neg[:, None] == tgt[None, :]) | (cols[:, None] >= S)
        p_t = tl.exp(tl.where(hit, float("-inf"), x_t) - lse[None, :]) * scale[None, :]
        p_t = tl.where(rows[None, :] < N, p_t, 0.0)  # padding rows add nothing (not even inf * 0)
        acc_w += tl.dot(cast_for_dot(p_t, DOT_DTYPE, INTERPRET), h, input_precision=PRECISION, out_dtype=tl.float32)
        acc_b += tl.sum(p_t, axis=1)
    tl.store(
        dw_ptr + (split * S + cols[:, None]) * C + ch[None, :], acc_w, mask=(cols[:, None] < S) & (ch[None, :] < C)
    )
    tl.store(db_ptr + split * S + cols, acc_b, mask=cols < S)


def _common_args(dtype: torch.dtype, channels: int) -> dict:
    return {
        "BLOCK_C": block_channels(channels),
        "DOT_DTYPE": tl_dtype(dtype),
        "PRECISION": input_precision(dtype),
        "INTERPRET": INTERPRETED,
    }


def _tiles(kind: str, tiles: dict[str, Tiles] | None, dtype: torch.dtype) -> Tiles:
    if INTERPRETED:
        return INTERPRETER_TILES
    return (tiles or {}).get(kind, GPU_TILES["fp32" if dtype == torch.float32 else "16-bit"][kind])


def _forward(h, w, b, neg, tgt, dtype, tiles) -> torch.Tensor:
    """fp32 [N] log-sum-exp over each row's negatives."""
    (N, C), S = h.shape, w.shape[0]
    t = _tiles("forward", tiles, dtype)
    row_blocks, num_tiles = triton.cdiv(N, t.rows), triton.cdiv(S, t.cols)
    per_split, splits = split_ranges(num_tiles, num_splits(num_tiles, row_blocks, h.device))
    partial = torch.empty(splits, N, device=h.device, dtype=torch.float32)
    _forward_kernel[(row_blocks, splits)](
        h,
        w,
        b,
        neg,
        tgt,
        partial,
        N,
        S,
        C,
        num_tiles,
        per_split,
        BLOCK_N=t.rows,
        BLOCK_S=t.cols,
        **_common_args(dtype, C),
        **launch_options(t),
    )
    return torch.logsumexp(partial, dim=0)


def _hidden_grad(h, w, b, neg, tgt, lse, scale, dtype, tiles) -> torch.Tensor:
    (N, C), S = h.shape, w.shape[0]
    t = _tiles("hidden", tiles, dtype)
    row_blocks, num_tiles = triton.cdiv(N, t.rows), triton.cdiv(S, t.cols)
    per_split, splits = split_ranges(num_tiles, num_splits(num_tiles, row_blocks, h.device))
    partial = torch.empty(splits, N, C, device=h.device, dtype=torch.float32)
    check_offsets(hidden=h, weight=w, hidden_grad_splits=partial)
    _hidden_grad_kernel[(row_blocks, splits)](
        h,
        w,
        b,
        neg,
        tgt,
        lse,
        scale,
        partial,
        N,
        S,
        C,
        num_tiles,
        per_split,
        BLOCK_N=t.rows,
        BLOCK_S=t.cols,
        **_common_args(dtype, C),
        **launch_options(t),
    )
    return partial.sum(0)


def _weight_grad(h, w, b, neg, tgt, lse, scale, dtype, tiles) -> tuple[torch.Tensor, torch.Tensor]:
    (N, C), S = h.shape, w.shape[0]
    t = _tiles("weight", tiles, dtype)
    col_blocks, num_tiles = triton.cdiv(S, t.cols), triton.cdiv(N, t.rows)
    per_split, splits = split_ranges(num_tiles, num_splits(num_tiles, col_blocks, h.device))
    dw = torch.empty(splits, S, C, device=h.device, dtype=torch.float32)
    db = torch.empty(splits, S, device=h.device, dtype=torch.float32)
    check_offsets(hidden=h, weight=w, weight_grad_splits=dw)
    _weight_grad_kernel[(col_blocks, splits)](
        h,
        w,
        b,
        neg,
        tgt,
        lse,
        scale,
        dw,
        db,
        N,
        S,
        C,
        num_tiles,
        per_split,
        BLOCK_N=t.rows,
        BLOCK_S=t.cols,
        **_common_args(dtype, C),
        **launch_options(t),
    )
    return dw.sum(0), db.sum(0)


class _FusedNegativeLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NC, weight_SC, bias_S, negatives_S, target_N, tiles):  # noqa: D102
        dtype = product_dtype(hidden_NC.device, hidden_NC.dtype)
        args = [t.contiguous() for t in (hidden_NC, weight_SC, bias_S, negatives_S, target_N)]
        if hidden_NC.shape[0] == 0 or weight_SC.shape[0] == 0:
            lse = torch.full(hidden_NC.shape[:1], float("-inf"), device=hidden_NC.device)
        else:
            lse = _forward(*args, dtype, tiles)
        ctx.save_for_backward(*args, lse)
        ctx.dtype, ctx.tiles = dtype, tiles
        return lse

    @staticmethod
    def backward(ctx, grad_lse_N):  # noqa: D102
        h, w, b, neg, tgt, lse = ctx.saved_tensors
        # Rows whose every negative was an accidental hit have lse = -inf and no gradient.
        finite = torch.isfinite(lse)
        safe_lse = torch.where(finite, lse, 0.0).contiguous()
        scale = torch.where(finite, grad_lse_N.float(), 0.0).contiguous()
        grad_h = grad_w = grad_b = None
        if h.shape[0] == 0 or w.shape[0] == 0:
            return torch.zeros_like(h), torch.zeros_like(w), torch.zeros_like(b), None, None, None
        if ctx.needs_input_grad[0]:
            grad_h = _hidden_grad(h, w, b, neg, tgt, safe_lse, scale, ctx.dtype, ctx.tiles).to(h.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dw, db = _weight_grad(h, w, b, neg, tgt, safe_lse, scale, ctx.dtype, ctx.tiles)
            grad_w, grad_b = dw.to(w.dtype), db.to(b.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def fused_negative_logsumexp(
    hidden_NC: torch.Tensor,
    weight_SC: torch.Tensor,
    bias_S: torch.Tensor,
    negatives_S: torch.Tensor,
    target_N: torch.Tensor,
    tiles: dict[str, Tiles] | None = None,
) -> torch.Tensor:
    """fp32 [N]: log sum_j exp(h_n . w_j + b_j) over the negatives j that are not row n's target,
    with the arguments of ``negative_logsumexp`` (no chunk: the kernels tile the negatives).
    ``tiles`` overrides the GPU tile sizes per kernel (``forward``, ``hidden``, ``weight``)."""
    if hidden_NC.dim() != 2 or weight_SC.dim() != 2 or hidden_NC.shape[1] != weight_SC.shape[1]:
        raise ValueError(
            f"hidden [N, C] and weight [S, C] must share C, got {tuple(hidden_NC.shape)} and {tuple(weight_SC.shape)}"
        )
    if not (bias_S.shape == negatives_S.shape == weight_SC.shape[:1] and target_N.shape == hidden_NC.shape[:1]):
        raise ValueError("bias and negatives need one entry per weight row, target one per hidden row")
    return _FusedNegativeLogSumExp.apply(hidden_NC, weight_SC, bias_S, negatives_S, target_N, tiles)
