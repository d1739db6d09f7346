"""Before ``auto`` trusts a fused kernel on a GPU, it runs it once on a small probe.

A kernel that compiled for another GPU may fail on this one: a compile error of a Triton
version, too little shared memory for its tiles (``OutOfResources``), or a wrong result. The
first time ``auto`` would pick a kernel for a (device, dtype), ``kernel_works`` compiles and
launches it on a probe of a few hundred rows and compares the result with the torch path. Any
failure logs one warning naming the error, and that kernel stays on the torch path for the rest
of the process; the run goes on.

The probes take the kernel as an argument (``launch``) and ``kernel_works`` takes the probe, so a
test can force each kind of failure on CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

Probe = Callable[[torch.device, torch.dtype, int], None]
"""Runs one kernel on a probe on ``device`` with products in ``dtype`` and the model's channel
count (the kernels are compiled per channel count); raises on any failure."""

_OUTCOMES: dict[tuple[str, str, torch.dtype, int], bool] = {}


class ProbeMismatch(RuntimeError):
    """The kernel ran, but its result differs from the torch path's beyond the stated tolerance."""


def _probe_case(device: torch.device, rows: int, items: int, channels: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, channels, generator=g)
    table, bias = torch.randn(items, channels, generator=g) * 0.3, torch.randn(items, generator=g) * 0.1
    target = torch.randint(1, items, (rows,), generator=g)
    return tuple(t.to(device) for t in (hidden, table, bias, target))


def _compare(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """``got`` within ``tol`` of ``want``'s largest magnitude (and finite where ``want`` is)."""
    got, want = got.float(), want.float()
    if got.shape != want.shape or not torch.equal(torch.isfinite(got), torch.isfinite(want)):
        raise ProbeMismatch(f"{name}: shape or non-finite entries differ from the torch path")
    finite = torch.isfinite(want)
    err = (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0
    scale = want[finite].abs().max().item() if finite.any() else 1.0
    if not err <= tol * max(scale, 1e-6):
        raise ProbeMismatch(f"{name}: off by {err:.3g} (largest entry {scale:.3g}, tolerance {tol:g} of it)")


def _materialized_logsumexp(h, w, b, negatives, target) -> torch.Tensor:
    """The reference: every logit in memory, products in the inputs' dtype, the rest in fp32."""
    logits = (h @ w.T).float() + b.float()
    return torch.logsumexp(logits.masked_fill(negatives[None, :] == target[:, None], float("-inf")), dim=1)


def probe_softmax(device: torch.device, dtype: torch.dtype, channels: int = 64, launch: Callable | None = None) -> None:
    """The fused sampled softmax (forward and backward) against materialized logits on 70 rows x 100
    negatives, inputs in ``dtype``: loss within 1e-2, gradients within 5e-2 of their largest
    entry (bf16 rounds the softmax before the backward products)."""
    if launch is None:
        from conure_dist.kernels.sampled_softmax import fused_negative_logsumexp as launch
    hidden, table, bias, target = _probe_case(device, 70, 160, channels)
    negatives = torch.randperm(159, generator=torch.Generator().manual_seed(1))[:100].to(device) + 1
    results = []
    for fn in (launch, _materialized_logsumexp):
        h, w, b = (t.to(dtype).detach().requires_grad_(True) for t in (hidden, table, bias))
        lse = fn(h, w[negatives], b[negatives], negatives, target)
        lse.float().sum().backward()
        results.append((lse.detach(), h.grad, w.grad, b.grad))
    for name, got, want in zip(("loss", "hidden grad", "weight grad", "bias grad"), *results, strict=True):
        _compare(name, got, want, 1e-2 if name == "loss" else 5e-2)


def probe_rank(device: torch.device, dtype: torch.dtype, channels: int = 64, launch: Callable | None = None) -> None:
    """The fused ranking kernel against ranks of materialized scores on 70 users x 150 items in
    ``dtype``: ranks may differ only where scores tie to within the products' rounding, so at
    most 2% of users by more than 2 places."""
    from conure_dist.train.metrics import target_ranks

    if launch is None:
        from conure_dist.kernels.topk import fused_target_ranks as launch
    hidden, table, bias, target = (
        t.to(dtype) if t.is_floating_point() else t for t in _probe_case(device, 70, 150, channels)
    )
    got = launch(hidden, table, bias, target, True)
    scores = (hidden @ table.T + bias).float()
    scores[:, 0] = float("-inf")
    want = target_ranks(scores, target)
    off = ((got.long() - want).abs() > 2).float().mean().item() if got.shape == want.shape else 1.0
    if off > 0.02:
        raise ProbeMismatch(f"ranks: {off:.1%} of users more than 2 places from the materialized scores' ranks")


PROBES: dict[str, Probe] = {"softmax": probe_softmax, "rank": probe_rank}


def kernel_works(
    name: str, device: torch.device, dtype: torch.dtype, channels: int = 64, probe: Probe | None = None
) -> bool:
    """Whether the fused ``name`` kernel (``softmax`` or ``rank``) passed its probe on ``device``
    in ``dtype`` at ``channels``; probed once per process and (device, dtype, channels). A failure
    logs a warning naming the error and returns False: the caller stays on the torch path."""
    key = (name, str(device), dtype, channels)
    if key not in _OUTCOMES:
        try:
            with torch.enable_grad(), torch.autocast(device.type, enabled=False):
                (probe or PROBES[name])(device, dtype, channels)
            _OUTCOMES[key] = True
        except Exception as exc:  # any failure of a kernel must leave the run on the torch path
            log.warning(
                "the fused %s kernel failed its self-check on %s in %s (%s: %s); using the chunked path",
                name,
                device,
                dtype,
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
            _OUTCOMES[key] = False
    return _OUTCOMES[key]


def forget_outcomes() -> None:
    """Probe again on next use (tests; a process normally probes once)."""
    _OUTCOMES.clear()
