"""``prune_ratio: auto``: the largest prune ratio that costs at most ``prune_tolerance`` of a task's
validation score.

After the train phase, the unpruned model's validation score (the phase's selection score,
higher is better) is the reference. Each probe prunes the task at a candidate ratio, retrains
it as the retrain phase would (same seeds), reads the best validation score, then puts the model
and ownership back as they were. The candidates are searched by bisection, assuming that a larger
ratio never scores better: about log2(n) + 1 probes for n candidates. Rank 0 decides whether a
probe passes and broadcasts it, so every rank takes the same path; the caller then prunes at the
chosen ratio and retrains for real (reproducing that probe exactly).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as tdist

from conure_dist.config import TaskConfig
from conure_dist.train.phase import selection_score

if TYPE_CHECKING:
    from conure_dist.train.context import RunContext


def within_tolerance(score: float, unpruned: float, tolerance: float) -> bool:
    """True when ``score`` loses at most ``tolerance`` of ``|unpruned|``."""
    return score >= unpruned - tolerance * abs(unpruned)


def bisect_largest(candidates: list[float], passes) -> tuple[float | None, list[float]]:
    """The largest candidate for which ``passes(ratio)`` holds, assuming that once a ratio fails
    every larger one fails too; None if even the smallest fails. Also returns the ratios tried."""
    ordered = sorted(candidates)
    lo, hi, tried = -1, len(ordered), []
    while hi - lo > 1:
        mid = (lo + hi) // 2
        tried.append(ordered[mid])
        if passes(ordered[mid]):
            lo = mid
        else:
            hi = mid
    return (ordered[lo] if lo >= 0 else None), tried


def _decided_on_rank0(value: bool, trainer: RunContext) -> bool:
    if not trainer.dist.is_distributed:
        return value
    box = [value if trainer.dist.is_main else None]
    tdist.broadcast_object_list(box, src=0)
    return bool(box[0])


def probe_score(trainer: RunContext, task_index: int, task_cfg: TaskConfig, ratio: float) -> float:
    """The task's best validation score after pruning at ``ratio`` and retraining; model and
    ownership are left as they were."""
    model, ownership, name = trainer.model, trainer.ownership, trainer.infos[task_index].name
    keep = set(model.prunable_names() + model.head_names(name))
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if n in keep}
    owners = ownership.state_dict()
    try:
        trainer.prune(task_index, ratio)
        if task_cfg.retrain_epochs > 0:
            return float(trainer.run_phase(task_index, "retrain", task_cfg)["best_valid"])
        valid = trainer.evaluate_view(task_index, "infer", "valid")
        return float(selection_score(trainer.infos[task_index].kind, trainer.cfg.train)(valid))
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
        ownership.load_state_dict(owners)


def choose_prune_ratio(trainer: RunContext, task_index: int, task_cfg: TaskConfig, unpruned: float) -> dict[str, Any]:
    """Search ``continual.prune_candidates`` for ``task_index``; returns the record kept in
    ``RunState.prune_search`` (unpruned score, tolerance, probes, chosen ratio)."""
    name, tolerance = trainer.infos[task_index].name, task_cfg.prune_tolerance
    probes: list[dict[str, Any]] = []

    def passes(ratio: float) -> bool:
        score = probe_score(trainer, task_index, task_cfg, ratio)
        ok = _decided_on_rank0(within_tolerance(score, unpruned, tolerance), trainer)
        probes.append({"ratio": ratio, "valid": score, "within_tolerance": ok})
        trainer.logger.log("prune_probe", task=name, ratio=ratio, valid=score, unpruned=unpruned, passed=ok)
        return ok

    chosen, _ = bisect_largest(trainer.cfg.continual.prune_candidates, passes)
    fallback = chosen is None
    if fallback:  # no candidate within tolerance: keep as many weights as the candidates allow
        chosen = min(trainer.cfg.continual.prune_candidates)
    record = {
        "unpruned": unpruned,
        "tolerance": tolerance,
        "probes": probes,
        "chosen": chosen,
        "none_within_tolerance": fallback,
    }
    trainer.logger.log("prune_ratio", task=name, **record)
    return record
