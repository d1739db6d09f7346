"""Fused Triton kernels for T1's sampled softmax and exact ranking.

``sampled_softmax`` computes ``negative_logsumexp`` (forward and backward) without writing the
[rows, negatives] logits; ``topk`` the rank of each user's target among all items without
writing the [users, items] scores. ``dispatch`` says where they run (the ``kernel`` settings
``auto``, ``chunked``, ``triton``). Triton is imported only when a kernel runs, so the package
works where it is not installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from conure_dist.kernels.dispatch import (
    AUTO_DTYPES,
    KERNELS,
    check_kernel,
    product_dtype,
    setting_picks_triton,
)
from conure_dist.kernels.self_check import kernel_works

if TYPE_CHECKING:
    from conure_dist.kernels.common import Tiles

__all__ = [
    "AUTO_DTYPES",
    "KERNELS",
    "check_kernel",
    "fused_negative_logsumexp",
    "fused_table_logsumexp",
    "fused_target_ranks",
    "product_dtype",
    "use_triton",
]


def use_triton(
    kernel: str, device: torch.device, dtype: torch.dtype, which: str = "softmax", channels: int = 64
) -> bool:
    """Whether ``kernel`` runs the Triton kernel ``which`` (``softmax`` or ``rank``) for products
    in ``dtype`` (see ``product_dtype``) on ``device``; a clear error where ``triton`` is forced
    but cannot run. ``auto`` also needs the kernel to pass its probe at the model's ``channels``
    (once per process, ``self_check``)."""
    if not setting_picks_triton(kernel, device, dtype):
        return False
    return kernel != "auto" or kernel_works(which, device, dtype, channels)


def fused_negative_logsumexp(
    hidden_NC: torch.Tensor,
    weight_SC: torch.Tensor,
    bias_S: torch.Tensor,
    negatives_S: torch.Tensor,
    target_N: torch.Tensor,
    tiles: dict[str, Tiles] | None = None,
) -> torch.Tensor:
    """The fused kernels' ``negative_logsumexp`` (``conure_dist.kernels.sampled_softmax``)."""
    from conure_dist.kernels.sampled_softmax import fused_negative_logsumexp as run

    return run(hidden_NC, weight_SC, bias_S, negatives_S, target_N, tiles)


def fused_table_logsumexp(
    hidden_NC: torch.Tensor,
    table_VC: torch.Tensor,
    bias_V: torch.Tensor,
    negatives_S: torch.Tensor,
    target_N: torch.Tensor,
    tiles: dict[str, Tiles] | None = None,
) -> torch.Tensor:
    """The fused kernels' ``negative_logsumexp`` over the table's rows at ``negatives_S``, whose
    backward writes the weight rows' gradients straight into the table's gradient."""
    from conure_dist.kernels.sampled_softmax import fused_table_logsumexp as run

    return run(hidden_NC, table_VC, bias_V, negatives_S, target_N, tiles)


def fused_target_ranks(
    hidden_NC: torch.Tensor,
    weight_VC: torch.Tensor,
    bias_V: torch.Tensor,
    target_N: torch.Tensor,
    padding_first: bool = False,
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """The fused kernel's ``target_ranks`` of ``hidden @ weight.T + bias`` (``conure_dist.kernels.topk``)."""
    from conure_dist.kernels.topk import fused_target_ranks as run

    return run(hidden_NC, weight_VC, bias_V, target_N, padding_first, tiles)
