"""The fused Triton kernels against today's torch paths: correctness, throughput, peak memory.

    python benchmarks/kernels.py --device cuda --json benchmarks/results/kernels_<card>.json
    python benchmarks/kernels.py --device cpu  --json benchmarks/results/kernels_cpu.json

Needs only torch, Triton and numpy (``PYTHONPATH=.``; none of the package's other dependencies).
Sections (``--only`` picks some):

* ``check``: the fused kernels against the chunked softmax and ``target_ranks`` with odd sizes,
  accidental hits, repeated negatives and tied scores, in fp32 and in bf16 (autocast over fp32
  parameters, as training runs); exits non-zero past the stated tolerances (tests/test_kernels.py).
* ``softmax``: T1's sampled-softmax loss, forward and backward through the head (``kernel``
  chunked or triton) at the paper's sizes: batch x (seq - 1) rows, 20% of 646K items as
  negatives, 256 channels, bf16 autocast. Milliseconds per step and peak memory above the inputs.
* ``ranking``: exact rank of each user's target among all 646K items, materialized scores
  (eager, and compiled in bf16) against the fused kernel; users/s (head only, no backbone).
* ``t1_step``: a whole T1 step of ``ConureModel`` (backbone, softmax, Adam) in bf16 with each
  kernel; sequences/s and peak memory. The targets themselves are measured as runs train (L2,
  masked view, the run's sampler) by ``benchmarks/targets.py``.
* ``sweep`` (CUDA): a few other tile sizes per kernel, timed at the paper's sizes.

Each section is guarded: one that fails records its error in the JSON, which is rewritten after
every section, and the next runs.

On CPU every size is tiny and the fused kernels run in Triton's interpreter: the timings there
only show that the script works, not what the kernels do on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from conure_dist.kernels import fused_negative_logsumexp, fused_target_ranks  # noqa: E402
from conure_dist.model import ConureModel, TaskSpec  # noqa: E402
from conure_dist.model.chunked_softmax import negative_logsumexp  # noqa: E402
from conure_dist.train.metrics import target_ranks  # noqa: E402

PRESETS = {
    "cuda": {"items": 646_000, "channels": 256, "batch": 256, "seq_len": 100, "eval_users": 4096, "steps": 10},
    "cpu": {"items": 1_000, "channels": 32, "batch": 4, "seq_len": 9, "eval_users": 32, "steps": 2},
}
NEGATIVE_FRACTION = 0.2
SECTIONS = ("check", "softmax", "ranking", "t1_step", "sweep")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, steps: int, warmup: int = 2) -> dict[str, float]:
    """Seconds per call after ``warmup`` calls (their seconds too), and the peak memory the timed
    calls allocated above what was allocated before them (CUDA)."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    out = {"warmup_s": time.perf_counter() - start}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    out["seconds"] = (time.perf_counter() - start) / steps
    if device.type == "cuda":
        out["peak_extra_gb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    return out


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest entry (inf entries must agree)."""
    finite = torch.isfinite(want)
    if not torch.equal(finite, torch.isfinite(got)) or not torch.equal(got[~finite], want[~finite]):
        return float("inf")
    return ((got - want)[finite].abs().max() / want[finite].abs().max().clamp(min=1e-30)).item()


def softmax_case(n: int, c: int, s: int, items: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden, table = torch.randn(n, c, generator=g), torch.randn(items, c, generator=g) * 0.3
    bias = torch.randn(items, generator=g)
    negatives = torch.randperm(items - 1, generator=g)[:s] + 1
    negatives[: s // 10] = negatives[0]  # a repeated negative
    target = torch.randint(1, items, (n,), generator=g)
    target[: n // 5] = negatives[torch.randint(0, s, (n // 5,), generator=g)]  # accidental hits
    return [t.to(device) for t in (hidden, table, bias, negatives, target)]


def lse_and_grads(case, fn, autocast: bool) -> list[torch.Tensor]:
    hidden, table, bias, negatives, target = case
    h, w, b = (t.detach().clone().requires_grad_(True) for t in (hidden, table, bias))
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=autocast):
        lse = fn(h, w[negatives], b[negatives], negatives, target)
    (lse * torch.linspace(0.5, 1.5, lse.shape[0], device=lse.device)).sum().backward()
    return [t.detach().float() for t in (lse, h.grad, w.grad, b.grad)]


def check(device: torch.device) -> dict:
    """Fused vs torch paths; ``ok`` is False past the tolerances of tests/test_kernels.py."""
    n, c, s, items = (1000, 256, 5000, 20_000) if device.type == "cuda" else (33, 24, 100, 300)
    case = softmax_case(n, c, s, items, device)
    chunked = lse_and_grads(case, lambda *a: negative_logsumexp(*a, chunk=777), False)
    fused = lse_and_grads(case, fused_negative_logsumexp, False)
    out = {"sizes": {"rows": n, "channels": c, "negatives": s, "items": items}}
    out["fp32_rel_err"] = dict(
        zip(("lse", "hidden", "weight", "bias"), map(relative_error, fused, chunked), strict=True)
    )
    # bf16: against fp32 math on the bf16-rounded rows and tables (biases stay fp32 under autocast).
    hidden, table, bias, negatives, target = case
    rounded = [hidden.bfloat16().float(), table.bfloat16().float(), bias, negatives, target]
    exact = lse_and_grads(rounded, lambda *a: negative_logsumexp(*a, chunk=777), False)
    fused_bf16 = lse_and_grads(case, fused_negative_logsumexp, True)
    out["bf16_rel_err"] = dict(
        zip(("lse", "hidden", "weight", "bias"), map(relative_error, fused_bf16, exact), strict=True)
    )
    out["ranks"] = check_ranks(device, n, c, items)
    out["ok"] = (
        all(v <= 1e-5 for v in out["fp32_rel_err"].values())
        and out["bf16_rel_err"]["lse"] <= 1e-5
        and all(out["bf16_rel_err"][k] <= 1e-2 for k in ("hidden", "weight", "bias"))
        and out["ranks"]["integer_scores_equal"]
    )
    return out


def check_ranks(device: torch.device, n: int, c: int, items: int) -> dict:
    """Exact equality where every score is exact (small integers: ties everywhere), and the share
    of users whose rank equals ``target_ranks`` of cuBLAS's scores on random data."""
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, items, (n,), generator=g).to(device)
    out = {}
    ints = [torch.randint(-2, 3, shape, generator=g).float().to(device) for shape in ((n, c), (items, c), (items,))]
    for autocast in (False, True):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            want = target_ranks(scores(*ints), target)
            got = fused_target_ranks(*ints, target, padding_first=True)
        out.setdefault("integer_scores_equal", True)
        out["integer_scores_equal"] &= bool(torch.equal(got, want))
    floats = [torch.randn(shape, generator=g).to(device) for shape in ((n, c), (items, c), (items,))]
    for name, autocast in (("fp32", False), ("bf16", True)):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            want, got = target_ranks(scores(*floats), target), fused_target_ranks(*floats, target, padding_first=True)
        out[f"{name}_random_equal_share"] = (got == want).double().mean().item()
        out[f"{name}_random_max_rank_diff"] = (got - want).abs().max().item()
    return out


