"""One finished task as a self-contained inference artifact: ``conure export``.

Layout of the output directory (local disk)::

    model.safetensors  the task's network: backbone with its inference view baked in, the item
                       embedding, the task's own head; no other task's head, no ownership records
    program.pt2        ``torch.export`` program: int64 [batch, input_len] -> scores [batch, outputs],
                       any batch size (``torch.export.load(dir/program.pt2).module()(seq)``)
    vocab.json         only where the manifest records raw ids: {"input": T1 raw ids by item id,
                       "output": the task's raw ids by output id}, each key where recorded
    config.json        written last: what rebuilds the network, the task, the input layout,
                       provenance (checkpoint URL, task checksum) and every file's sha256

Why baked weights: task t's inference view reads a prunable weight where tasks 1..t own it and
zero elsewhere (``MaskedModel``: ``where(owned, W, 0)``). The artifact stores exactly the tensors
that view computes (the same ``where``, so every excluded entry is +0.0 in both), so the plain
network scores bit for bit what ``conure predict`` scores, and ``torch.export`` traces an
ordinary module instead of a ``functional_call`` over masks.

Only Conure checkpoints can be exported (the baselines write none; PeterRec's patches are not
supported).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from conure_dist.continual.views import MaskedModel
from conure_dist.errors import UserError
from conure_dist.fs import write_atomic
from conure_dist.methods import DEFAULT_METHOD, METHODS
from conure_dist.model import ConureModel, TaskSpec
from conure_dist.serving.inference import TrainedRun, load_trained, manifest_for

log = logging.getLogger(__name__)

FORMAT = "conure-export"
FORMAT_VERSION = 1
CONFIG, WEIGHTS, PROGRAM, VOCAB = "config.json", "model.safetensors", "program.pt2", "vocab.json"
EXPORT_FILES = (CONFIG, WEIGHTS, PROGRAM, VOCAB)


class TaskNetwork(nn.Module):
    """One task's plain network: ``forward(seq)`` gives its scores, ``represent(seq)`` the hidden
    vectors its head reads. ``seq`` is int64 [batch, input_len] (see ``task_input``)."""

    def __init__(self, model: ConureModel, task: str) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.kind = model.kinds[task]

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.model(seq, self.task)

    def represent(self, seq: torch.Tensor) -> torch.Tensor:
        return self.model.represent(seq, self.task)


def input_len(kind: str, seq_len: int) -> int:
    """Columns of a task's input: a sequence task reads a placeholder after the history."""
    return seq_len + 1 if kind == "sequence" else seq_len


def task_input(seq_BL: torch.Tensor, kind: str) -> torch.Tensor:
    """Histories [B, seq_len] as ``conure predict`` feeds them to a task: a sequence task scores
    the position after ``seq[:, :-1]``, so a placeholder (0) follows the history."""
    return F.pad(seq_BL, (0, 1)) if kind == "sequence" else seq_BL


def check_exportable(run: TrainedRun, task: str) -> None:
    """A clear error for an unknown or unfinished task, or a checkpoint that is not Conure's."""
    run.check_finished(task)
    method = run.ckpt.meta["config"].get("method", {}).get("name", DEFAULT_METHOD)
    record = METHODS.get(method)
    if (
        record is None
        or record.before_pruning
        or not record.partitions_backbone
        or any(name.startswith("patches.") for name in run.ckpt.model)
    ):
        raise UserError(
            f"{run.ckpt.url}: only Conure checkpoints can be exported or embedded, "
            f"this one was trained with method '{method}'"
        )


def baked_state(run: TrainedRun, task: str) -> dict[str, torch.Tensor]:
    """The task's tensors, by ``ConureModel`` name: every backbone parameter (prunable ones as
    the task's inference view reads them) and the task's head."""
    masked = MaskedModel(run.model, run.ownership)
    masked.set_view("infer", run.task_names.index(task) + 1)
    with torch.no_grad():
        baked = masked.effective_weights()
        state = run.model.state_dict()
        names = [n for n in state if n.startswith("backbone.") and _runs(run.model, task, n)] + run.model.head_names(
            task
        )
        # Own contiguous copies: safetensors refuses tensors that share memory.
        return {name: baked.get(name, state[name]).detach().contiguous().clone() for name in names}


def build_network(model_cfg: dict[str, Any], spec: TaskSpec, state: dict[str, torch.Tensor]) -> TaskNetwork:
    """The one-task network holding ``state`` (built on the meta device: no initialisation)."""
    with torch.device("meta"):
        model = ConureModel(
            model_cfg["num_seq_items"],
            [spec],
            model_cfg["channels"],
            model_cfg["kernel_size"],
            model_cfg["block_dilations"],
        )
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    return TaskNetwork(model, spec.name).eval()


