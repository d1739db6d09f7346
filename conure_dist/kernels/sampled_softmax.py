"""T1's sampled softmax as fused Triton kernels: the negatives' logits never reach memory.

Same function as ``conure_dist.model.chunked_softmax.negative_logsumexp``: per row n the
log-sum-exp of ``h_n . w_j + b_j`` over the negatives j that are not row n's target (an
accidental hit), fp32, with gradients for the hidden rows, the negatives' (gathered) weight
rows and biases. The chunked path writes each [rows, chunk] block of logits to memory and reads
it back several times; here each program multiplies a tile of rows by a tile of negatives in
registers, masks and reduces it at once (the log-sum-exp online, as flash attention does).

Two kernels:

* forward: grid (row blocks, splits of the negatives); each program keeps a running max and sum
  per row over its tiles and writes one partial log-sum-exp; torch combines the splits.
* backward: one pass over the logits. Each program takes a group of row blocks and a group of
  negative tiles; per (row block, tile) it recomputes the logits once, forms the softmax's
  gradient and adds both of its products: d hidden (softmax @ weights) and d weights (softmax^T
  @ hidden), and the bias gradient (its column sums). Four matrix products per step where a
  backward recomputing the logits for each gradient needs five. Programs are numbered so that
  neighbours share a group of negatives (its weight tiles stay in L2 while every row group
  passes over them). Deterministic (``torch.are_deterministic_algorithms_enabled()``, the
  ``train.deterministic`` setting, on by default): each program adds into partial gradients
  that it alone owns (one per row group for the weights, per negative group for the hidden
  rows), summed by torch afterwards in a fixed order. With it off, programs add into one
  gradient each with atomics: less memory and traffic, sums in a varying order.

Every product runs over the channels in chunks (``common.channel_chunk``), so a pipeline stage
holds (rows + negatives) x chunk operands, and the tiles are the largest of a list whose stages
fit the GPU's shared memory (``common.fitting_tiles``).

The wrappers pass the hidden rows and weight rows in the products' dtype (bf16 under autocast)
and the biases in fp32; products accumulate in fp32. Unlike the chunked path, the logits are not
rounded to the products' dtype before the bias is added (more precise; in fp32 the two agree to
rounding). As in the chunked path, the softmax is narrowed to the products' dtype before the
backward products.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from conure_dist.kernels.common import (
    INTERPRETED,
    INTERPRETER_TILES,
    Tiles,
    cast_for_dot,
    channel_chunk,
    check_offsets,
    fitting_tiles,
    input_precision,
    launch,
    launch_options,
    multiprocessors,
    num_splits,
    split_ranges,
    tl_dtype,
)
from conure_dist.kernels.dispatch import product_dtype

GPU_TILES = {
    "16-bit": {
        "forward": (Tiles(128, 128, 8, 4, 90), Tiles(128, 128, 8, 3, 90), Tiles(128, 64, 8, 3)),
        "backward": (Tiles(128, 128, 8, 3, 90), Tiles(128, 128, 8, 2, 90), Tiles(64, 64, 8, 2)),
    },
    "fp32": {
        "forward": (Tiles(64, 64, 8, 3), Tiles(32, 32, 4, 2)),
        "backward": (Tiles(32, 32, 4, 2),),
    },
}
"""Tile candidates (rows, negatives, warps, stages, oldest architecture) per kernel on a GPU,
best first: a launch takes the first made for its GPU whose stages fit its shared memory
(``common.fitting_tiles``).
``python -m conure_dist.kernels.aot`` compiles the chosen ones for sm_90 and sm_80 and reads
their shared memory and registers: in 16 bits none spills on either. fp32 (full-precision
products, only under ``kernel='triton'``) runs its products on FMA units, whose backward spills a
few bytes even at 32 x 32. Not yet timed on a GPU; ``benchmarks/kernels.py`` tries others (``tiles=``)."""


@triton.jit
def _logits(
    h_ptr,
    w_ptr,
    rows,
    cols,
    N,
    S,
    C,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """fp32 [rows, cols]: hidden rows times weight rows, over the channels ``BLOCK_K`` at a time."""
    acc = tl.zeros([BLOCK_N, BLOCK_S], tl.float32)
    for k in range(NUM_K):
        ch = k * BLOCK_K + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + rows[:, None] * C + ch[None, :], mask=(rows[:, None] < N) & (ch[None, :] < C), other=0.0)
        w = tl.load(w_ptr + cols[:, None] * C + ch[None, :], mask=(cols[:, None] < S) & (ch[None, :] < C), other=0.0)
        acc = tl.dot(
            cast_for_dot(h, DOT_DTYPE, INTERPRET),
            tl.trans(cast_for_dot(w, DOT_DTYPE, INTERPRET)),
            acc,
            input_precision=PRECISION,
            out_dtype=tl.float32,
        )
    return acc


@triton.jit
def _masked(x, b_ptr, neg_ptr, cols, tgt, S):
    """Logits plus fp32 biases; each row's own target and the padding columns at -inf."""
    b = tl.load(b_ptr + cols, mask=cols < S, other=0.0)
    neg = tl.load(neg_ptr + cols, mask=cols < S, other=-1)
    hit = (neg[None, :] == tgt[:, None]) | (cols[None, :] >= S)
    return tl.where(hit, float("-inf"), x + b[None, :])


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
    BLOCK_K: tl.constexpr,
    NUM_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Partial log-sum-exp of one row block over one split of the negatives: out[split, rows]."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tgt = tl.load(tgt_ptr + rows, mask=rows < N, other=-1)
    run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_N], tl.float32)
    for tile in range(split * tiles_per_split, tl.minimum((split + 1) * tiles_per_split, num_tiles)):
        cols = tile * BLOCK_S + tl.arange(0, BLOCK_S)
        x = _logits(
            h_ptr, w_ptr, rows, cols, N, S, C, BLOCK_N, BLOCK_S, BLOCK_K, NUM_K, DOT_DTYPE, PRECISION, INTERPRET
        )
        x = _masked(x, b_ptr, neg_ptr, cols, tgt, S)
        new_max = tl.maximum(run_max, tl.max(x, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row masked so far: no nan
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        run_max = new_max
    lse = tl.where(run_sum > 0, run_max + tl.log(tl.where(run_sum > 0, run_sum, 1.0)), float("-inf"))
    tl.store(out_ptr + split * N + rows, lse, mask=rows < N)


@triton.jit
def _accumulate(ptr, value, mask, ATOMIC: tl.constexpr):
    """``*ptr += value``: atomically, or as the only program writing ``ptr`` (the barrier makes the
    block's previous writes visible to all its threads first)."""
    if ATOMIC:
        tl.atomic_add(ptr, value, mask=mask, sem="relaxed")
    else:
        tl.debug_barrier()
        tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def _backward_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    neg_ptr,
    tgt_ptr,
    lse_ptr,
    scale_ptr,
    dh_ptr,
    dw_ptr,
    db_ptr,
    N,
    S,
    C,
    row_blocks,
    col_tiles,
    blocks_per_group,
    tiles_per_group,
    num_row_groups,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    ATOMIC: tl.constexpr,
    SCATTER: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """d loss / d hidden, weights and biases of one group of row blocks x one group of negative
    tiles, from one recomputation of each tile's logits. Without ``ATOMIC`` the outputs are
    partials: dh[col group, N, C], dw[row group, S, C], db[row group, S]. With ``SCATTER`` (and
    atomics) the weight and bias gradients go straight to the item table's rows: dw[V, C], db[V]
    at the negatives' ids."""
    pid = tl.program_id(0)
    col_group = pid // num_row_groups  # neighbours share a group of negatives
    row_group = pid % num_row_groups
    if not ATOMIC:
        dh_ptr += col_group * N * C
        dw_ptr += row_group * S * C
        db_ptr += row_group * S
    # Negative tiles outer, row blocks inner: a tile's weight gradient (and, with atomics, the
    # hidden rows' whole gradient, small enough for L2) stays in cache while the rows stream.
    for ct in range(col_group * tiles_per_group, tl.minimum((col_group + 1) * tiles_per_group, col_tiles)):
        cols = ct * BLOCK_S + tl.arange(0, BLOCK_S)
        if SCATTER:
            dst = tl.load(neg_ptr + cols, mask=cols < S, other=0)
        else:
            dst = cols
        for rb in range(row_group * blocks_per_group, tl.minimum((row_group + 1) * blocks_per_group, row_blocks)):
            rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
            tgt = tl.load(tgt_ptr + rows, mask=rows < N, other=-1)
            lse = tl.load(lse_ptr + rows, mask=rows < N, other=0.0)
            scale = tl.load(scale_ptr + rows, mask=rows < N, other=0.0)
            x = _logits(
                h_ptr, w_ptr, rows, cols, N, S, C, BLOCK_N, BLOCK_S, BLOCK_K, NUM_K, DOT_DTYPE, PRECISION, INTERPRET
            )
            p = tl.exp(_masked(x, b_ptr, neg_ptr, cols, tgt, S) - lse[:, None]) * scale[:, None]
            p = tl.where(rows[:, None] < N, p, 0.0)  # padding rows add nothing (not even inf * 0)
            _accumulate(db_ptr + dst, tl.sum(p, axis=0), cols < S, ATOMIC)
            p = cast_for_dot(p, DOT_DTYPE, INTERPRET)
            # Two passes over the channels, so that one [tile, chunk] product is live at a time.
            for k in range(NUM_K):
                ch = k * BLOCK_K + tl.arange(0, BLOCK_K)
                col_mask = (cols[:, None] < S) & (ch[None, :] < C)
                w = tl.load(w_ptr + cols[:, None] * C + ch[None, :], mask=col_mask, other=0.0)
                dh = tl.dot(p, cast_for_dot(w, DOT_DTYPE, INTERPRET), input_precision=PRECISION, out_dtype=tl.float32)
                row_mask = (rows[:, None] < N) & (ch[None, :] < C)
                _accumulate(dh_ptr + rows[:, None] * C + ch[None, :], dh, row_mask, ATOMIC)
            for k in range(NUM_K):
                ch = k * BLOCK_K + tl.arange(0, BLOCK_K)
                row_mask = (rows[:, None] < N) & (ch[None, :] < C)
                h = tl.load(h_ptr + rows[:, None] * C + ch[None, :], mask=row_mask, other=0.0)
                dw = tl.dot(
                    tl.trans(p), cast_for_dot(h, DOT_DTYPE, INTERPRET), input_precision=PRECISION, out_dtype=tl.float32
                )
                col_mask = (cols[:, None] < S) & (ch[None, :] < C)
                _accumulate(dw_ptr + dst[:, None] * C + ch[None, :], dw, col_mask, ATOMIC)


def pick_tiles(kind: str, tiles: dict[str, Tiles] | None, dtype: torch.dtype, channels: int, device) -> Tiles:
    """The tiles of kernel ``kind`` (``forward``, ``backward``): ``tiles``' if given, else the
    best of ``GPU_TILES`` that fits the device's shared memory."""
    if INTERPRETED:
        return INTERPRETER_TILES
    if tiles and kind in tiles:
        return tiles[kind]
    candidates = GPU_TILES["fp32" if dtype == torch.float32 else "16-bit"][kind]
    backward = kind == "backward"
    return fitting_tiles(candidates, channel_chunk(dtype, channels, backward), dtype, device, backward)


def _chunks(dtype: torch.dtype, channels: int, backward: bool = False) -> dict:
    chunk = channel_chunk(dtype, channels, backward)
    return {
        "BLOCK_K": chunk,
        "NUM_K": triton.cdiv(channels, chunk),
        "DOT_DTYPE": tl_dtype(dtype),
        "PRECISION": input_precision(dtype),
        "INTERPRET": INTERPRETED,
    }


def _forward(h, w, b, neg, tgt, dtype, tiles) -> torch.Tensor:
    """fp32 [N] log-sum-exp over each row's negatives."""
    (N, C), S = h.shape, w.shape[0]
    t = pick_tiles("forward", tiles, dtype, C, h.device)
    row_blocks, num_tiles = triton.cdiv(N, t.rows), triton.cdiv(S, t.cols)
    per_split, splits = split_ranges(num_tiles, num_splits(num_tiles, row_blocks, h.device))
    partial = torch.empty(splits, N, device=h.device, dtype=torch.float32)
    launch(
        _forward_kernel,
        (row_blocks, splits),
        (h, w, b, neg, tgt, partial, N, S, C, num_tiles, per_split),
        {"BLOCK_N": t.rows, "BLOCK_S": t.cols, **_chunks(dtype, C), **launch_options(t)},
    )
    return torch.logsumexp(partial, dim=0)


def backward_groups(row_blocks: int, col_tiles: int, rows: int, negatives: int, device) -> tuple[int, int]:
    """(row groups, negative groups) of the backward grid: about four programs per multiprocessor
    (two groups a side in the interpreter), split between the two so that the deterministic
    partials (row groups x weights + negative groups x hidden rows) take the least memory."""
    programs = 4 * multiprocessors(device)
    if programs == 0:
        return min(2, row_blocks), min(2, col_tiles)
    r = max(1, min(row_blocks, round(math.sqrt(programs * rows / max(1, negatives)))))
    return r, max(1, min(col_tiles, math.ceil(programs / r)))


def _backward(
    h, w, b, neg, tgt, lse, scale, dtype, tiles, table_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d hidden [N, C], and d weight rows [S, C] and d biases [S]; with ``table_rows`` (V) the
    gradients of the item table [V, C] and its biases [V] instead, the negatives' rows added in
    (by the kernel itself with atomics; from the summed partials otherwise)."""
    (N, C), S = h.shape, w.shape[0]
    t = pick_tiles("backward", tiles, dtype, C, h.device)
    row_blocks, col_tiles = triton.cdiv(N, t.rows), triton.cdiv(S, t.cols)
    r, k = backward_groups(row_blocks, col_tiles, N, S, h.device)
    per_row_group, r = split_ranges(row_blocks, r)
    per_col_group, k = split_ranges(col_tiles, k)
    atomic = not torch.are_deterministic_algorithms_enabled()
    scatter = atomic and table_rows is not None
    parts_h, parts_w = (1, 1) if atomic else (k, r)
    rows_w = table_rows if scatter else S
    dh = torch.zeros(parts_h, N, C, device=h.device, dtype=torch.float32)
    dw = torch.zeros(parts_w, rows_w, C, device=h.device, dtype=torch.float32)
    db = torch.zeros(parts_w, rows_w, device=h.device, dtype=torch.float32)
    check_offsets(hidden=h, weight=w, hidden_grad_parts=dh, weight_grad_parts=dw)
    launch(
        _backward_kernel,
        (r * k,),
        (h, w, b, neg, tgt, lse, scale, dh, dw, db, N, S, C, row_blocks, col_tiles, per_row_group, per_col_group, r),
        {
            "BLOCK_N": t.rows,
            "BLOCK_S": t.cols,
            "ATOMIC": atomic,
            "SCATTER": scatter,
            **_chunks(dtype, C, True),
            **launch_options(t),
        },
    )
    dw, db = _summed(dw), _summed(db)
    if table_rows is not None and not scatter:
        dw = torch.zeros(table_rows, C, device=h.device, dtype=torch.float32).index_add_(0, neg, dw)
        db = torch.zeros(table_rows, device=h.device, dtype=torch.float32).index_add_(0, neg, db)
    return _summed(dh), dw, db


def _summed(parts: torch.Tensor) -> torch.Tensor:
    """The per-program partial gradients [P, ...] summed; one part (atomics) is taken as it is,
    not copied: with the table's rows scattered in it is the whole [V, C] table gradient."""
    return parts[0] if parts.shape[0] == 1 else parts.sum(0)


class _FusedNegativeLogSumExp(torch.autograd.Function):
    """The kernels as an autograd function, over the negatives' rows (``gather`` False) or over
    the whole item table (``gather``: the negatives' rows are gathered and cast inside, and the
    backward returns the table's gradients, the rows' gradients written straight into them: no
    gathered-rows gradient for autograd to scatter)."""

    @staticmethod
    def forward(ctx, hidden_NC, weight, bias, negatives_S, target_N, tiles, gather):  # noqa: D102
        dtype = product_dtype(hidden_NC.device, hidden_NC.dtype)
        # The kernels read operands in the products' dtype (the one pointer type they are built
        # for), the biases in fp32.
        rows = (lambda t: t.index_select(0, negatives_S)) if gather else (lambda t: t)
        h, w = hidden_NC.to(dtype).contiguous(), rows(weight).to(dtype).contiguous()
        b, neg, tgt = rows(bias).float().contiguous(), negatives_S.contiguous(), target_N.contiguous()
        if h.shape[0] == 0 or w.shape[0] == 0:
            lse = torch.full(hidden_NC.shape[:1], float("-inf"), device=hidden_NC.device)
        else:
            lse = _forward(h, w, b, neg, tgt, dtype, tiles)
        ctx.save_for_backward(h, w, b, neg, tgt, lse)
        ctx.dtype, ctx.tiles, ctx.gather = dtype, tiles, gather
        ctx.like = (hidden_NC.dtype, weight.shape, weight.dtype, bias.dtype)
        return lse

    @staticmethod
    def backward(ctx, grad_lse_N):  # noqa: D102
        h, w, b, neg, tgt, lse = ctx.saved_tensors
        h_dtype, w_shape, w_dtype, b_dtype = ctx.like
        if h.shape[0] == 0 or w.shape[0] == 0:
            zeros = h.new_zeros(w_shape, dtype=w_dtype)
            return h.new_zeros(h.shape, dtype=h_dtype), zeros, zeros[:, 0].to(b_dtype), *[None] * 4
        # Rows whose every negative was an accidental hit have lse = -inf and no gradient.
        finite = torch.isfinite(lse)
        safe_lse = torch.where(finite, lse, 0.0).contiguous()
        scale = torch.where(finite, grad_lse_N.float(), 0.0).contiguous()
        table_rows = w_shape[0] if ctx.gather else None
        dh, dw, db = _backward(h, w, b, neg, tgt, safe_lse, scale, ctx.dtype, ctx.tiles, table_rows)
        return dh.to(h_dtype), dw.to(w_dtype), db.to(b_dtype), None, None, None, None


def fused_table_logsumexp(
    hidden_NC: torch.Tensor,
    table_VC: torch.Tensor,
    bias_V: torch.Tensor,
    negatives_S: torch.Tensor,
    target_N: torch.Tensor,
    tiles: dict[str, Tiles] | None = None,
) -> torch.Tensor:
    """``fused_negative_logsumexp`` of the table's rows at ``negatives_S`` (``table_VC[negatives_S]``,
    ``bias_V[negatives_S]``), with the table's own gradients: the sampled-softmax head's form."""
    if table_VC.dim() != 2 or hidden_NC.dim() != 2 or hidden_NC.shape[1] != table_VC.shape[1]:
        raise ValueError(
            f"hidden [N, C] and table [V, C] must share C, got {tuple(hidden_NC.shape)}, {tuple(table_VC.shape)}"
        )
    if bias_V.shape != table_VC.shape[:1] or target_N.shape != hidden_NC.shape[:1] or negatives_S.dim() != 1:
        raise ValueError("bias needs one entry per table row, target one per hidden row, negatives one dimension")
    return _FusedNegativeLogSumExp.apply(hidden_NC, table_VC, bias_V, negatives_S, target_N, tiles, True)


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
    ``tiles`` overrides the GPU tile sizes per kernel (``forward``, ``backward``)."""
    if hidden_NC.dim() != 2 or weight_SC.dim() != 2 or hidden_NC.shape[1] != weight_SC.shape[1]:
        raise ValueError(
            f"hidden [N, C] and weight [S, C] must share C, got {tuple(hidden_NC.shape)} and {tuple(weight_SC.shape)}"
        )
    if not (bias_S.shape == negatives_S.shape == weight_SC.shape[:1] and target_N.shape == hidden_NC.shape[:1]):
        raise ValueError("bias and negatives need one entry per weight row, target one per hidden row")
    return _FusedNegativeLogSumExp.apply(hidden_NC, weight_SC, bias_S, negatives_S, target_N, tiles, False)
