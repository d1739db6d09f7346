"""Task heads on top of the backbone's hidden states.

Each head maps hidden vectors [N, C] to a training loss or to scores over all candidates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from conure_dist.kernels import check_kernel, fused_table_logsumexp, product_dtype, use_triton
from conure_dist.model.chunked_softmax import DEFAULT_CHUNK, negative_logsumexp


class SampledSoftmaxHead(nn.Module):
    """Next-item softmax over the T1 vocabulary (id 0 is padding and never a candidate).

    Training uses a sampled softmax: the true item plus negatives shared by the whole batch;
    a negative equal to an example's own target is masked out for that example (an accidental
    hit). Each example's loss depends only on its own hidden vector and the shared negatives,
    so data-parallel gradients equal the single-process ones.

    ``loss`` methods return the *sum* over examples; the caller divides by the global count.
    With ``chunk`` set, the loss streams over the negatives ``chunk`` at a time (the fast path).
    ``kernel`` (``auto``, ``chunked``, ``triton``; see ``conure_dist.kernels``) says whether the
    streamed loss, and evaluation's ranks, run as fused Triton kernels: under ``auto`` on a CUDA
    GPU with Triton. ``triton`` fuses the loss even without ``chunk``.
    """

    def __init__(
        self, num_items: int, channels: int, init_std: float = 0.02, chunk: int | None = None, kernel: str = "auto"
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_items, channels) * init_std)
        self.bias = nn.Parameter(torch.zeros(num_items))
        self.chunk = chunk
        self.kernel = check_kernel(kernel)
        self.compiled = False
        """Set by ``conure_dist.compiled.compile_model``: the streamed softmax's blocks run compiled."""

    def loss(
        self,
        hidden_NC: torch.Tensor,
        target_N: torch.Tensor,
        negatives_S: torch.Tensor,
        keep_N: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sum of the rows' losses; with ``keep_N`` (bool), of the kept rows' only (the others'
        losses are zeroed, so they get no gradient)."""
        pos = (hidden_NC * self.weight[target_N]).sum(-1) + self.bias[target_N]
        if self.chunk or self.kernel == "triton":
            # Same loss: -log softmax of the target among {target} + negatives, never
            # materializing the [N, S] logits (see chunked_softmax and conure_dist.kernels).
            dtype = product_dtype(hidden_NC.device, hidden_NC.dtype)
            if use_triton(self.kernel, hidden_NC.device, dtype, "softmax", hidden_NC.shape[1]):
                # The kernels gather the negatives' rows and add their gradients into the table's.
                neg_lse = fused_table_logsumexp(hidden_NC, self.weight, self.bias, negatives_S, target_N)
            else:
                neg_lse = negative_logsumexp(
                    hidden_NC,
                    self.weight[negatives_S],
                    self.bias[negatives_S],
                    negatives_S,
                    target_N,
                    self.chunk or DEFAULT_CHUNK,
                    self.compiled,
                    "chunked",
                )
            pos = pos.float()
            return _kept_sum(torch.logaddexp(pos, neg_lse) - pos, keep_N)
        neg = hidden_NC @ self.weight[negatives_S].T + self.bias[negatives_S]
        neg = neg.masked_fill(negatives_S[None, :] == target_N[:, None], float("-inf"))
        logits = torch.cat([pos[:, None], neg], dim=1)
        if keep_N is None:
            return F.cross_entropy(logits.float(), torch.zeros_like(target_N), reduction="sum")
        return _kept_sum(F.cross_entropy(logits.float(), torch.zeros_like(target_N), reduction="none"), keep_N)

    def scores(self, hidden_NC: torch.Tensor) -> torch.Tensor:
        return self.block_scores(hidden_NC, 0, self.weight.shape[0])

    def block_scores(self, hidden_NC: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Scores of items ``start`` to ``stop`` (padding at id 0 scores -inf): columns of ``scores``."""
        logits = hidden_NC @ self.weight[start:stop].T + self.bias[start:stop]
        if start == 0:
            logits[:, 0] = float("-inf")
        return logits


def _kept_sum(loss_N: torch.Tensor, keep_N: torch.Tensor | None) -> torch.Tensor:
    return loss_N.sum() if keep_N is None else torch.where(keep_N, loss_N, 0.0).sum()


class ItemHead(nn.Module):
    """Item recommendation over a task's own vocabulary, trained with BPR.

    A per-item bias lets the head carry an item's overall appeal, so the user vector only has
    to explain the personal part of the ranking. ``kernel``: whether evaluation ranks items with
    the fused Triton kernel (see ``conure_dist.kernels``)."""

    def __init__(self, num_items: int, channels: int, init_std: float = 0.02, kernel: str = "auto") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_items, channels) * init_std)
        self.bias = nn.Parameter(torch.zeros(num_items))
        self.kernel = check_kernel(kernel)

    def loss(self, hidden_NC: torch.Tensor, target_N: torch.Tensor, negative_N: torch.Tensor) -> torch.Tensor:
        pos = (hidden_NC * self.weight[target_N]).sum(-1) + self.bias[target_N]
        neg = (hidden_NC * self.weight[negative_N]).sum(-1) + self.bias[negative_N]
        return -F.logsigmoid((pos - neg).float()).sum()

    def scores(self, hidden_NC: torch.Tensor) -> torch.Tensor:
        return self.block_scores(hidden_NC, 0, self.weight.shape[0])

    def block_scores(self, hidden_NC: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Scores of items ``start`` to ``stop``: columns of ``scores``."""
        return hidden_NC @ self.weight[start:stop].T + self.bias[start:stop]

    @torch.no_grad()
    def init_prior(self, train_counts_V: torch.Tensor) -> None:
        """Start as the popularity ranker: bias log(1 + count), zero item vectors. The user
        vector then learns only how a user departs from the crowd."""
        self.weight.zero_()
        self.bias.copy_(torch.log1p(train_counts_V.to(self.bias)))


class ClassHead(nn.Module):
    """Profile classification (gender, age, ...) with cross-entropy."""

    def __init__(self, num_classes: int, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, num_classes)

    def loss(
        self, hidden_NC: torch.Tensor, target_N: torch.Tensor, negative_N: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F.cross_entropy(self.scores(hidden_NC).float(), target_N, reduction="sum")

    def scores(self, hidden_NC: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden_NC)

    @torch.no_grad()
    def init_prior(self, train_counts_C: torch.Tensor) -> None:
        """Start as the class prior (add-one smoothed log frequencies, zero weights): the loss
        starts at the labels' entropy instead of wherever random logits put it."""
        counts = train_counts_C.to(self.linear.bias) + 1.0
        self.linear.weight.zero_()
        self.linear.bias.copy_(torch.log(counts / counts.sum()))
