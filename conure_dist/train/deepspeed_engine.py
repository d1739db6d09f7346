"""DeepSpeed engine (ZeRO stage 0, 1 or 2; fp32 or bf16) behind the same interface.

bf16 runs through DeepSpeed's ``torch_autocast`` mode: parameters and optimizer state stay fp32,
only the computation is bf16. DeepSpeed's own bf16 mode would cast the module's parameters to
bf16, rounding the frozen weights of earlier tasks and so changing their predictions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from torch import nn

from conure_dist.config import DistConfig
from conure_dist.continual.views import MaskedModel
from conure_dist.dist import DistInfo
from conure_dist.train.loss import MicroBatchLoss, training_loss

FORBIDDEN_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                  "bf16", "fp16", "optimizer", "scheduler", "torch_autocast")


def deepspeed_config(per_rank_batch: int, cfg: DistConfig, grad_accum: int = 1) -> dict:
    """The DeepSpeed config: ``dist.deepspeed_config`` (if any) plus what the run config fixes
    (``per_rank_batch`` is the micro-batch: a rank's share of a global batch / ``grad_accum``)."""
    base: dict = {}
    if cfg.deepspeed_config:
        with open(cfg.deepspeed_config) as f:
            try:
                base = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{cfg.deepspeed_config}: not valid JSON: {exc}") from None
        for key in FORBIDDEN_KEYS:
            if key in base:
                raise ValueError(f"{cfg.deepspeed_config}: key '{key}' is set by the run config "
                                 "(tasks.*.batch_size, train.grad_accum, dist.precision, tasks.*.lr); remove it")
        stage = base.get("zero_optimization", {}).get("stage", cfg.zero_stage)
        if stage != cfg.zero_stage:
            raise ValueError(f"{cfg.deepspeed_config}: key 'zero_optimization.stage' is {stage} but "
                             f"dist.zero_stage is {cfg.zero_stage}")
    config = {
        **base,
        "train_micro_batch_size_per_gpu": per_rank_batch,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": {**base.get("zero_optimization", {}), "stage": cfg.zero_stage},
        "gradient_clipping": base.get("gradient_clipping", 0.0),
        "steps_per_print": base.get("steps_per_print", 1 << 30),
    }
    if cfg.precision == "bf16":
        # No module is "lower-precision safe": DeepSpeed would otherwise reduce the gradients of
        # every Linear/Conv parameter in bf16 (ignoring communication_data_type), where DDP
        # reduces fp32 gradients.
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return config


class DeepSpeedEngine:
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
    ) -> None:
        import deepspeed

        self.masked = masked
        self.dist = dist
        self.trainable = trainable
        self.l2 = l2
        # As TorchEngine's: no weight decay (the L2 penalty is in the loss), fused on CUDA.
        optimizer = torch.optim.Adam(list(trainable.values()), lr=lr, weight_decay=0.0,
                                     fused=True if dist.device.type == "cuda" else None)
        self.sharded_state = cfg.zero_stage > 0
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=masked,
            optimizer=optimizer,
            model_parameters=list(trainable.values()),
            config=deepspeed_config(per_rank_batch, cfg, grad_accum),
            dist_init_required=False,
        )

    def train_step(self, micro_batches: Sequence[tuple]) -> torch.Tensor:
        if len(micro_batches) == 1:
            loss_sum, count = self.engine(*micro_batches[0])
            loss, mean = training_loss(self.masked, self.trainable, self.l2, self.dist, loss_sum, count)
            self.engine.backward(loss)
            self.engine.step()
            return mean
        # DeepSpeed accumulates: it divides each backward by gradient_accumulation_steps and
        # steps the optimizer (exchanging gradients) at the last micro-batch only.
        model = self.masked.model
        micro_loss = MicroBatchLoss([model.example_count(m[0], m[1]) for m in micro_batches], self.dist)
        for inputs in micro_batches:
            loss_sum, _ = self.engine(*inputs)
            self.engine.backward(micro_loss(self.masked, self.trainable, self.l2, loss_sum))
            self.engine.step()
        return micro_loss.mean()

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
        if self.sharded_state:
            # ZeRO loads from a list indexed by data-parallel rank; only ours is needed.
            parts = [None] * self.dist.world_size
            parts[self.dist.rank] = state["optimizer"]
            self.optimizer.load_state_dict(parts)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
