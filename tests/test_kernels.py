"""The fused Triton kernels (``conure_dist.kernels``) against the torch paths, on CPU in Triton's
interpreter.

The interpreter needs ``TRITON_INTERPRET=1`` before Triton is first imported (Triton builds its
own language functions at import), and the rest of the suite must not run interpreted. So the
checks here (``check_*``, which the suite's pytest does not collect) run once, all together, in
a pytest subprocess started with that variable; each ``test_*`` asserts that its group passed,
and how many ran.

Stated tolerances:
- fp32: loss (log-sum-exp) and gradients equal the chunked path's to rtol 1e-5, atol 1e-5 (the
  same products, summed in another order).
- bf16 inputs (or fp32 under bf16 autocast): the log-sum-exp equals fp32 math on the same
  bf16-rounded values to rtol 1e-5, atol 1e-5 (bf16 products are exact in fp32, accumulation
  is fp32); gradients within 1e-2 of their largest entry (the softmax is rounded to bf16 before
  the backward products, and bf16 gradients keep 8 bits).
- ranks: integers, exactly equal to ``target_ranks`` of the head's scores, ties and NaN included.
The kernels' tiles are 16 x 16 here and the odd sizes (33 rows, 100 or 77 negatives, 24
channels) leave every last tile partial; the interpreter splits each grid axis in two.

Triton's interpreter (3.9 included) computes a ``tl.dot`` of bf16 operands wrongly, so under it
the kernels emulate bf16 products exactly in fp32 (``kernels/common.py``): the bf16 tests feed
bf16 tensors through the kernels' loads, rounding and stores, and compare with fp32 math on the
same bf16 values. The interpreter does not compile the kernels: one test compiles exactly what
the wrappers launch for sm_90 (H100/H200) and sm_80 (A100) with the ptxas that Triton ships, no
GPU needed, and checks that each fits its card's shared memory without spilling registers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from xml.etree import ElementTree

import pytest
import torch
from helpers import REPO, build_context, tiny_config

from conure_dist.config import load_config
from conure_dist.dist import DistInfo
from conure_dist.kernels import (
    KERNELS,
    fused_negative_logsumexp,
    fused_table_logsumexp,
    fused_target_ranks,
    use_triton,
)
from conure_dist.kernels.self_check import forget_outcomes, kernel_works
from conure_dist.model.chunked_softmax import negative_logsumexp
from conure_dist.model.heads import ItemHead, SampledSoftmaxHead
from conure_dist.train.evaluate import evaluate_task, fused_ranking
from conure_dist.train.metrics import target_ranks

CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)
BF16_GRAD_TOL = 1e-2


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, str]:
    """Every ``check_*`` run once, in one pytest subprocess under Triton's interpreter: its
    outcome per check ("passed", or the failure's text) by name, parameters included."""
    report = tmp_path_factory.mktemp("interpreted") / "checks.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "python_functions=check_*",
        f"--junitxml={report}",
        __file__,
    ]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    # 0: all passed, 1: some failed (named below); anything else is a crash or a usage error.
    assert result.returncode in (0, 1) and report.exists(), (
        f"{' '.join(cmd)} exited with {result.returncode}\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    )
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        problems = [
            f"{child.tag}: {child.get('message', '')}\n{child.text or ''}"
            for child in case
            if child.tag in ("failure", "error", "skipped")
        ]
        outcomes[case.get("name")] = "\n".join(problems) or "passed"
    return outcomes


def _passed(outcomes: dict[str, str], *checks: str) -> int:
    """How many runs of the named checks passed; fails naming any that did not."""
    picked = {name: outcome for name, outcome in outcomes.items() if name.split("[")[0] in checks}
    assert picked, f"none of {checks} ran: {sorted(outcomes)}"
    failed = {name: outcome for name, outcome in picked.items() if outcome != "passed"}
    assert not failed, "\n\n".join(f"{name}: {outcome[-3000:]}" for name, outcome in failed.items())
    return len(picked)


@pytest.mark.slow
def test_fused_softmax_equals_the_chunked_path_in_fp32(interpreted):
    assert (
        _passed(
            interpreted,
            "check_softmax_fp32_equals_the_chunked_path",
            "check_rows_whose_negatives_are_all_hits_get_minus_infinity_and_no_gradient",
        )
        == 4
    )


@pytest.mark.slow
def test_fused_softmax_in_bf16(interpreted):
    assert _passed(interpreted, "check_bf16_inputs_accumulate_in_fp32", "check_bf16_autocast_over_fp32_parameters") == 2


@pytest.mark.slow
def test_the_head_runs_the_fused_softmax(interpreted):
    assert _passed(interpreted, "check_the_head_runs_either_kernel") == 1


@pytest.mark.slow
def test_fused_ranks_equal_target_ranks(interpreted):
    assert (
        _passed(
            interpreted,
            "check_fused_ranks_with_ties_and_nan",
            "check_fused_ranks_on_random_scores",
            "check_fused_ranks_round_scores_to_bf16_under_autocast",
        )
        == 4
    )


@pytest.mark.slow
def test_evaluation_with_fused_ranks_gives_the_same_metrics(interpreted):
    assert _passed(interpreted, "check_evaluation_with_the_rank_kernel") == 2


@pytest.mark.slow
def test_the_single_pass_backward_with_and_without_atomics(interpreted):
    assert _passed(interpreted, "check_the_backward_is_deterministic_unless_atomics_are_allowed") == 2


@pytest.mark.slow
def test_the_table_form_writes_the_table_gradient(interpreted):
    assert _passed(interpreted, "check_the_table_form_writes_the_same_table_gradients") == 2


@pytest.mark.slow
def test_the_self_check_probes_pass_the_real_kernels(interpreted):
    assert _passed(interpreted, "check_the_probes_pass_the_kernels") == 2


@pytest.mark.slow
def test_every_interpreted_check_belongs_to_a_test(interpreted):
    assert len(interpreted) == 19, sorted(interpreted)


def test_kernel_settings_and_their_errors():
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    assert not use_triton("auto", cpu, bf16) and not use_triton("chunked", cpu, bf16)
    assert SampledSoftmaxHead(10, 4).kernel == ItemHead(10, 4).kernel == "auto"
    assert KERNELS == ("auto", "chunked", "triton")
    with pytest.raises(ValueError, match=r"kernel must be one of \('auto', 'chunked', 'triton'\), got 'cuda'"):
        SampledSoftmaxHead(10, 4, kernel="cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":  # this suite's process: the kernels are built for a GPU
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            use_triton("triton", cpu, torch.float32)


def _softmax_case(seed: int, channels: int, num_negatives: int = 100, rows: int = 33, items: int = 300):
    """Rows, an item table, shared negatives with duplicates, targets with accidental hits."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, channels, generator=g)
    table, bias = torch.randn(items, channels, generator=g) * 0.5, torch.randn(items, generator=g)
    negatives = torch.randint(1, items, (num_negatives,), generator=g)
    negatives[:4] = negatives[4]  # one id five times
    target = torch.randint(1, items, (rows,), generator=g)
    target[:6] = negatives[:6]  # accidental hits, of the repeated id among them
    target[6] = negatives[-1]
    return hidden, table, bias, negatives, target


def _lse_and_grads(case, fn, dtype=torch.float32, autocast=False):
    """log-sum-exp and the gradients of a weighted sum of it for the rows, the table and its bias
    (gathered at the negatives, so repeated negatives sum their rows' gradients)."""
    hidden, table, bias, negatives, target = case
    h, w, b = (t.to(dtype).detach().requires_grad_(True) for t in (hidden, table, bias))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        lse = fn(h, w[negatives], b[negatives], negatives, target)
    (lse * torch.linspace(0.5, 1.5, lse.shape[0])).sum().backward()
    return [t.float() for t in (lse.detach(), h.grad, w.grad, b.grad)]


def _chunked(*args):
    return negative_logsumexp(*args, chunk=7)


@pytest.mark.parametrize(("channels", "num_negatives"), [(16, 100), (24, 77), (32, 100)])
def check_softmax_fp32_equals_the_chunked_path(channels, num_negatives):
    case = _softmax_case(channels, channels, num_negatives)
    fused, chunked = _lse_and_grads(case, fused_negative_logsumexp), _lse_and_grads(case, _chunked)
    assert fused[0].dtype == torch.float32 and fused[0].shape == (33,)
    for name, got, want in zip(("lse", "hidden", "weight", "bias"), fused, chunked, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
    assert chunked[2].abs().sum() > 0  # the gradients are not trivially zero


def check_rows_whose_negatives_are_all_hits_get_minus_infinity_and_no_gradient():
    hidden, table, bias, _, target = _softmax_case(1, 16)
    negatives = torch.full((40,), 7)
    target[:5] = 7  # every negative of these rows is their target
    case = (hidden, table, bias, negatives, target)
    fused, chunked = _lse_and_grads(case, fused_negative_logsumexp), _lse_and_grads(case, _chunked)
    assert torch.isneginf(fused[0][:5]).all() and torch.isfinite(fused[0][5:]).all()
    assert torch.equal(fused[1][:5], torch.zeros(5, 16))
    for got, want in zip(fused, chunked, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _exact_on_bf16_values(case, round_bias: bool):
    """fp32 math on the bf16-rounded inputs: what bf16 products with fp32 accumulation compute."""
    hidden, table, bias, negatives, target = case
    rounded = (hidden.bfloat16().float(), table.bfloat16().float(), bias.bfloat16().float() if round_bias else bias)
    return _lse_and_grads((*rounded, negatives, target), _chunked)


def _assert_bf16_close(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for name, g, w in zip(("hidden", "weight", "bias"), got[1:], want[1:], strict=True):
        assert (g - w).abs().max() <= BF16_GRAD_TOL * w.abs().max(), name


def check_bf16_inputs_accumulate_in_fp32():
    case = _softmax_case(2, 32)
    fused = _lse_and_grads(case, fused_negative_logsumexp, dtype=torch.bfloat16)
    _assert_bf16_close(fused, _exact_on_bf16_values(case, round_bias=True))
    # The chunked path rounds each logit to bf16 as well: further off, within bf16's precision.
    chunked = _lse_and_grads(case, _chunked, dtype=torch.bfloat16)
    torch.testing.assert_close(fused[0], chunked[0], rtol=1e-2, atol=1e-2)


def check_bf16_autocast_over_fp32_parameters():
    case = _softmax_case(3, 24)
    fused = _lse_and_grads(case, fused_negative_logsumexp, autocast=True)
    _assert_bf16_close(fused, _exact_on_bf16_values(case, round_bias=False))


def check_the_head_runs_either_kernel():
    hidden, _, _, negatives, target = _softmax_case(5, 16)
    losses, grads = {}, {}
    for kernel, chunk in (("chunked", 13), ("triton", 13), ("triton", None)):
        torch.manual_seed(5)  # the same head each time
        head = SampledSoftmaxHead(300, 16, init_std=0.5, chunk=chunk, kernel=kernel)
        head.bias.data = torch.linspace(-1, 1, 300)
        h = hidden.clone().requires_grad_(True)
        losses[kernel, chunk] = head.loss(h, target, negatives)
        losses[kernel, chunk].backward()
        grads[kernel, chunk] = (h.grad, head.weight.grad, head.bias.grad)
    for key in (("triton", 13), ("triton", None)):
        torch.testing.assert_close(losses[key], losses["chunked", 13], rtol=1e-5, atol=1e-5)
        for got, want in zip(grads[key], grads["chunked", 13], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert use_triton("triton", torch.device("cpu"), torch.float32)  # the interpreter, as forced


def _eager_scores(hidden, table, bias, padding_first):
    """What the heads' ``scores`` compute."""
    scores = hidden @ table.T + bias
    if padding_first:
        scores[:, 0] = float("-inf")
    return scores.float()


@pytest.mark.parametrize("padding_first", [True, False])
def check_fused_ranks_with_ties_and_nan(padding_first):
    g = torch.Generator().manual_seed(6)
    # Small integers: every score is exact, many are tied, so the id order decides often.
    hidden = torch.randint(-2, 3, (37, 24), generator=g).float()
    table = torch.randint(-1, 2, (150, 24), generator=g).float()
    bias = torch.randint(-2, 3, (150,), generator=g).float() * 0.5
    table[10:20] = table[40]  # duplicate items: equal scores for every user
    bias[10:20] = bias[40]
    target = torch.randint(0, 150, (37,), generator=g)
    target[:4] = torch.tensor([0, 1, 149, 40])  # padding, first and last ids, a duplicated item
    hidden[5] = float("nan")  # a NaN user: its target ranks last
    want = target_ranks(_eager_scores(hidden, table, bias, padding_first), target)
    got = fused_target_ranks(hidden, table, bias, target, padding_first=padding_first)
    assert got.dtype == torch.int64
    assert torch.equal(got, want)
    assert got[5] == 149 and len(set(want.tolist())) > 10


def check_fused_ranks_on_random_scores():
    g = torch.Generator().manual_seed(7)
    hidden, table, bias = (
        torch.randn(33, 32, generator=g),
        torch.randn(301, 32, generator=g),
        torch.randn(301, generator=g),
    )
    target = torch.randint(1, 301, (33,), generator=g)
    want = target_ranks(_eager_scores(hidden, table, bias, True), target)
    assert torch.equal(fused_target_ranks(hidden, table, bias, target, padding_first=True), want)
    target[0] = 301
    with pytest.raises(ValueError, match=r"targets must be item ids in \[0, 301\)"):
        fused_target_ranks(hidden, table, bias, target)


def check_fused_ranks_round_scores_to_bf16_under_autocast():
    g = torch.Generator().manual_seed(8)
    # Integer scores in the thousands: exact in fp32, rounded to 8 bits by a bf16 product (new ties).
    hidden = torch.randint(-8, 9, (33, 16), generator=g).float()
    table = torch.randint(-100, 101, (200, 16), generator=g).float()
    bias = torch.randint(-3, 4, (200,), generator=g).float()
    target = torch.randint(1, 200, (33,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = target_ranks(_eager_scores(hidden, table, bias, True), target)
        got = fused_target_ranks(hidden, table, bias, target, padding_first=True)
    assert torch.equal(got, want)
    assert not torch.equal(want, target_ranks(_eager_scores(hidden, table, bias, True), target))  # rounding mattered


@pytest.mark.parametrize("deterministic", [True, False])
def check_the_backward_is_deterministic_unless_atomics_are_allowed(deterministic):
    """One backward pass, with partial gradients per program group (deterministic) or atomics."""
    case = _softmax_case(9, 24, 77)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        runs = [_lse_and_grads(case, fused_negative_logsumexp, torch.bfloat16) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(was)
    _assert_bf16_close(runs[0], _exact_on_bf16_values(case, round_bias=True))
    if deterministic:
        assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("deterministic", [True, False])
def check_the_table_form_writes_the_same_table_gradients(deterministic):
    """The head's form (``fused_table_logsumexp``: rows gathered inside, the table's gradient out;
    with atomics the kernel adds into the table's rows itself) against the chunked path through
    autograd's gather, repeated negatives included."""
    case = _softmax_case(10, 24, 77)
    hidden, table, bias, negatives, target = case

    h, w, b = (t.clone().requires_grad_(True) for t in (hidden, table, bias))
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        lse = fused_table_logsumexp(h, w, b, negatives, target)
        (lse * torch.linspace(0.5, 1.5, lse.shape[0])).sum().backward()
    finally:
        torch.use_deterministic_algorithms(was)
    want = _lse_and_grads(case, _chunked)
    for name, got, ref in zip(
        ("lse", "hidden", "table", "bias"), (lse.detach(), h.grad, w.grad, b.grad), want, strict=True
    ):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=name)
    assert w.grad.shape == table.shape and (w.grad.abs().sum(1) > 0).sum() == len(set(negatives.tolist()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def check_the_probes_pass_the_kernels(dtype):
    forget_outcomes()
    assert kernel_works("softmax", CPU.device, dtype, 24) and kernel_works("rank", CPU.device, dtype, 24)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    tasks = [("t1", 0.5), ("click", 0.5), ("gender", 0.5)]
    return build_context(load_config(str(tiny_config(tmp_path_factory.mktemp("kernels"), tasks))), None, CPU)


@pytest.mark.parametrize("task_index", [0, 1])
def check_evaluation_with_the_rank_kernel(trainer, task_index):
    info = trainer.infos[task_index]
    head = trainer.model.heads[info.name]
    trainer.masked.set_view("infer", task_index + 1)
    metrics = {}
    for kernel in ("chunked", "triton"):
        head.kernel = kernel
        assert fused_ranking(trainer.masked, info, CPU.device) == (kernel == "triton")
        metrics[kernel] = evaluate_task(trainer.masked, trainer.manifest, info, "test", 64, [1, 5], CPU)
    head.kernel = "auto"
    assert metrics["triton"] == metrics["chunked"]
    assert metrics["chunked"]["count"] > 50 and metrics["chunked"]["hr@5"] > 0
    assert not fused_ranking(trainer.masked, trainer.infos[2], CPU.device)  # class tasks: accuracy


SHARED_LIMITS = {90: 227 * 1024, 80: 163 * 1024}
"""The most shared memory one block may use on sm_90 (H100/H200) and sm_80 (A100)."""


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_the_launched_kernels_compile_fit_and_do_not_spill(arch):
    """``aot`` compiles what the wrappers launch for a T1 step and an evaluation batch at TTL's
    sizes under bf16 autocast (what ``auto`` runs): bf16 operands, fp32 biases, aligned pointers."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "conure_dist.kernels.aot", "--arch", str(arch), "--dtype", "bfloat16"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    kernels = json.loads(result.stdout)["kernels"]["bfloat16"]
    assert set(kernels) == {"softmax_forward", "softmax_backward", "softmax_backward_atomic", "rank"}
    for name, usage in kernels.items():
        assert usage["spill_store_bytes"] == usage["spill_load_bytes"] == 0, (name, usage)
        assert 0 < usage["shared_bytes"] <= SHARED_LIMITS[arch] == usage["shared_limit_bytes"] // 1024 * 1024
        assert usage["registers"] <= 255, (name, usage)
        assert usage["pointer_types"]["h_ptr"] == usage["pointer_types"]["w_ptr"] == "*bf16", (name, usage)
        assert usage["pointer_types"]["b_ptr"] == "*fp32" and {"h_ptr", "w_ptr", "C"} <= set(usage["divisible_by_16"])
    assert kernels["softmax_backward"]["tiles"][:2] == ([128, 128] if arch == 90 else [64, 64])
