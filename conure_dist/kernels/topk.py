"""Exact rank of each user's target among all items as one Triton kernel: no [users, items] scores.

``conure_dist.train.metrics.target_ranks`` reads a materialized score matrix (646K items x 4,096
users is 10.6 GB in fp32, written by the matrix product and read back by the ranking pass).
Here each program multiplies a block of users by tiles of the item table in registers and only
counts, per user, the items that rank before the target: a strictly higher score, or an equal
score and a lower id (the same strict order as ``target_ranks``). Grid: (user blocks, splits of
the items); torch sums the splits' counts.

The scores are those the eager head computes: the product in its dtype (bf16 under autocast:
the fp32 accumulator is rounded to bf16, as cuBLAS's output is), plus the bias in the
promoted dtype, and for T1's head item 0 (padding) at -inf. The target's own score comes from
the same product on a tile of the same shape (its weight rows gathered into the columns), so a
target is compared with the other items under one arithmetic; it never counts itself. Against
cuBLAS's scores, a rank can differ only where two scores are equal to within the products'
rounding (the kernels sum the channels in another order). A NaN target score ranks last.
"""

from __future__ import annotations

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
    load_rows,
    num_splits,
    round_to,
    split_ranges,
    tl_dtype,
)
from conure_dist.kernels.dispatch import product_dtype

GPU_TILES = {
    "16-bit": (Tiles(128, 128, 8, 4, 90), Tiles(64, 128, 8, 3), Tiles(64, 64, 4, 2)),
    "fp32": (Tiles(64, 64, 8, 3), Tiles(32, 32, 4, 2)),
}
"""Users and items per program on a GPU, best first: a launch takes the first made for its GPU
whose pipeline stages fit its shared memory (``common.fitting_tiles``); ``python -m
conure_dist.kernels.aot`` compiles the chosen ones (not yet timed on a GPU). Columns must be >=
rows (the targets' tile puts one target per column)."""


@triton.jit
def _products(
    h,
    h_ptr,
    rows,
    N,
    w_ptr,
    cols,
    V,
    C,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """fp32 [rows, cols]: hidden rows times the items ``cols`` (ids < V; others read zeros). One
    chunk of channels (``NUM_K == 1``) multiplies the block ``h`` that stays in registers;
    several read the rows' chunks from ``h_ptr`` (a pipeline stage then holds (rows + items) x chunk)."""
    if NUM_K == 1:
        ch = tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + cols[:, None] * C + ch[None, :], mask=(cols[:, None] < V) & (ch[None, :] < C), other=0.0)
        x = tl.dot(h, tl.trans(cast_for_dot(w, DOT_DTYPE, INTERPRET)), input_precision=PRECISION, out_dtype=tl.float32)
    else:
        x = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for k in range(NUM_K):
            ch = k * BLOCK_K + tl.arange(0, BLOCK_K)
            hk = tl.load(
                h_ptr + rows[:, None] * C + ch[None, :], mask=(rows[:, None] < N) & (ch[None, :] < C), other=0.0
            )
            wk = tl.load(
                w_ptr + cols[:, None] * C + ch[None, :], mask=(cols[:, None] < V) & (ch[None, :] < C), other=0.0
            )
            x = tl.dot(
                cast_for_dot(hk, DOT_DTYPE, INTERPRET),
                tl.trans(cast_for_dot(wk, DOT_DTYPE, INTERPRET)),
                x,
                input_precision=PRECISION,
                out_dtype=tl.float32,
            )
    return x


