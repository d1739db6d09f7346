"""``auto``'s self-check (``conure_dist.kernels.self_check``): each way a kernel can fail on a GPU,
forced on CPU through the probe's seams, ends in one warning naming the error and the torch path.
The probes' real comparisons run here against stand-in launchers (the torch path itself, or one
that is wrong); the probes of the real kernels run in the interpreter (``tests/test_kernels.py``)."""

from __future__ import annotations

import ast
import functools
import logging

import pytest
import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from conure_dist.kernels import use_triton
from conure_dist.kernels.self_check import PROBES, forget_outcomes, kernel_works, probe_rank, probe_softmax
from conure_dist.model.chunked_softmax import negative_logsumexp
from conure_dist.train.metrics import target_ranks

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_outcomes():
    forget_outcomes()
    yield
    forget_outcomes()


def _raising(exc: Exception, calls: list):
    def probe(device, dtype, channels):
        calls.append((device, dtype, channels))
        raise exc

    return probe


@pytest.mark.parametrize(
    ("exc", "named"),
    [
        (CompilationError("def k(): ...", ast.parse("x").body[0], "unsupported dot layout"), "CompilationError"),
        (OutOfResources(300000, 232448, "shared memory"), "OutOfResources: out of resource: shared memory"),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), "RuntimeError: CUDA error"),
    ],
)
def test_a_kernel_that_fails_to_build_or_launch_is_probed_once_and_warned_about(exc, named, caplog):
    calls = []
    with caplog.at_level(logging.WARNING, logger="conure_dist.kernels.self_check"):
        assert not kernel_works("softmax", CPU, torch.bfloat16, probe=_raising(exc, calls))
        assert not kernel_works("softmax", CPU, torch.bfloat16, probe=_raising(exc, calls))
    assert len(calls) == 1  # once per process and (device, dtype)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and named in warnings[0] and "using the chunked path" in warnings[0], warnings


def _chunked(*args):
    return negative_logsumexp(*args, chunk=64)


def test_the_softmax_probe_passes_the_torch_path_and_catches_a_wrong_kernel(caplog):
    probe_softmax(CPU, torch.float32, 24, launch=_chunked)  # the reference against itself: no error
    probe_softmax(CPU, torch.bfloat16, 24, launch=_chunked)
    wrong_loss = functools.partial(probe_softmax, launch=lambda *a: _chunked(*a) * 1.02)
    with caplog.at_level(logging.WARNING, logger="conure_dist.kernels.self_check"):
        assert not kernel_works("softmax", CPU, torch.float32, probe=wrong_loss)
    assert "ProbeMismatch: loss: off by" in caplog.records[0].getMessage()

    class WrongGradient(torch.autograd.Function):  # right loss, hidden gradient doubled
        @staticmethod
        def forward(ctx, h):
            return h

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    wrong_grad = functools.partial(probe_softmax, launch=lambda h, *a: _chunked(WrongGradient.apply(h), *a))
    assert not kernel_works("softmax", CPU, torch.bfloat16, probe=wrong_grad)
    assert "hidden grad: off by" in caplog.records[1].getMessage()
    assert kernel_works("softmax", CPU, torch.float16, probe=functools.partial(probe_softmax, launch=_chunked))


def _materialized_ranks(hidden, table, bias, target, padding_first):
    scores = (hidden @ table.T + bias).float()
    scores[:, 0] = float("-inf")
    return target_ranks(scores, target)


def test_the_rank_probe_passes_exact_ranks_and_catches_wrong_ones(caplog):
    probe_rank(CPU, torch.float32, 24, launch=_materialized_ranks)
    off_by_three = functools.partial(probe_rank, launch=lambda *a: _materialized_ranks(*a) + 3)
    with caplog.at_level(logging.WARNING, logger="conure_dist.kernels.self_check"):
        assert not kernel_works("rank", CPU, torch.float32, probe=off_by_three)
    assert "ProbeMismatch: ranks: 100.0% of users" in caplog.records[0].getMessage()


def test_auto_never_probes_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setitem(PROBES, "rank", _raising(RuntimeError("x"), calls))
    monkeypatch.setitem(PROBES, "softmax", _raising(RuntimeError("x"), calls))
    assert not use_triton("auto", CPU, torch.bfloat16, which="rank")
    assert not use_triton("auto", CPU, torch.bfloat16)
    assert not calls  # CPU tensors keep the torch path without a probe
    assert not kernel_works("rank", CPU, torch.bfloat16) and len(calls) == 1  # the registered probe
