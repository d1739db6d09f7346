"""DeepSpeed engine (ZeRO stage 0, 1 or 2; fp32 or bf16) behind the same interface.

bf16 runs through DeepSpeed's ``torch_autocast`` mode: parameters and optimizer state stay fp32,
only the computation is bf16. DeepSpeed's own bf16 mode would cast the module's parameters to
bf16, rounding the frozen weights of earlier tasks and so changing their predictions.

ZeRO-1/2 optimizer state saved by one number of ranks loads on another (elastic resume): see
``reshard_zero_state``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from conure_dist.config import DistConfig
from conure_dist.continual.views import MaskedModel
from conure_dist.dist import DistInfo
from conure_dist.errors import UserError
from conure_dist.train.loss import MicroBatchLoss, training_loss
from conure_dist.train.profile import StepTimer

log = logging.getLogger(__name__)

FORBIDDEN_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "bf16",
    "fp16",
    "optimizer",
    "scheduler",
    "torch_autocast",
)


def deepspeed_config(
    per_rank_batch: int, cfg: DistConfig, grad_accum: int = 1, clip_grad_norm: float | None = None
) -> dict:
    """The DeepSpeed config: ``dist.deepspeed_config`` (if any) plus what the run config fixes
    (``per_rank_batch`` is the micro-batch: a rank's share of a global batch / ``grad_accum``)."""
    base: dict = {}
    if cfg.deepspeed_config:
        with open(cfg.deepspeed_config) as f:
            try:
                base = json.load(f)
            except json.JSONDecodeError as exc:
                raise UserError(f"{cfg.deepspeed_config}: not valid JSON: {exc}") from None
        for key in FORBIDDEN_KEYS:
            if key in base:
                raise UserError(
                    f"{cfg.deepspeed_config}: key '{key}' is set by the run config "
                    "(tasks.*.batch_size, train.grad_accum, dist.precision, tasks.*.lr); remove it"
                )
        if clip_grad_norm is not None and base.get("gradient_clipping", clip_grad_norm) != clip_grad_norm:
            raise UserError(
                f"{cfg.deepspeed_config}: 'gradient_clipping' is {base['gradient_clipping']} but "
                f"train.clip_grad_norm is {clip_grad_norm}; set one of them"
            )
        stage = base.get("zero_optimization", {}).get("stage", cfg.zero_stage)
        if stage != cfg.zero_stage:
            raise UserError(
                f"{cfg.deepspeed_config}: key 'zero_optimization.stage' is {stage} but "
                f"dist.zero_stage is {cfg.zero_stage}"
            )
    config = {
        **base,
        "train_micro_batch_size_per_gpu": per_rank_batch,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": {**base.get("zero_optimization", {}), "stage": cfg.zero_stage},
        "gradient_clipping": clip_grad_norm if clip_grad_norm is not None else base.get("gradient_clipping", 0.0),
        "steps_per_print": base.get("steps_per_print", 1 << 30),
    }
    if cfg.precision == "bf16":
        # No module is "lower-precision safe": DeepSpeed would otherwise reduce the gradients of
        # every Linear/Conv parameter in bf16 (ignoring communication_data_type), where DDP
        # reduces fp32 gradients.
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return config


class DeepSpeedEngine:
    timer: StepTimer | None = None

    def __init__(
        self,
        masked: MaskedModel,
        trainable: dict[str, nn.Parameter],
        lr: float,
        l2: float,
        dist: DistInfo,
        cfg: DistConfig,
        per_rank_batch: int = 1,
        grad_accum: int = 1,
        clip_grad_norm: float | None = None,
    ) -> None:
        import deepspeed

        self.masked = masked
        self.dist = dist
        self.trainable = trainable
        self.l2 = l2
        # As TorchEngine's: no weight decay (the L2 penalty is in the loss), fused on CUDA.
        optimizer = torch.optim.Adam(
            list(trainable.values()), lr=lr, weight_decay=0.0, fused=True if dist.device.type == "cuda" else None
        )
        self.sharded_state = cfg.zero_stage > 0
        self.state_classes = zero_state_classes()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=masked,
            optimizer=optimizer,
            model_parameters=list(trainable.values()),
            config=deepspeed_config(per_rank_batch, cfg, grad_accum, clip_grad_norm),
            dist_init_required=False,
        )

    def attach_timer(self, timer: StepTimer) -> None:
        """Time steps and count their collectives (``train.step_timing``): DeepSpeed exchanges
        inside ``backward`` and ``step``, so its exchange time stays in those parts."""
        self.timer = timer

    def train_step(self, micro_batches: Sequence[tuple]) -> torch.Tensor:
        if self.timer is None:
            return self._train_step(micro_batches)
        with self.timer.comm.counting():
            return self._train_step(micro_batches)

    def _train_step(self, micro_batches: Sequence[tuple]) -> torch.Tensor:
        if len(micro_batches) == 1:
            loss_sum, count = self.engine(*micro_batches[0])
            loss, mean = training_loss(self.masked, self.trainable, self.l2, self.dist, loss_sum, count)
            self.engine.backward(loss)
            if self.timer is not None:
                self.timer.mark("forward_backward")
            self.engine.step()
            if self.timer is not None:
                self.timer.mark("optimizer")
            return mean
        # DeepSpeed accumulates: it divides each backward by gradient_accumulation_steps and
        # steps the optimizer (exchanging gradients) at the last micro-batch only.
        model = self.masked.model
        micro_loss = MicroBatchLoss([model.example_count(m[0], m[1]) for m in micro_batches], self.dist)
        for inputs in micro_batches:
            loss_sum, _ = self.engine(*inputs)
            self.engine.backward(micro_loss(self.masked, self.trainable, self.l2, loss_sum))
            self.engine.step()
        if self.timer is not None:  # the exchange happens inside the last step: no finer split
            self.timer.mark("forward_backward")
        return micro_loss.mean()

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next steps (``train.lr_schedule``): ZeRO's optimizer shares
        its parameter groups with the wrapped Adam."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def close(self) -> None:
        """Unhook this phase's engine from the model. DeepSpeed's forward hooks on the module and
        ZeRO's gradient hooks on the parameters would otherwise keep every earlier phase's engine,
        optimizer state included, alive, and its gradient hooks running, for the rest of the run."""
        self.engine.destroy()
        for name in ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check"):
            hook = getattr(self.engine, name, None)
            if hook is not None:
                hook.remove()
                setattr(self.engine, name, None)

    def load_state_dict(self, state: dict) -> None:
        """Load ``{"optimizer": part}`` (unsharded state, or this rank's ZeRO part saved by as
        many ranks) or ``{"shards": SavedShards}`` (every saving rank's ZeRO part, read on
        demand): from as many ranks in ZeRO's own rigid format, only this rank's part is read and
        DeepSpeed loads it as saved; otherwise the parts are re-partitioned for this world."""
        if not self.sharded_state:
            self.optimizer.load_state_dict(state["optimizer"])
            return
        shards: SavedShards | None = state.get("shards")
        if shards is None:
            own = state["optimizer"]
        else:
            same_world = shards.world_size == self.dist.world_size
            own = shards.read(self.dist.rank)["optimizer"] if same_world else None
            # DeepSpeed's own load needs every part for its elastic format (a list, not the rigid dict).
            if own is None or not isinstance(own.get("base_optimizer_state"), dict):
                if self.dist.is_main:
                    log.info(
                        "re-partitioning the ZeRO optimizer state of %d ranks for %d",
                        shards.world_size,
                        self.dist.world_size,
                    )
                own = reshard_zero_state(self.optimizer, shards)
        # ZeRO loads from a list indexed by data-parallel rank; only ours is read.
        parts: list[dict | None] = [None] * self.dist.world_size
        parts[self.dist.rank] = own
        self.optimizer.load_state_dict(parts)


