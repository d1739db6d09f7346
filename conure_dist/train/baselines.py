"""The baseline loop: the methods Conure is compared with, over the same backbone, data,
training loop and evaluation.

Every method first trains T1 on the whole model (as Conure's first phase does). Then, for each
later task, the method's record (``conure_dist.methods.registry``, where a table lists them all)
says which backbone weights the task starts from, which parameters train, whether T1's loss is
trained jointly, and whether the task keeps its own backbone copy to be served by.

After each task every task so far is evaluated as the method serves it, which gives the same
forgetting matrix as Conure's report. No checkpoints are taken: these runs are for comparisons.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from conure_dist.config import RunConfig
from conure_dist.dist import DistInfo
from conure_dist.methods import METHODS, Method
from conure_dist.methods.patches import patch_names
from conure_dist.model import ConureModel
from conure_dist.train.context import build_context
from conure_dist.train.evaluate import evaluate_task, reference_metrics
from conure_dist.train.metrics import primary_metric_name
from conure_dist.train.state import RunState


def _backbone_names(model: ConureModel) -> list[str]:
    return [f"backbone.{n}" for n, _ in model.backbone.named_parameters()]


def _backbone_state(model: ConureModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.backbone.state_dict().items()}


def later_task_parameters(method: Method, model: ConureModel, task: str, first_task: str) -> list[str]:
    """What trains for a task after the first: its head, plus the whole backbone, or its patches,
    and (joint loss) T1's head, as ``method`` says."""
    names = model.head_names(task)
    if method.trains_backbone:
        names += _backbone_names(model)
    if method.patches:
        names += patch_names(model, task)
    if method.joint_weight:
        names += model.head_names(first_task)
    return names


def start_backbone(
    method: Method, model: ConureModel, cfg: RunConfig, task_index: int, first: dict[str, torch.Tensor] | None
) -> None:
    """Set the backbone a later task starts from: ``first`` (T1's copy), a fresh initialisation
    seeded by the task, or (``current``) as it is."""
    if method.starts_from == "first_task":
        model.backbone.load_state_dict(first)
    elif method.starts_from == "fresh_init":
        torch.manual_seed(cfg.seed * 1000 + task_index)
        model.backbone.reset_parameters(cfg.model.init_std)


def run_baseline(cfg: RunConfig, out: str, dist: DistInfo) -> dict[str, Any]:
    """Run ``cfg.method`` over the configured tasks; return the report (also written to ``out``)."""
    method = METHODS[cfg.method.name]
    start = time.perf_counter()
    context = build_context(cfg, out, dist)
    manifest, infos, model, masked = context.manifest, context.infos, context.model, context.masked
    logger = context.logger
    logger.log("start", config=cfg.to_dict(), world_size=dist.world_size, method=method.name)
    state = RunState()
    backbone = _backbone_names(model)
    first_task = infos[0].name
    served: dict[str, dict[str, torch.Tensor]] = {}  # task -> its own backbone copy (backbone_per_task)
    first_backbone: dict[str, torch.Tensor] | None = None
    metric_names = [primary_metric_name(t.kind, cfg.train.topk) for t in infos]
    for i, (task_cfg, info) in enumerate(zip(cfg.tasks, infos, strict=True)):
        if i == 0:
            names, joint = backbone + model.head_names(info.name), 0.0
        else:
            start_backbone(method, model, cfg, i, first_backbone)
            names = later_task_parameters(method, model, info.name, first_task)
            joint = getattr(cfg.method, method.joint_weight) if method.joint_weight else 0.0
        # T1's head trained jointly belongs to task i's model copy: T1 keeps its own.
        joint_head = i > 0 and method.joint_weight is not None
        t1_head = (
            {n: p.detach().clone() for n, p in model.heads[first_task].state_dict().items()} if joint_head else None
        )
        state.history.append(context.run_phase(i, "train", task_cfg, dense=names, joint_weight=joint))
        if t1_head is not None:
            model.heads[first_task].load_state_dict(t1_head)
        if i == 0 and method.starts_from == "first_task":
            first_backbone = _backbone_state(model)
        if method.backbone_per_task:
            served[info.name] = _backbone_state(model)
        if info.name not in state.reference:
            state.reference[info.name] = reference_metrics(
                manifest, info, "test", cfg.train.topk, cfg.train.eval_max_users
            )
        # One shared backbone serves every task as it now is (for head-only and patch methods,
        # T1's, never changed); a backbone per task serves each its own copy, ending with task i's.
        row = {}
        for j in range(i + 1):
            if method.backbone_per_task:
                model.backbone.load_state_dict(served[infos[j].name])
            masked.set_view(method.serve_view, j + 1)
            row[infos[j].name] = evaluate_task(
                masked,
                manifest,
                infos[j],
                "test",
                cfg.train.eval_batch_size,
                cfg.train.topk,
                dist,
                cfg.train.eval_max_users,
            )
        state.metrics.append(row)
        state.matrix.append([row[t.name][metric_names[j]] if j <= i else None for j, t in enumerate(infos)])
        logger.log("task_done", task=info.name, test=row[info.name], global_step=context.global_step)
        state.task_index = i + 1
    state.wall_seconds = time.perf_counter() - start
    return context.finish(state, _storage(method, model, len(infos), first_task), out)


def _storage(method: Method, model: ConureModel, num_tasks: int, first_task: str) -> dict[str, int]:
    """The backbones kept and the parameters stored to serve every task."""
    backbone = set(_backbone_names(model))
    backbone_size = sum(p.numel() for n, p in model.named_parameters() if n in backbone)
    other = sum(p.numel() for n, p in model.named_parameters() if n not in backbone)
    num_backbones = num_tasks if method.backbone_per_task else 1
    stored = num_backbones * backbone_size + other
    if method.joint_weight:  # each task's model also keeps its jointly trained copy of T1's head
        stored += (num_tasks - 1) * sum(p.numel() for p in model.heads[first_task].parameters())
    return {"num_backbones": num_backbones, "stored_parameters": stored}
