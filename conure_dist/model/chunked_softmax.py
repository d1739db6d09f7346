"""Log-sum-exp over a large shared set of negatives, in chunks, without keeping the logits.

A T1 step scores every position of every sequence against the shared negatives: N = B*L rows
against S = 20% of the vocabulary (25,600 x 129,000 for the paper's TTL batch), far more than
the model itself. The plain path materializes that [N, S] matrix (and its fp32 copy, and the
softmax, and their gradients). Here the forward pass keeps one log-sum-exp per row and chunk
and the backward pass recomputes each chunk's logits, so the extra memory is one [N, chunk] block.

The element-wise work on each block (bias, accidental-hit mask, log-sum-exp; in backward the
softmax and its column sums) is in two ``@hot`` functions: compiled (``conure_dist.compiled``, for a compiled
model's head) each becomes one fused kernel that reads the block once, instead of a
dozen eager passes over it; the matrix products around them stay cuBLAS's.

``negative_logsumexp(..., kernel=...)`` runs the same function as fused Triton kernels instead
(``conure_dist.kernels``: the logits never reach memory), where that kernel setting says so.
"""

from __future__ import annotations

import torch

from conure_dist.compiled import hot
from conure_dist.kernels import fused_negative_logsumexp, product_dtype, use_triton

DEFAULT_CHUNK = 8192


class _NegativeLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NC, weight_SC, bias_S, negatives_S, target_N, chunk, compiled):  # noqa: D102
        dtype = product_dtype(hidden_NC.device, hidden_NC.dtype)
        h = hidden_NC.to(dtype)
        parts = []
        for start in range(0, weight_SC.shape[0], chunk):
            stop = min(start + chunk, weight_SC.shape[0])
            logits = h @ weight_SC[start:stop].to(dtype).T
            parts.append(
                chunk_logsumexp(logits, bias_S[start:stop], negatives_S[start:stop], target_N, compiled=compiled)
            )
        if parts:
            lse = torch.logsumexp(torch.stack(parts, dim=1), dim=1)
        else:  # no negatives at all
            lse = torch.full(hidden_NC.shape[:1], float("-inf"), device=hidden_NC.device)
        ctx.save_for_backward(hidden_NC, weight_SC, bias_S, negatives_S, target_N, lse)
        ctx.chunk, ctx.dtype, ctx.compiled = chunk, dtype, compiled
        return lse

    @staticmethod
    def backward(ctx, grad_lse_N):  # noqa: D102
        hidden_NC, weight_SC, bias_S, negatives_S, target_N, lse = ctx.saved_tensors
        chunk, dtype, compiled = ctx.chunk, ctx.dtype, ctx.compiled
        h = hidden_NC.to(dtype)
        # Rows whose every negative was an accidental hit have lse = -inf and no gradient.
        finite = torch.isfinite(lse)
        safe_lse = torch.where(finite, lse, 0.0)
        scale = torch.where(finite, grad_lse_N.float(), 0.0)
        grad_hidden = torch.zeros(hidden_NC.shape, device=hidden_NC.device, dtype=torch.float32)
        grad_weight = torch.empty(weight_SC.shape, device=weight_SC.device, dtype=torch.float32)
        grad_bias = torch.empty(bias_S.shape, device=bias_S.device, dtype=torch.float32)
        for start in range(0, weight_SC.shape[0], chunk):
            stop = min(start + chunk, weight_SC.shape[0])
            w = weight_SC[start:stop].to(dtype)
            logits = h @ w.T
            p, grad_bias[start:stop] = chunk_softmax_grad(
                logits, bias_S[start:stop], negatives_S[start:stop], target_N, safe_lse, scale, compiled=compiled
            )
            grad_hidden += (p @ w).float()
            grad_weight[start:stop] = (p.T @ h).float()
        return (
            grad_hidden.to(hidden_NC.dtype),
            grad_weight.to(weight_SC.dtype),
            grad_bias.to(bias_S.dtype),
            None,
            None,
            None,
            None,
        )


def _masked_logits(logits_NS, bias_S, negatives_S, target_N) -> torch.Tensor:
    """fp32 logits plus bias, with each row's accidental hit (its own target) at -inf."""
    x = logits_NS.float() + bias_S.float()
    return x.masked_fill(negatives_S[None, :] == target_N[:, None], float("-inf"))


@hot
def chunk_logsumexp(logits_NS, bias_S, negatives_S, target_N) -> torch.Tensor:
    """fp32 [N]: log-sum-exp of one block of negatives' logits (matmul output, no bias yet)."""
    return torch.logsumexp(_masked_logits(logits_NS, bias_S, negatives_S, target_N), dim=1)


@hot
def chunk_softmax_grad(logits_NS, bias_S, negatives_S, target_N, lse_N, scale_N) -> tuple[torch.Tensor, torch.Tensor]:
    """d loss / d logits of one block (the softmax over all negatives times the row's incoming
    gradient; masked hits get exactly zero), in the logits' dtype, and its fp32 column sums (the
    bias gradient)."""
    probs = torch.exp(_masked_logits(logits_NS, bias_S, negatives_S, target_N) - lse_N[:, None]) * scale_N[:, None]
    return probs.to(logits_NS.dtype), probs.sum(0)


def negative_logsumexp(
    hidden_NC: torch.Tensor,
    weight_SC: torch.Tensor,
    bias_S: torch.Tensor,
    negatives_S: torch.Tensor,
    target_N: torch.Tensor,
    chunk: int = DEFAULT_CHUNK,
    compiled: bool = False,
    kernel: str = "chunked",
) -> torch.Tensor:
    """fp32 [N]: log sum_j exp(h_n . w_j + b_j) over the negatives j that are not row n's target.

    ``weight_SC`` and ``bias_S`` are the negatives' rows (gathered, so gradients flow back to the
    table through the gather); ``negatives_S`` their ids, used to mask accidental hits.
    ``compiled`` runs each block's element-wise work as one compiled kernel. ``kernel``
    (``chunked``, ``auto`` or ``triton``, see ``conure_dist.kernels``) picks the fused Triton
    kernels instead, which ignore ``chunk`` and ``compiled``.
    """
    dtype = product_dtype(hidden_NC.device, hidden_NC.dtype)
    if use_triton(kernel, hidden_NC.device, dtype, "softmax", hidden_NC.shape[1]):
        return fused_negative_logsumexp(hidden_NC, weight_SC, bias_S, negatives_S, target_N)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return _NegativeLogSumExp.apply(hidden_NC, weight_SC, bias_S, negatives_S, target_N, chunk, compiled)