def zero_state_classes() -> tuple[type, ...]:
    """What DeepSpeed's ZeRO optimizer state holds besides tensors and plain containers: its loss
    scaler (a static one under fp32 and bf16), the stage as an enum, and each parameter's
    fragment address in the flat partition."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


@dataclass(frozen=True)
class SavedShards:
    """A ZeRO checkpoint's optimizer parts: ``read(r)`` loads the ``{"optimizer": ...}`` that
    rank ``r`` of the ``world_size`` ranks of the saving run wrote. Read one at a time, so that
    re-partitioning never holds more than one old part besides this rank's new one."""

    world_size: int
    read: Callable[[int], dict]


@dataclass(frozen=True)
class _Target:
    """Where one parameter's slice owned by this rank goes: elements ``[lp_start, lp_start +
    numel)`` of the flattened parameter sit at ``hp_start`` of this rank's flat partition."""

    group: int
    lp_start: int
    hp_start: int
    numel: int


def reshard_zero_state(zero: Any, shards: SavedShards) -> dict:
    """This rank's part of a ZeRO-1/2 optimizer state for ``zero`` (a DeepSpeedZeroOptimizer),
    built from the parts saved by ``shards.world_size`` ranks, in DeepSpeed's own rigid per-rank
    format, so that ``zero.load_state_dict`` loads it as if this world had saved it.

    Why it is exact: ZeRO-1/2 flattens each parameter group into one buffer, padded at the end
    (and, with ``parameter_alignment``, after each parameter), and gives rank r the r-th equal
    slice; every saved part names, per parameter, the fragment of its slice holding that
    parameter (``param_slice_mappings``: name -> (start, numel), DeepSpeed's universal-checkpoint
    map). A parameter is contiguous in the flat buffer, so its fragments in saving-rank order
    are the flattened parameter in order. Each Adam tensor (``exp_avg``, ``exp_avg_sq``) is
    copied fragment by fragment into the slices this rank now owns (``param._hp_mapping``: the
    parameter's range and its place in the new partition); padding stays zero, as it is in
    training (its gradient is zero). Scalars (``step``) and the optimizer hyper-parameters come
    from rank 0's part. The fp32 master weights are not taken from the parts: DeepSpeed copies
    them from the model's parameters, which are fp32 here (bf16 is autocast only), so exactly
    the saved ones once the checkpoint's model is loaded."""
    from deepspeed.checkpoint import constants as c

    targets: dict[str, _Target] = {}
    sizes: dict[str, int] = {}
    for group, params in enumerate(zero.bit16_groups):
        for param in params:
            name = zero.param_names[param]
            sizes[name] = param.numel()
            mapping = param._hp_mapping
            if mapping is not None:
                targets[name] = _Target(
                    group,
                    mapping.lp_fragment_address.start,
                    mapping.hp_fragment_address.start,
                    mapping.lp_fragment_address.numel,
                )
    partitions = zero.single_partition_of_fp32_groups
    new: list[dict[str, Any]] = [{} for _ in partitions]
    seen: dict[str, int] = {}
    copied = dict.fromkeys(targets, 0)
    first: dict | None = None
    for rank in range(shards.world_size):
        saved = shards.read(rank)["optimizer"]
        if first is None:
            first = {
                k: v for k, v in saved.items() if k not in (c.BASE_OPTIMIZER_STATE, c.SINGLE_PARTITION_OF_FP32_GROUPS)
            }
            first["param_groups"] = _param_groups(saved, zero, c)
        mappings = saved.get(c.PARAM_SLICE_MAPPINGS)
        if mappings is None:
            raise UserError(
                f"the checkpoint's ZeRO state (DeepSpeed {saved.get(c.DS_VERSION)}) does not map its "
                f"partitions to parameters: resume it on the {shards.world_size} processes that saved it"
            )
        if len(mappings) != len(partitions):
            raise UserError(
                f"the checkpoint's ZeRO state has {len(mappings)} parameter groups, this optimizer {len(partitions)}"
            )
        for group, mapping in enumerate(mappings):
            flat, scalars = _group_state(saved, group, c)
            for key, value in scalars.items():
                new[group].setdefault(key, value)
            for name, address in mapping.items():
                begin = seen.get(name, 0)
                seen[name] = end = begin + address.numel
                target = targets.get(name)
                if target is None:
                    continue
                if target.group != group:
                    raise UserError(
                        f"the checkpoint's ZeRO state has {name} in parameter group {group}, "
                        f"this optimizer in group {target.group}"
                    )
                lo, hi = max(begin, target.lp_start), min(end, target.lp_start + target.numel)
                if lo >= hi:
                    continue
                for key, values in flat.items():
                    dst = new[group].setdefault(key, torch.zeros(partitions[group].numel(), dtype=values.dtype))
                    dst[target.hp_start + lo - target.lp_start : target.hp_start + hi - target.lp_start].copy_(
                        values[address.start + lo - begin : address.start + hi - begin]
                    )
                copied[name] += hi - lo
        del saved
    wrong = sorted(n for n in sizes if seen.get(n, 0) != sizes[n]) + sorted(set(seen) - set(sizes))
    if wrong:
        raise UserError(f"the checkpoint's ZeRO state does not cover the same parameters as this phase: {wrong}")
    assert all(copied[n] == t.numel for n, t in targets.items()), "a fragment of this rank's partition was not filled"
    assert first is not None
    param_groups = first.pop("param_groups")
    ids = [g["params"][0] for g in param_groups]
    return {
        **first,
        c.BASE_OPTIMIZER_STATE: {
            "state": {i: state for i, state in zip(ids, new, strict=True) if state},
            "param_groups": param_groups,
        },
        c.SINGLE_PARTITION_OF_FP32_GROUPS: [p.detach().clone() for p in partitions],
        c.GROUP_PADDINGS: list(zero.groups_padding),
        c.PARTITION_COUNT: list(zero.partition_count),
        c.PARAM_SLICE_MAPPINGS: zero._param_slice_mappings,
        **(
            {c.PARAM_ALIGNMENT_PADDINGS: zero.round_robin_bit16_padding}
            if hasattr(zero, "round_robin_bit16_padding")
            else {}
        ),
    }