@triton.jit
def _scores(
    h,
    h_ptr,
    rows,
    N,
    w_ptr,
    b_ptr,
    cols,
    V,
    C,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    SCORE_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """fp32 [rows, cols]: the head's scores of the items ``cols``, rounded as its outputs are."""
    x = _products(
        h, h_ptr, rows, N, w_ptr, cols, V, C, BLOCK_N, BLOCK_V, BLOCK_K, NUM_K, DOT_DTYPE, PRECISION, INTERPRET
    )
    b = tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
    return round_to(round_to(x, DOT_DTYPE, INTERPRET) + b[None, :], SCORE_DTYPE, INTERPRET)


@triton.jit
def _rank_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    tgt_ptr,
    count_ptr,
    tscore_ptr,
    N,
    V,
    C,
    num_tiles,
    tiles_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    SCORE_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    PADDING_FIRST: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Per user of one block, the items of one split that rank before the target: count[split, rows];
    split 0 also writes the targets' scores."""
    split = tl.program_id(1)
    start = tl.program_id(0) * BLOCK_N
    rows = start + tl.arange(0, BLOCK_N)
    if NUM_K == 1:
        h, tgt = load_rows(h_ptr, tgt_ptr, rows, N, C, BLOCK_K, DOT_DTYPE, INTERPRET)
    else:
        h = 0.0  # unused: the products read the rows chunk by chunk
        tgt = tl.load(tgt_ptr + rows, mask=rows < N, other=-1)
    # The targets' scores: column j of this tile is row j's target (one product of the tiles' shape).
    j = tl.arange(0, BLOCK_V)
    tcols = tl.load(tgt_ptr + start + j, mask=(j < BLOCK_N) & (start + j < N), other=0)
    on_diagonal = j[None, :] == tl.arange(0, BLOCK_N)[:, None]
    tscore = _scores(
        h,
        h_ptr,
        rows,
        N,
        w_ptr,
        b_ptr,
        tcols,
        V,
        C,
        BLOCK_N,
        BLOCK_V,
        BLOCK_K,
        NUM_K,
        DOT_DTYPE,
        SCORE_DTYPE,
        PRECISION,
        INTERPRET,
    )
    tscore = tl.sum(tl.where(on_diagonal, tscore, 0.0), axis=1)
    if PADDING_FIRST:
        tscore = tl.where(tgt == 0, float("-inf"), tscore)
    count = tl.zeros([BLOCK_N], tl.int32)
    for tile in range(split * tiles_per_split, tl.minimum((split + 1) * tiles_per_split, num_tiles)):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        s = _scores(
            h,
            h_ptr,
            rows,
            N,
            w_ptr,
            b_ptr,
            cols,
            V,
            C,
            BLOCK_N,
            BLOCK_V,
            BLOCK_K,
            NUM_K,
            DOT_DTYPE,
            SCORE_DTYPE,
            PRECISION,
            INTERPRET,
        )
        if PADDING_FIRST:
            s = tl.where(cols[None, :] == 0, float("-inf"), s)
        before = (s > tscore[:, None]) | ((s == tscore[:, None]) & (cols[None, :] < tgt[:, None]))
        before = before & (cols[None, :] < V) & (cols[None, :] != tgt[:, None])
        count += tl.sum(before.to(tl.int32), axis=1)
    tl.store(count_ptr + split * N + rows, count, mask=rows < N)
    if split == 0:
        tl.store(tscore_ptr + rows, tscore, mask=rows < N)


def fused_target_ranks(
    hidden_NC: torch.Tensor,
    weight_VC: torch.Tensor,
    bias_V: torch.Tensor,
    target_N: torch.Tensor,
    padding_first: bool = False,
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """int64 [N]: ``target_ranks(hidden @ weight.T + bias, target)`` (with item 0's score at -inf
    where ``padding_first``: T1's head), computed tile by tile. ``tiles`` overrides the GPU tile."""
    (N, C), V = hidden_NC.shape, weight_VC.shape[0]
    if weight_VC.shape[1:] != (C,) or bias_V.shape != (V,) or target_N.shape != (N,):
        raise ValueError(
            f"hidden [N, C], weight [V, C], bias [V] and target [N] do not fit: {tuple(hidden_NC.shape)}, "
            f"{tuple(weight_VC.shape)}, {tuple(bias_V.shape)}, {tuple(target_N.shape)}"
        )
    if N == 0:
        return torch.zeros(0, dtype=torch.int64, device=hidden_NC.device)
    if int(target_N.min()) < 0 or int(target_N.max()) >= V:
        raise ValueError(f"targets must be item ids in [0, {V}), got {int(target_N.min())}..{int(target_N.max())}")
    dtype = product_dtype(hidden_NC.device, hidden_NC.dtype)
    chunk = channel_chunk(dtype, C)
    if INTERPRETED:
        t = INTERPRETER_TILES
    else:
        candidates = GPU_TILES["fp32" if dtype == torch.float32 else "16-bit"]
        t = tiles or fitting_tiles(candidates, chunk, dtype, hidden_NC.device)
    if t.cols < t.rows:
        raise ValueError(f"the ranking tile needs at least as many columns as rows, got {t}")
    score_dtype = torch.promote_types(dtype, bias_V.dtype)
    # The kernel reads rows and items in the products' dtype (the pointer type it is built for).
    h, w = hidden_NC.to(dtype).contiguous(), weight_VC.to(dtype).contiguous()
    b, tgt = bias_V.contiguous(), target_N.contiguous()
    check_offsets(hidden=h, weight=w)
    row_blocks, num_tiles = triton.cdiv(N, t.rows), triton.cdiv(V, t.cols)
    per_split, splits = split_ranges(num_tiles, num_splits(num_tiles, row_blocks, h.device))
    counts = torch.empty(splits, N, device=h.device, dtype=torch.int32)
    tscore = torch.empty(N, device=h.device, dtype=torch.float32)
    launch(
        _rank_kernel,
        (row_blocks, splits),
        (h, w, b, tgt, counts, tscore, N, V, C, num_tiles, per_split),
        {
            "BLOCK_N": t.rows,
            "BLOCK_V": t.cols,
            "BLOCK_K": chunk,
            "NUM_K": triton.cdiv(C, chunk),
            "DOT_DTYPE": tl_dtype(dtype),
            "SCORE_DTYPE": tl_dtype(score_dtype),
            "PRECISION": input_precision(dtype),
            "PADDING_FIRST": padding_first,
            "INTERPRET": INTERPRETED,
            **launch_options(t),
        },
    )
    ranks = counts.sum(0, dtype=torch.int64)
    return torch.where(tscore.isnan(), V - 1, ranks)