def scores(hidden: torch.Tensor, table: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """What T1's head scores (``SampledSoftmaxHead.scores``), as evaluation reads them."""
    out = hidden @ table.T + bias
    out[:, 0] = float("-inf")
    return out.float()


def bench_softmax(p: dict, device: torch.device) -> dict:
    n, s = p["batch"] * (p["seq_len"] - 1), int(NEGATIVE_FRACTION * p["items"])
    hidden, table, bias, negatives, target = softmax_case(n, p["channels"], s, p["items"], device)
    hidden.requires_grad_(True)
    table, bias = table.requires_grad_(True), bias.requires_grad_(True)
    out = {"rows": n, "negatives": s, "channels": p["channels"], "precision": "bf16 autocast"}
    paths = {"chunked": (8192, False, "chunked"), "fused": (8192, False, "triton")}
    if device.type == "cuda":  # today's GPU path: blocks of 32,768 whose element-wise work is compiled
        paths["chunked_compiled"] = (32768, True, "chunked")
    for name, (chunk, compiled, kernel) in paths.items():

        def step(chunk=chunk, compiled=compiled, kernel=kernel):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                lse = negative_logsumexp(
                    hidden, table[negatives], bias[negatives], negatives, target, chunk, compiled, kernel
                )
            lse.sum().backward()
            hidden.grad = table.grad = bias.grad = None

        out[name] = measure(step, device, p["steps"])
        out[name]["rows_per_s"] = n / out[name]["seconds"]
    out["speedup"] = min(out[k]["seconds"] for k in paths if k != "fused") / out["fused"]["seconds"]
    return out


def bench_ranking(p: dict, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(2)
    users, c, v = p["eval_users"], p["channels"], p["items"]
    hidden, table = torch.randn(users, c, generator=g).to(device), (torch.randn(v, c, generator=g) * 0.1).to(device)
    bias, target = torch.randn(v, generator=g).to(device), torch.randint(1, v, (users,), generator=g).to(device)
    out = {"users": users, "items": v, "channels": c}
    for precision, autocast in (("fp32", False), ("bf16", True)):
        paths = {
            "materialized": lambda: target_ranks(scores(hidden, table, bias), target),
            "fused": lambda: fused_target_ranks(hidden, table, bias, target, padding_first=True),
        }
        if autocast and device.type == "cuda":
            paths["materialized_compiled"] = lambda: target_ranks(scores(hidden, table, bias), target, compiled=True)
        for name, fn in paths.items():

            def call(fn=fn, autocast=autocast):
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    fn()

            result = measure(call, device, p["steps"])
            result["users_per_s"] = users / result["seconds"]
            out[f"{precision}_{name}"] = result
        out[f"{precision}_speedup"] = out[f"{precision}_materialized"]["seconds"] / out[f"{precision}_fused"]["seconds"]
    return out


def bench_t1_step(p: dict, device: torch.device, compile_on: bool) -> dict:
    from conure_dist import compiled

    out = {
        "batch": p["batch"],
        "seq_len": p["seq_len"],
        "items": p["items"],
        "channels": p["channels"],
        "compiled_backbone": compile_on,
    }
    g = torch.Generator().manual_seed(3)
    seq = (torch.rand(p["batch"], p["seq_len"], generator=g).pow(3.0) * (p["items"] - 2)).long().add(1).to(device)
    num_negatives = int(NEGATIVE_FRACTION * p["items"])
    for name in ("chunked", "triton"):
        torch.manual_seed(0)
        model = ConureModel(p["items"], [TaskSpec("t1", "sequence", p["items"])], p["channels"], 3, [1, 4] * 4).to(
            device
        )
        if compile_on:
            compiled.compile_model(model)
        model.heads["t1"].kernel = name
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type == "cuda")

        def step(model=model, optimizer=optimizer):
            negatives = torch.randperm(p["items"] - 1, device=device)[:num_negatives] + 1
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss_sum, count = model(seq, "t1", negatives=negatives)
            (loss_sum / count).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        result = measure(step, device, p["steps"], warmup=3)
        result["seq_per_s"] = p["batch"] / result["seconds"]
        if device.type == "cuda":
            result["peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out[name] = result
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["speedup"] = out["chunked"]["seconds"] / out["triton"]["seconds"]
    return out


def bench_sweep(p: dict, device: torch.device) -> dict:
    """Other tiles per kernel at the paper's sizes (bf16): each alone, the others at their defaults."""
    from conure_dist.kernels import sampled_softmax, topk
    from conure_dist.kernels.common import Tiles

    n, s = p["batch"] * (p["seq_len"] - 1), int(NEGATIVE_FRACTION * p["items"])
    hidden, table, bias, negatives, target = softmax_case(n, p["channels"], s, p["items"], device)
    h, w, b = hidden.bfloat16(), table[negatives].bfloat16(), bias[negatives]
    lse = fused_negative_logsumexp(h, w, b, negatives, target).contiguous()
    scale = torch.ones_like(lse)
    candidates = {
        "forward": [Tiles(64, 128, 8, 3), Tiles(128, 64, 8, 3), Tiles(128, 128, 8, 4)],
        "backward": [Tiles(128, 128, 8, 2), Tiles(64, 128, 8, 3), Tiles(128, 64, 8, 3)],
    }
    runs = {
        "forward": lambda t: sampled_softmax._forward(h, w, b, negatives, target, torch.bfloat16, {"forward": t}),
        "backward": lambda t: sampled_softmax._backward(
            h, w, b, negatives, target, lse, scale, torch.bfloat16, {"backward": t}
        ),
    }
    out: dict = {}
    for kind, tiles in candidates.items():
        default = sampled_softmax.pick_tiles(kind, None, torch.bfloat16, p["channels"], device)
        for t in [default, *tiles]:
            key = f"{kind} {t.rows}x{t.cols} w{t.num_warps} s{t.num_stages}"
            try:
                out[key] = measure(lambda t=t, kind=kind: runs[kind](t), device, 3, warmup=1)["seconds"] * 1e3
            except Exception as error:  # a tile that does not fit this GPU: recorded, not fatal
                out[key] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    users = p["eval_users"]
    uh, ut = hidden[:users].bfloat16(), target[:users]
    for t in [*topk.GPU_TILES["16-bit"], Tiles(64, 256, 8, 3)]:
        key = f"rank {t.rows}x{t.cols} w{t.num_warps} s{t.num_stages}"
        try:
            out[key] = (
                measure(lambda t=t: fused_target_ranks(uh, table, bias, ut, True, t), device, 3, warmup=1)["seconds"]
                * 1e3
            )
        except Exception as error:
            out[key] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return {"milliseconds": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, help="these sections (default: all but sweep)")
    parser.add_argument("--steps", type=int)
    parser.add_argument(
        "--compile", action="store_true", help="t1_step: compile the backbone (as dist.compile=auto on CUDA)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first built
    p = {**PRESETS[args.device], **({"steps": args.steps} if args.steps else {})}
    report: dict = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "sizes": p,
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        sys.exit("benchmarks/kernels.py needs triton")
    sections = args.only or [s for s in SECTIONS if s != "sweep"]
    runners = {
        "check": lambda: check(device),
        "softmax": lambda: bench_softmax(p, device),
        "ranking": lambda: bench_ranking(p, device),
        "t1_step": lambda: bench_t1_step(p, device, args.compile),
        "sweep": lambda: bench_sweep(p, device),
    }
    for section in sections:
        try:
            report[section] = runners[section]()
        except Exception as error:  # recorded in the JSON; the next section still runs
            report[section] = {"error": f"{type(error).__name__}: {error}"[:2000], "ok": False}
        text = json.dumps(report, indent=1)
        if args.json:  # after every section: a later one that fails or times out keeps the earlier ones
            with open(args.json, "w") as f:
                f.write(text + "\n")
    print(text)
    if "check" in report and not report["check"]["ok"]:
        sys.exit("the fused kernels are out of tolerance or failed (see check)")
    if any("error" in report[s] for s in sections):
        sys.exit("a section failed (see its error)")


if __name__ == "__main__":
    main()
