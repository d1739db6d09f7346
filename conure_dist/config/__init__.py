"""Typed, validated run configuration.

A run is described by one YAML file plus ``key=value`` overrides given after the command
(dotted keys: ``train.eval_batch_size=256``, ``tasks.0.epochs=2``; ``tasks.*.epochs=1`` sets a
field of every task). Everything is validated before any compute starts: unknown keys and bad
values raise :class:`ConfigError` naming the key and the file.

Batch sizes are *global*: the number of instances per optimizer step summed over all ranks, so a
config means the same optimization on any number of processes.

The dataclasses live in :mod:`conure_dist.config.schema`, the loading in
:mod:`conure_dist.config.load`; every public name is importable from here.
"""

from conure_dist.config.load import changes_since, config_changes, config_from_dict, load_config
from conure_dist.config.schema import (
    RUN_ONLY_TRAIN_KEYS,
    ConfigError,
    ContinualConfig,
    DataConfig,
    DistConfig,
    MethodConfig,
    ModelConfig,
    RunConfig,
    SyntheticDataConfig,
    TaskConfig,
    TrainConfig,
)

__all__ = [
    "RUN_ONLY_TRAIN_KEYS",
    "ConfigError",
    "ContinualConfig",
    "DataConfig",
    "DistConfig",
    "MethodConfig",
    "ModelConfig",
    "RunConfig",
    "SyntheticDataConfig",
    "TaskConfig",
    "TrainConfig",
    "changes_since",
    "config_changes",
    "config_from_dict",
    "load_config",
]