def baked_network(run: TrainedRun, task: str) -> TaskNetwork:
    """The task's network with its view baked in, straight from a loaded checkpoint."""
    spec = TaskSpec(**next(s for s in run.ckpt.meta["tasks"] if s["name"] == task))
    return build_network(_model_config(run, task), spec, baked_state(run, task))


def export_task(ckpt: str, task: str, out: str) -> dict[str, Any]:
    """Write ``task``'s artifact to the local directory ``out`` (see the module docstring), check
    that both ways of loading it reproduce the checkpoint's scores exactly, and summarise it."""
    run = load_trained(ckpt)
    check_exportable(run, task)
    root = _prepare_out(out)
    state = baked_state(run, task)
    spec = TaskSpec(**next(s for s in run.ckpt.meta["tasks"] if s["name"] == task))
    seq_len = int(run.ckpt.meta["seq_len"])
    # Every file through write_atomic: whole or absent after a kill, with the usual mode
    # (safetensors' own save_file leaves 0600).
    write_atomic(str(root / WEIGHTS), safetensors.torch.save(state, metadata={"format": FORMAT, "task": task}))
    network = build_network(_model_config(run, task), spec, state)
    program = torch.export.export(
        network,
        (_probe(2, seq_len, spec.kind, run.ckpt.meta["num_seq_items"]),),
        dynamic_shapes={"seq": {0: torch.export.Dim("batch")}},
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    write_atomic(str(root / PROGRAM), buffer.getvalue())
    class_names, vocab = _manifest_ids(run, task)
    if vocab:
        write_atomic(str(root / VOCAB), json.dumps(vocab))
    config = _config(run, spec, class_names, root)
    write_atomic(str(root / CONFIG), json.dumps(config, indent=1))
    _verify(run, root, spec)
    files = {name: (root / name).stat().st_size for name in EXPORT_FILES if (root / name).exists()}
    return {
        "task": task,
        "kind": spec.kind,
        "out": str(root),
        "checkpoint": run.ckpt.url,
        "files": files,
        "num_parameters": sum(t.numel() for t in state.values()),
        "input": ["batch", config["input_len"]],
        "output": ["batch", spec.num_outputs],
        "verified": True,
    }


def load_exported(path: str | Path) -> TaskNetwork:
    """The network of an export directory, from ``config.json`` and ``model.safetensors`` alone
    (no checkpoint, ownership or data); ``forward(seq)`` returns the task's scores. The weights
    are checked against the sha256 recorded at export."""
    root = Path(path)
    config = read_config(root)
    digest = _sha256(root / WEIGHTS)
    if digest != config["files"][WEIGHTS]["sha256"]:
        raise UserError(
            f"{root / WEIGHTS}: sha256 {digest} differs from the {config['files'][WEIGHTS]['sha256']} "
            f"recorded in {root / CONFIG}"
        )
    # Fresh (64-byte aligned) copies: safetensors places tensors at 8-byte offsets of the file,
    # and the CPU matrix kernels round differently on such data for a batch of 1 to 3 rows.
    state = {name: t.clone() for name, t in safetensors.torch.load_file(str(root / WEIGHTS)).items()}
    spec = TaskSpec(**{k: config["task"][k] for k in ("name", "kind", "num_outputs")})
    return build_network(config["model"], spec, state)


def read_config(root: Path) -> dict[str, Any]:
    """``config.json`` of an export directory, checked to be one this code can read."""
    try:
        config = json.loads((root / CONFIG).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{root}: no {CONFIG}; not a (complete) conure export") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{root / CONFIG}: invalid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{root / CONFIG}: not a conure export (format {FORMAT!r} expected)")
    if config.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{root / CONFIG}: format version {config.get('format_version')}, this code reads {FORMAT_VERSION}"
        )
    return config


def _model_config(run: TrainedRun, task: str) -> dict[str, Any]:
    """The one-task network's architecture: the blocks ``task`` runs (a grown backbone's later
    blocks are not part of an earlier task's network)."""
    cfg = run.ckpt.meta["config"]["model"]
    return {
        "num_seq_items": int(run.ckpt.meta["num_seq_items"]),
        "channels": cfg["channels"],
        "kernel_size": cfg["kernel_size"],
        "block_dilations": run.model.block_dilations(task),
    }


def _runs(model: ConureModel, task: str, name: str) -> bool:
    """Whether the backbone parameter ``name`` is one that ``task`` runs."""
    parts = name.split(".")
    return parts[1] != "blocks" or int(parts[2]) < model.depth(task)


