"""Where a run's events go besides ``log.jsonl``: TensorBoard by default, Weights & Biases or
MLflow on request, all behind one small interface (``Sink``).

The JSONL logger hands every event to the sinks (rank 0 only). Each maps the events it knows to
its own calls: per-step training figures (``step``: loss, sequences/s, learning rate, peak GPU
memory), per-epoch validation metrics (``epoch``), and each finished task's test metrics and the
share of conv weights every task owns (``task_done``, one curve per task name). The x axis is
the run's optimizer step, strictly increasing on every curve of every sink (``Curves``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Protocol

import fsspec

from conure_dist.errors import UserError
from conure_dist.fs import is_local, join

log = logging.getLogger(__name__)


class Sink(Protocol):
    def log(self, event: str, fields: dict[str, Any]) -> None: ...
    def flush(self) -> None:
        """Make what was logged visible (called at every checkpoint and at the end)."""

    def close(self) -> None: ...


def scalars(event: str, fields: dict[str, Any], task_names: list[str] = ()) -> dict[str, float]:
    """The scalar series an event adds (tag -> value), the same for every sink. ``task_names``:
    the run's tasks in order, which name the capacity curves (task id t is the t-th task)."""
    out: dict[str, float] = {}
    task, phase = fields.get("task"), fields.get("phase")
    if event == "step":
        for key in ("loss", "sequences_per_s", "lr", "gpu_memory_gb"):
            if fields.get(key) is not None:
                out[f"train/{task}/{key}"] = fields[key]
    elif event == "epoch":
        if fields.get("loss") is not None:
            out[f"epoch_loss/{task}/{phase}"] = fields["loss"]
        valid = fields.get("valid") or {}  # None: train.validation is off
        out.update({f"valid/{task}/{name}": value for name, value in valid.items() if name != "count"})
    elif event == "task_done":
        out.update({f"test/{task}/{name}": value for name, value in fields["test"].items() if name != "count"})
        capacity = fields.get("capacity")
        if capacity:
            out["capacity/free_fraction"] = capacity["free_fraction"]
            for task_id, fraction in capacity["owned_fraction"].items():
                t = int(task_id)
                out[f"capacity/owned_by_{task_names[t - 1] if t <= len(task_names) else f'task_{t}'}"] = fraction
    return out


class Curves:
    """An event's points for every sink: ``scalars`` grouped by the step each is drawn at.

    Each tag's steps strictly increase: a point logged at a step its tag already has (the
    retrain's first validation, before any retrain step, shares the train phase's last step)
    goes one step later, so that a curve never folds back on itself."""

    def __init__(self, task_names: list[str] = ()) -> None:
        self.task_names = list(task_names)
        self.last_step: dict[str, int] = {}

    def points(self, event: str, fields: dict[str, Any]) -> dict[int, dict[str, float]]:
        """Step -> the tags and values to log at it (empty for an event without scalars)."""
        out: dict[int, dict[str, float]] = {}
        for tag, value in scalars(event, fields, self.task_names).items():
            step = fields.get("global_step", 0)
            if tag in self.last_step:
                step = max(step, self.last_step[tag] + 1)
            self.last_step[tag] = step
            out.setdefault(step, {})[tag] = value
        return out


class TensorBoardSink:
    """Event files under ``{out}/tensorboard``. Object stores cannot append: for an ``s3://``
    run the files are written to a local folder and uploaded at every flush (phase ends)."""

    def __init__(self, out: str, task_names: list[str] = ()) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.remote = None if is_local(out) else join(out, "tensorboard")
        self.dir = (
            _local_path(join(out, "tensorboard")) if self.remote is None else tempfile.mkdtemp(prefix="conure-tb-")
        )
        self.writer = SummaryWriter(self.dir)
        self.curves = Curves(task_names)
        # The local copy of a remote run's event files goes when the sink closes, or at the
        # latest when the process exits (an error ends the run without closing it).
        self._remove_copy = (
            weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True) if self.remote is not None else None
        )

    def log(self, event: str, fields: dict[str, Any]) -> None:
        for step, values in self.curves.points(event, fields).items():
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()
        if self.remote is not None:
            fs, root = fsspec.core.url_to_fs(self.remote)
            for name in os.listdir(self.dir):
                fs.put_file(os.path.join(self.dir, name), f"{root.rstrip('/')}/{name}")

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self._remove_copy is not None:
            self._remove_copy()


class WandbSink:
    """Weights & Biases (``pip install wandb``; ``WANDB_MODE=offline`` works without a network)."""

    def __init__(self, out: str, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise UserError("train.sinks lists 'wandb' but wandb is not installed: pip install wandb") from None
        local = _local_path(out) if is_local(out) else tempfile.mkdtemp(prefix="conure-wandb-")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "conure_dist"), dir=local, config=config)
        self.curves = Curves(_task_names(config))
        # Several events share an optimizer step: each is its own row, plotted against global_step.
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")

    def log(self, event: str, fields: dict[str, Any]) -> None:
        for step, values in self.curves.points(event, fields).items():
            self.run.log({"global_step": step, **values})

    def flush(self) -> None:
        """W&B sends in the background."""

    def close(self) -> None:
        self.run.finish()


class MLflowSink:
    """MLflow (``pip install mlflow-skinny``), to ``MLFLOW_TRACKING_URI`` or ``{out}/mlruns``."""

    def __init__(self, out: str, config: dict[str, Any]) -> None:
        try:
            import mlflow
        except ImportError:
            raise UserError(
                "train.sinks lists 'mlflow' but mlflow is not installed: pip install mlflow-skinny"
            ) from None
        if "MLFLOW_TRACKING_URI" not in os.environ:
            if not is_local(out):
                raise UserError(
                    f"train.sinks lists 'mlflow' for --out {out}: set MLFLOW_TRACKING_URI (MLflow "
                    "keeps its own tracking store; it cannot write one into an object store)"
                )
            # A file store needs no database; MLflow 3 keeps it (in maintenance) behind this switch.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(Path(_local_path(join(out, "mlruns"))).absolute().as_uri())
        self.mlflow = mlflow
        self.curves = Curves(_task_names(config))
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "conure_dist"))
        self.run = mlflow.start_run()
        flat = {k: str(v)[:250] for k, v in _flatten(config).items()}
        for start in range(0, len(flat), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params(dict(list(flat.items())[start : start + 100]))

    def log(self, event: str, fields: dict[str, Any]) -> None:
        for step, values in self.curves.points(event, fields).items():
            self.mlflow.log_metrics({tag.replace("@", "_at_"): v for tag, v in values.items()}, step=step)

    def flush(self) -> None:
        """MLflow writes each call through."""

    def close(self) -> None:
        self.mlflow.end_run()


def _local_path(url: str) -> str:
    """A local path from a local path or ``file://`` URL (made if missing)."""
    path = fsspec.core.url_to_fs(url)[1]
    os.makedirs(path, exist_ok=True)
    return path


def _task_names(config: dict[str, Any]) -> list[str]:
    return [t["name"] for t in config.get("tasks", [])]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def make_sinks(names: list[str], out: str, config: dict[str, Any]) -> list[Sink]:
    """The sinks ``train.sinks`` names, writing under the run directory ``out``."""
    makers = {
        "tensorboard": lambda: TensorBoardSink(out, _task_names(config)),
        "wandb": lambda: WandbSink(out, config),
        "mlflow": lambda: MLflowSink(out, config),
    }
    return [makers[name]() for name in names]
