"""The methods Conure is compared with, over the same backbone, data, training loop and evaluation.

Every method first trains T1 on the whole model (as Conure's first phase does). Then, for each
later task, the method decides which parameters train and which backbone the task is served by:

============  ===============================================  ======================  =========
method        trains for task t                                 serves task t with      backbones
============  ===============================================  ======================  =========
finetune      whole model, from the current weights             the one shared model    1 (forgets)
stl           whole model, from T1's weights                    its own copy            N
finesmax      task t's head only                                T1's backbone           1
sinmo         whole model, from a fresh initialisation          its own copy            N
peterrec      task t's head and model patches                   T1's backbone + patches 1
mtl           whole model from T1's weights, loss + w * T1 loss its own copy            N
============  ===============================================  ======================  =========

After each task every task so far is evaluated as the method serves it, which gives the same
forgetting matrix as Conure's report. No checkpoints are taken: these runs are for comparisons.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from conure_dist.config import RunConfig
from conure_dist.dist import DistInfo
from conure_dist.model import ConureModel
from conure_dist.train.context import build_context
from conure_dist.train.evaluate import evaluate_task, reference_metrics
from conure_dist.train.metrics import primary_metric_name
from conure_dist.train.state import RunState

OWN_BACKBONE = {"stl", "sinmo", "mtl"}
"""Methods that keep one backbone per task."""


def _backbone_names(model: ConureModel) -> list[str]:
    return [f"backbone.{n}" for n, _ in model.backbone.named_parameters()]


def _backbone_state(model: ConureModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.backbone.state_dict().items()}


def run_baseline(cfg: RunConfig, out: str, dist: DistInfo) -> dict[str, Any]:
    """Run ``cfg.method`` over the configured tasks; return the report (also written to ``out``)."""
    method = cfg.method.name
    start = time.perf_counter()
    trainer = build_context(cfg, out, dist)
    manifest, infos, model, masked, logger = trainer.manifest, trainer.infos, trainer.model, trainer.masked, trainer.logger
    logger.log("start", config=cfg.to_dict(), world_size=dist.world_size, method=method)
    state = RunState()
    backbone = _backbone_names(model)
    served: dict[str, dict[str, torch.Tensor]] = {}  # task -> its own backbone copy (OWN_BACKBONE methods)
    metric_names = [primary_metric_name(t.kind, cfg.train.topk) for t in infos]
    for i, (task_cfg, info) in enumerate(zip(cfg.tasks, infos, strict=True)):
        head = model.head_names(info.name)
        if i == 0:
            names, joint = backbone + head, 0.0
        elif method == "finetune":
            names, joint = backbone + head, 0.0
        elif method in ("stl", "mtl"):
            model.backbone.load_state_dict(served[infos[0].name])
            names = backbone + head + (model.head_names(infos[0].name) if method == "mtl" else [])
            joint = cfg.method.mtl_t1_weight if method == "mtl" else 0.0
        elif method == "sinmo":
            torch.manual_seed(cfg.seed * 1000 + i)
            model.backbone.reset_parameters(cfg.model.init_std)
            names, joint = backbone + head, 0.0
        elif method == "finesmax":
            names, joint = head, 0.0
        elif method == "peterrec":
            names, joint = head + model.patch_names(info.name), 0.0
        else:
            raise ValueError(f"method '{method}' is not a baseline")
        joint_head = method == "mtl" and i > 0  # T1's head trained jointly belongs to task i's model copy
        t1_head = {n: p.detach().clone() for n, p in model.heads[infos[0].name].state_dict().items()} \
            if joint_head else None
        state.history.append(trainer.run_phase(i, "train", task_cfg, dense=names, joint_weight=joint))
        if joint_head:
            model.heads[infos[0].name].load_state_dict(t1_head)
        if method in OWN_BACKBONE:
            served[info.name] = _backbone_state(model)
        if info.name not in state.reference:
            state.reference[info.name] = reference_metrics(manifest, info, "test", cfg.train.topk)
        # finetune serves every task with the current backbone; finesmax and peterrec never
        # change T1's. The others load each task's own copy, ending with task i's.
        row = {}
        for j in range(i + 1):
            if method in OWN_BACKBONE:
                model.backbone.load_state_dict(served[infos[j].name])
            masked.set_view("dense", j + 1)
            row[infos[j].name] = evaluate_task(masked, manifest, infos[j], "test", cfg.train.eval_batch_size,
                                               cfg.train.topk, dist)
        state.metrics.append(row)
        state.matrix.append([row[t.name][metric_names[j]] if j <= i else None for j, t in enumerate(infos)])
        logger.log("task_done", task=info.name, test=row[info.name], global_step=trainer.global_step)
        state.task_index = i + 1
    state.wall_seconds = time.perf_counter() - start
    backbone_size = sum(p.numel() for n, p in model.named_parameters() if n in set(backbone))
    other = sum(p.numel() for n, p in model.named_parameters() if n not in set(backbone))
    num_backbones = len(infos) if method in OWN_BACKBONE else 1
    stored = num_backbones * backbone_size + other
    if method == "mtl":  # each task's model also keeps its jointly trained copy of T1's head
        stored += (len(infos) - 1) * sum(p.numel() for p in model.heads[infos[0].name].parameters())
    return trainer.finish(state, {"num_backbones": num_backbones, "stored_parameters": stored}, out)