def _prepare_out(out: str) -> Path:
    """The output directory, created or emptied of a previous export's files; anything else in
    it makes the export refuse, so that it never overwrites what it did not write."""
    if "://" in out and not out.startswith("file://"):
        raise UserError(f"--out {out}: export writes to a local directory (copy it to object storage after)")
    root = Path(out.removeprefix("file://"))
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    if root.is_dir():
        present = sorted(p.name for p in root.iterdir())
        foreign = [n for n in present if n not in EXPORT_FILES or not (root / n).is_file()]
        if not foreign and CONFIG in present:
            try:
                read_config(root)
            except ValueError:
                foreign = [CONFIG]
        if foreign:
            raise UserError(
                f"--out {out} is not empty and not a previous conure export (it holds "
                f"{', '.join(foreign[:5])}): choose a new or empty directory"
            )
        # config.json first: a directory without it is never taken for a complete export.
        for name in sorted(present, key=lambda n: n != CONFIG):
            (root / name).unlink()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _manifest_ids(run: TrainedRun, task: str) -> tuple[list[str] | None, dict[str, list[str]]]:
    """Class names and raw ids from the run's manifest where it is readable (both optional)."""
    try:
        manifest = manifest_for(run.ckpt, None)
        info = manifest.task(task)
        vocab = {"input": manifest.load_vocab(run.task_names[0])}
        if info.kind != "class":
            vocab["output"] = manifest.load_vocab(task)
    except (OSError, ValueError) as exc:
        log.warning("manifest not readable (%s): the export records no class names or raw ids", exc)
        return None, {}
    names = list(info.class_names) if info.class_names else None
    return names, {key: ids for key, ids in vocab.items() if ids is not None}


def _config(run: TrainedRun, spec: TaskSpec, class_names: list[str] | None, root: Path) -> dict[str, Any]:
    meta = run.ckpt.meta
    seq_len = int(meta["seq_len"])
    width = input_len(spec.kind, seq_len)
    layout = "int64 [batch, input_len]: T1 item ids, oldest first, left-padded with 0"
    if spec.kind == "sequence":
        layout += "; the last column is a placeholder (0): scores are for the item after the history"
    output = {
        "sequence": "scores of every T1 item (item 0, the padding, is -inf)",
        "item": "scores of every item of the task",
        "class": "logits of every class",
    }[spec.kind]
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": {
            "name": spec.name,
            "kind": spec.kind,
            "num_outputs": spec.num_outputs,
            "id": run.task_names.index(spec.name) + 1,
        },
        "model": _model_config(run, spec.name),
        "seq_len": seq_len,
        "input_len": width,
        "input": layout,
        "output": f"float32 [batch, {spec.num_outputs}]: {output}",
        "source": {
            "checkpoint": run.ckpt.url,
            "task_checksum": meta["state"]["task_checksums"][spec.name],
            "ownership_checksum": meta.get("ownership_checksum"),
            "data_root": meta.get("data_root"),
        },
        "torch_version": torch.__version__,
        "files": {
            name: {"bytes": (root / name).stat().st_size, "sha256": _sha256(root / name)}
            for name in (WEIGHTS, PROGRAM, VOCAB)
            if (root / name).exists()
        },
    }
    if class_names:
        config["class_names"] = class_names
    return config


def _probe(batch: int, seq_len: int, kind: str, num_items: int, seed: int = 0) -> torch.Tensor:
    """Left-padded random histories of every length, shaped as the task reads them."""
    gen = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, num_items, (batch, seq_len), generator=gen)
    lengths = torch.arange(batch) % seq_len + 1
    seq[torch.arange(seq_len)[None, :] < (seq_len - lengths)[:, None]] = 0
    return task_input(seq, kind)


def _verify(run: TrainedRun, root: Path, spec: TaskSpec) -> None:
    """Both loaders of the written artifact must give the checkpoint view's scores bit for bit,
    on a batch of one row (where the CPU kernels are most particular) and of several."""
    masked = MaskedModel(run.model, run.ownership).eval()
    masked.set_view("infer", run.task_names.index(spec.name) + 1)
    loaders = {"load_exported": load_exported(root), "program.pt2": torch.export.load(str(root / PROGRAM)).module()}
    for size in (1, 7):
        probe = _probe(size, int(run.ckpt.meta["seq_len"]), spec.kind, int(run.ckpt.meta["num_seq_items"]), seed=1)
        with torch.no_grad():
            want = masked(probe, spec.name)
            for label, loader in loaders.items():
                scores = loader(probe)
                if not torch.equal(scores, want):
                    raise RuntimeError(
                        f"{root}: {label} scores for {size} histories differ from the checkpoint's "
                        f"inference view (max |diff| {(scores - want).abs().nan_to_num().max().item():.3g})"
                    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
