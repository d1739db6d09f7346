"""Every finished task in one call (``MultiTaskScorer``) vs one ``score_histories`` call per task.

    python benchmarks/multitask.py --device cpu  --json benchmarks/results/multitask_cpu.json
    python benchmarks/multitask.py --device cuda --json benchmarks/results/multitask_<card>.json

The model has random weights at realistic sizes (default: 256 channels, 16 dilated convs
``[1, 2, 4, 8] x 4``, histories of 100, T1 over 50,000 items, two item tasks over 10,000 and
two class tasks), and an ownership that prunes after each task (ratio 0.7) while the weights
still free are redrawn before the next task, as if it had trained them. Per batch size and
history-length profile (``LENGTHS``; the per-task path's cost does not depend on it, the
scorer skips what precedes a chunk's first item):

* ``per_task_s``: the five ``score_histories(view, task, rows)`` calls, each task's view built
  beforehand (as ``conure serve`` keeps them), i.e. what answering every task costs today;
* ``multitask_s``: one ``MultiTaskScorer.score(rows)`` call, the scorer built beforehand
  (``scorer_build_s``: masking every task's kernels once);
* ``speedup`` = per_task_s / multitask_s, each the median over ``--repeats`` interleaved runs
  after ``--warmup`` runs of both (``speedup_of_fastest_runs``: the same for each path's
  fastest run, the one least disturbed where other processes share the cores);
* ``equal``: ``torch.equal`` for every task's scores, with the largest difference and whether
  top-10 items and argmax classes agree.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from bench_report import emit, environment

from conure_dist.continual.ownership import TaskOwnership
from conure_dist.continual.views import MaskedModel
from conure_dist.model import ConureModel, TaskSpec
from conure_dist.serving.inference import score_histories
from conure_dist.serving.multitask import MultiTaskScorer
from conure_dist.serving.multitask_spans import last_position_spans, model_spans


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batches", default="256", help="comma-separated batch sizes (users per call)")
    p.add_argument("--lengths", default="full,ttl", help=f"comma-separated history lengths, of {sorted(LENGTHS)}")
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--dilations", default="1,2,4,8", help="one stack of block dilations")
    p.add_argument("--stacks", type=int, default=4, help="how many times the dilation stack repeats")
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--items", type=int, default=50_000, help="T1 items (the sequence task's outputs)")
    p.add_argument("--item-outputs", default="10000,10000", help="outputs of each item task")
    p.add_argument("--classes", default="2,8", help="classes of each class task")
    p.add_argument("--prune-ratio", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument(
        "--rows-only",
        action="store_true",
        help="print the conv GEMM rows per user of both paths (the work one call can skip) and stop",
    )
    return p.parse_args(argv)


def build(args: argparse.Namespace, device: torch.device) -> tuple[ConureModel, TaskOwnership]:
    """A random model and an ownership pruned after every task, the free weights redrawn between
    tasks (later tasks train them) so that every view differs from the one before; the shared
    parameters and the heads are moved off their start."""
    specs = [TaskSpec("t1", "sequence", args.items)]
    specs += [TaskSpec(f"item{i + 1}", "item", int(n)) for i, n in enumerate(args.item_outputs.split(","))]
    specs += [TaskSpec(f"class{i + 1}", "class", int(n)) for i, n in enumerate(args.classes.split(","))]
    dilations = [int(d) for d in args.dilations.split(",")] * args.stacks
    model = ConureModel(args.items, specs, args.channels, 3, dilations).eval()
    names = set(model.prunable_names())
    params = dict(model.named_parameters())
    ownership = TaskOwnership.empty({n: p.shape for n, p in params.items() if n in names})
    with torch.no_grad():
        for name in model.shared_names():  # layer norms and conv biases, as T1 trains them
            if name != "backbone.embedding.weight":
                params[name].add_(torch.randn_like(params[name]) * 0.05)
        for task_id in range(1, len(specs) + 1):
            ownership.prune(task_id, params, args.prune_ratio)
            for name, owner in ownership.owners.items():
                weight = params[name]
                weight.copy_(torch.where(owner == 0, torch.randn_like(weight) * weight.std(), weight))
        for spec in specs[1:]:  # item and class heads away from their zero/prior start
            for p in model.heads[spec.name].parameters():
                p.normal_(std=0.05)
    return model.to(device), ownership


LENGTHS = {"full": lambda n: (n, n), "ttl": lambda n: (n // 2, n), "uniform": lambda n: (1, n)}
"""History lengths (lowest, highest), drawn uniformly: every history fills all ``seq_len``
positions; as the TTL-scale synthetic data draws them (``data/sources/synthetic_ttl.py``: half
to all of ``seq_len``); any length."""


def histories(batch: int, seq_len: int, items: int, gen: torch.Generator, lengths: str = "uniform") -> torch.Tensor:
    """Random T1 histories, left-padded with 0 as ``pad_history`` makes them."""
    low, high = LENGTHS[lengths](seq_len)
    seqs = torch.randint(1, items, (batch, seq_len), generator=gen)
    drawn = torch.randint(low, high + 1, (batch,), generator=gen)
    return seqs.masked_fill(torch.arange(seq_len)[None, :] < (seq_len - drawn)[:, None], 0)


def conv_gemm_rows(model: ConureModel, seq_len: int) -> dict[str, int | float]:
    """Conv GEMM rows per user and task for a full history: the per-task path computes each
    layer's contiguous window of positions the last state reads, one call only the positions
    inside it that the dilations reach. Every other GEMM operand is the same on both paths, so
    ``per_task / multitask`` bounds what one call saves in conv arithmetic when the rows are
    full histories and the GEMMs run at the same speed on both paths."""

    def rows(spans: list) -> int:
        return sum(mid[0] + out[0] for _, mid, out in spans)

    per_task = rows(model_spans(model, seq_len, len(model.backbone.blocks)))
    multitask = rows(last_position_spans(model.backbone, seq_len))
    return {
        "per_task": per_task,
        "multitask": multitask,
        "every_position": 2 * seq_len * len(model.backbone.blocks),
        "per_task_over_multitask": per_task / multitask,
    }


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def agreement(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor], kinds: dict[str, str]) -> dict:
    """Exact equality per task, the largest absolute difference, and whether the answers a user
    sees (top-10 items, the argmax class) agree."""
    out = {"equal": True, "max_abs_diff": 0.0, "same_answers": True}
    for task, r in ref.items():
        g = got[task]
        finite = torch.isfinite(r)
        out["equal"] &= bool(torch.equal(r, g))
        out["max_abs_diff"] = max(out["max_abs_diff"], float((r[finite] - g[finite]).abs().max()))
        if kinds[task] == "class":
            out["same_answers"] &= bool(torch.equal(r.argmax(1), g.argmax(1)))
        else:
            out["same_answers"] &= bool(torch.equal(r.topk(10).indices, g.topk(10).indices))
    return out


def measure(
    model: ConureModel,
    ownership: TaskOwnership,
    batch: int,
    lengths: str,
    args: argparse.Namespace,
    device: torch.device,
) -> dict:
    gen = torch.Generator().manual_seed(args.seed + batch)
    seqs = histories(batch, args.seq_len, args.items, gen, lengths).to(device)
    views_s, views = timed(lambda: [_view(model, ownership, i + 1) for i in range(len(model.kinds))], device)
    build_s, scorer = timed(lambda: MultiTaskScorer(model, ownership), device)
    tasks = list(model.kinds)

    def per_task() -> dict[str, torch.Tensor]:
        return {task: score_histories(view, task, seqs) for view, task in zip(views, tasks, strict=True)}

    per, multi = [], []
    for i in range(args.warmup + args.repeats):  # interleaved, so drifting load hits both alike
        t_per, ref = timed(per_task, device)
        t_multi, got = timed(lambda: scorer.score(seqs), device)
        if i >= args.warmup:
            per.append(t_per)
            multi.append(t_multi)
    result = {
        "batch": batch,
        "lengths": lengths,
        "mean_length": float((seqs != 0).sum(1).float().mean()),
        "per_task_s": statistics.median(per),
        "multitask_s": statistics.median(multi),
        "per_task_runs_s": per,
        "multitask_runs_s": multi,
        "views_build_s": views_s,
        "scorer_build_s": build_s,
    }
    result["speedup"] = result["per_task_s"] / result["multitask_s"]
    # The fastest run of each is the one least disturbed by other load on a shared machine.
    result["speedup_of_fastest_runs"] = min(per) / min(multi)
    result["users_per_s_per_task_path"] = batch / result["per_task_s"]
    result["users_per_s_multitask"] = batch / result["multitask_s"]
    result.update(agreement(ref, got, model.kinds))
    return result


def _view(model: ConureModel, ownership: TaskOwnership, task_id: int) -> MaskedModel:
    """``inference.task_view`` without a checkpoint: the task's inference view, in eval mode."""
    masked = MaskedModel(model, ownership)
    masked.set_view("infer", task_id)
    return masked.eval()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model, ownership = build(args, device)
    if args.rows_only:
        rows = conv_gemm_rows(model, args.seq_len)
        print(rows)
        return rows
    report = {
        **environment("benchmarks/multitask.py", argv, args.device),
        "sizes": {
            "channels": args.channels,
            "dilations": [int(d) for d in args.dilations.split(",")] * args.stacks,
            "seq_len": args.seq_len,
            "tasks": {n: k for n, k in model.kinds.items()},
            "outputs": {
                n: h.scores(torch.zeros(1, args.channels, device=device)).shape[1] for n, h in model.heads.items()
            },
            "prune_ratio": args.prune_ratio,
            "capacity_free": ownership.capacity().free,
            "conv_gemm_rows_per_user": conv_gemm_rows(model, args.seq_len),
        },
        "load_average_before": os.getloadavg(),
        "results": [
            measure(model, ownership, int(b), lengths, args, device)
            for b in args.batches.split(",")
            for lengths in args.lengths.split(",")
        ],
        "load_average_after": os.getloadavg(),
    }
    emit(report, args.json)
    return report


if __name__ == "__main__":
    main()