def _param_groups(saved: dict, zero: Any, c: Any) -> list[dict]:
    """The base optimizer's parameter groups (one flat parameter each) with their
    hyper-parameters: a rigid part's own (as DeepSpeed's same-size load restores them); an
    elastic part (``zero_optimization.elastic_checkpoint``) saves none, so this optimizer's."""
    base = saved[c.BASE_OPTIMIZER_STATE]
    return base["param_groups"] if isinstance(base, dict) else zero.optimizer.state_dict()["param_groups"]


def _group_state(saved: dict, group: int, c: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One group's saved base-optimizer state: the tensors laid out like the rank's flat slice
    (Adam's moments; padded in a rigid part, without padding in an elastic one) and the rest
    (``step``)."""
    base = saved[c.BASE_OPTIMIZER_STATE]
    lean = saved[c.SINGLE_PARTITION_OF_FP32_GROUPS][group].numel()
    if isinstance(base, dict):
        state = base["state"].get(base["param_groups"][group]["params"][0], {})
        lengths = {lean + saved[c.GROUP_PADDINGS][group]}
    else:
        state = dict(base[group])
        if c.BASE_OPTIMIZER_STATE_STEP in saved:
            state.setdefault("step", saved[c.BASE_OPTIMIZER_STATE_STEP])
        lengths = {lean}
    flat = {k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() == 1 and v.numel() in lengths}
    return flat, {k: v for k, v in state.items() if k not in flat}
