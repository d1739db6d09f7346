"""Using a trained run: load a checkpoint's model, evaluate its finished tasks, predict for new
histories. ``conure eval`` and ``conure predict`` call these."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import torch

from conure_dist import compiled
from conure_dist.checkpoint.format import Checkpoint, load_checkpoint, resolve_checkpoint
from conure_dist.continual.audit import model_from_checkpoint, verify_run
from conure_dist.continual.ownership import TaskOwnership
from conure_dist.continual.views import MaskedModel
from conure_dist.data.manifest import Manifest
from conure_dist.data.stream import iter_batches
from conure_dist.dist import DistInfo
from conure_dist.errors import UserError
from conure_dist.model import ConureModel
from conure_dist.train.evaluate import evaluate_task

log = logging.getLogger(__name__)


@dataclass
class TrainedRun:
    """A checkpoint with its model rebuilt and its ownership records."""

    ckpt: Checkpoint
    model: ConureModel
    ownership: TaskOwnership

    @property
    def task_names(self) -> list[str]:
        return [s["name"] for s in self.ckpt.meta["tasks"]]

    @property
    def finished(self) -> list[str]:
        """The tasks the checkpoint has finished (pruned, retrained and checksummed), in order."""
        done = self.ckpt.meta["state"]["task_checksums"]
        return [name for name in self.task_names if name in done]

    def check_finished(self, task: str, flag: str = "--task") -> None:
        if task not in self.task_names:
            raise UserError(f"{flag}: no task '{task}' in {self.ckpt.url} (its tasks: {', '.join(self.task_names)})")
        if task not in self.finished:
            raise UserError(
                f"{flag}: task '{task}' is not finished in {self.ckpt.url} (finished: {', '.join(self.finished)})"
            )


def load_trained(path: str) -> TrainedRun:
    """A checkpoint folder, or the newest committed checkpoint of a run directory."""
    ckpt = load_checkpoint(resolve_checkpoint(path))
    model, ownership = model_from_checkpoint(ckpt)
    verify_run(ckpt, model, ownership)  # altered frozen weights are refused, whatever COMMIT says
    return TrainedRun(ckpt, model, ownership)


def manifest_for(ckpt: Checkpoint, data_root: str | None) -> Manifest:
    """The run's manifest, or the one at ``data_root`` if it describes the checkpoint's tasks."""
    root = data_root or ckpt.meta["data_root"]
    manifest = Manifest.load(root)
    differ = [
        ("num_seq_items", manifest.num_seq_items, ckpt.meta["num_seq_items"]),
        ("seq_len", manifest.seq_len, ckpt.meta["seq_len"]),
    ]
    for spec in ckpt.meta["tasks"]:
        try:
            info = manifest.task(spec["name"])
        except ValueError:
            differ.append((f"task '{spec['name']}'", "missing", "present"))
            continue
        differ += [
            (f"task '{spec['name']}' kind", info.kind, spec["kind"]),
            (f"task '{spec['name']}' outputs", info.num_outputs, spec["num_outputs"]),
        ]
    wrong = [f"{key} is {have} there, {want} in the checkpoint" for key, have, want in differ if have != want]
    if wrong:
        raise UserError(f"{root}: these shards do not match the checkpoint {ckpt.url}: {'; '.join(wrong)}")
    return manifest


def evaluate_finished(run: TrainedRun, manifest: Manifest, split: str, dist: DistInfo) -> dict[str, dict[str, float]]:
    """Every finished task's metrics on ``split``, each under its inference view; sharded over
    the ranks of a process group. Compiled where the run's ``dist.compile`` would compile here."""
    train_cfg = run.ckpt.meta["config"]["train"]
    compiled.compile_if(run.model, run.ckpt.meta["config"]["dist"].get("compile", "auto"), dist.device)
    masked = MaskedModel(run.model.to(dist.device), run.ownership)
    results = {}
    for index, name in enumerate(run.finished):
        masked.set_view("infer", index + 1)
        results[name] = evaluate_task(
            masked, manifest, manifest.task(name), split, train_cfg["eval_batch_size"], train_cfg["topk"], dist
        )
    return results


SCORE_ROW_MULTIPLE = 16
"""``score_histories`` pads its batch to a multiple of this many rows. BLAS kernels take other
paths (another summation order) for a few rows than for many, which moves the last bits of a
score; from 16 rows on, a row's scores on the CPU no longer depend on how many rows share the
pass. So a history scores the same in ``conure predict`` whatever else its file holds, and in
``conure serve`` whatever it was batched with."""


PREDICT_ROWS = 256
"""Histories ``predict`` scores per pass (a multiple of ``SCORE_ROW_MULTIPLE``, so the same
scores): memory holds [256, items] scores whatever the input file's length."""


def check_history(seq: Any, num_items: int) -> list[int]:
    """``seq`` itself if it is a history of T1 item ids (integers in 0..num_items-1, 0 being
    padding, at least one item); else a ValueError that says what is wrong."""
    if not isinstance(seq, list) or not all(type(x) is int for x in seq):
        raise UserError(f"'seq' must be a list of integer item ids, got {seq!r}")
    outside = [x for x in seq if not 0 <= x < num_items]
    if outside:
        raise UserError(f"item ids {outside[:5]} are outside the T1 vocabulary 1..{num_items - 1}")
    if not any(seq):
        raise UserError("the sequence has no item (0 is padding)")
    return seq


def pad_history(seq: list[int], seq_len: int) -> list[int]:
    """The model's input row for a history: its last ``seq_len`` items, left-padded with 0."""
    return ([0] * seq_len + seq)[-seq_len:]


def task_view(run: TrainedRun, task: str) -> MaskedModel:
    """The model as ``task`` answers: under the task's inference view, in eval mode."""
    masked = MaskedModel(run.model, run.ownership)
    masked.set_view("infer", run.task_names.index(task) + 1)
    masked.eval()
    return masked


def score_histories(masked: MaskedModel, task: str, seqs_BL: torch.Tensor) -> torch.Tensor:
    """float scores [B, outputs] of ``task`` for padded history rows [B, seq_len], without
    gradients. The batch is padded to a multiple of ``SCORE_ROW_MULTIPLE`` rows (copies of its
    first) so that each row's scores do not depend on the batch they came in."""
    if masked.model.kinds[task] == "sequence":
        # A sequence task scores the position after seq[:, :-1] (in evaluation the last item is
        # the target); a placeholder after the history makes it score what follows all of it.
        seqs_BL = torch.nn.functional.pad(seqs_BL, (0, 1))
    rows = seqs_BL.shape[0]
    filler = -rows % SCORE_ROW_MULTIPLE
    if filler:
        seqs_BL = torch.cat([seqs_BL, seqs_BL[:1].expand(filler, -1)])
    with torch.no_grad():
        return masked(seqs_BL, task).float()[:rows]


def format_record(
    kind: str, scores: torch.Tensor, k: int, class_names: list[str] | None = None, vocab: list[str] | None = None
) -> dict[str, Any]:
    """What ``predict`` reports for one history's scores (the head's logits): the class (with
    its name where known) and every class's probability (softmax, summing to 1), or the top ``k``
    items (with their raw ids where known) and their scores, logits that only rank. The sequence
    task never lists its padding item 0 (scored -inf)."""
    out: dict[str, Any] = {}
    if kind == "class":
        label = int(scores.argmax())
        out["class"] = label
        if class_names:
            out["label"] = class_names[label]
        out["probabilities"] = [round(v, 5) for v in torch.softmax(scores.double(), -1).tolist()]
    else:
        top = torch.topk(scores, min(k, scores.numel() - (kind == "sequence")))
        out["items"] = top.indices.tolist()
        if vocab is not None:
            out["raw_items"] = [vocab[i] for i in out["items"]]
        out["scores"] = [round(v, 5) for v in top.values.tolist()]
    return out


def read_sequences(path: str, seq_len: int, num_items: int, raw_ids: list[str] | None = None) -> list[list[int]]:
    """Histories from a JSONL file, one ``{"seq": [T1 item ids]}`` per line, oldest first; with
    ``raw_ids`` (the T1 vocabulary) the ids are the source's raw item ids."""
    index = None if raw_ids is None else {raw: i for i, raw in enumerate(raw_ids) if i}
    seqs = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {line_no}"
            try:
                seq = json.loads(line)["seq"]
            except (ValueError, KeyError, TypeError) as exc:
                raise UserError(f'{where}: expected {{"seq": [item ids]}}: {exc}') from None
            if index is not None:
                if not isinstance(seq, list) or not all(isinstance(x, (str, int)) and type(x) is not bool for x in seq):
                    raise UserError(f"{where}: 'seq' must be a list of raw item ids, got {seq!r}")
                unknown = [x for x in seq if str(x) not in index]
                if unknown:
                    raise UserError(f"{where}: raw item ids {unknown[:5]} are not in the T1 vocabulary")
                seq = [index[str(x)] for x in seq]
            try:
                seqs.append(pad_history(check_history(seq, num_items), seq_len))
            except ValueError as exc:
                raise UserError(f"{where}: {exc}") from None
    if not seqs:
        raise UserError(f"{path}: no sequence in the file")
    return seqs


def predict(
    run: TrainedRun,
    task: str,
    data_root: str | None = None,
    input_path: str | None = None,
    raw_ids: bool = False,
    k: int = 5,
    limit: int = 10,
) -> list[dict[str, Any]]:
    """One record per history: the top ``k`` items (item and sequence tasks) or the class and its
    scores (class tasks). Histories come from ``input_path`` (JSONL, see ``read_sequences``) or,
    without it, the first ``limit`` sequences of the task's test split."""
    run.check_finished(task)
    meta = run.ckpt.meta
    try:
        manifest = manifest_for(run.ckpt, data_root)
    except OSError as exc:  # shards gone or unreachable
        if not input_path or raw_ids:
            raise
        log.warning("no manifest (%s): predictions use T1 ids only", exc)
        manifest = None
    t1_vocab = manifest.load_vocab(run.task_names[0]) if manifest is not None else None
    if raw_ids and t1_vocab is None:
        raise UserError(
            f"--raw-ids: {manifest.path} records no T1 vocabulary (shards from synthetic data use "
            "their raw ids already, or were converted before vocabularies were recorded)"
        )
    users: list[str | int | None]
    if input_path:
        rows = read_sequences(
            input_path, int(meta["seq_len"]), int(meta["num_seq_items"]), t1_vocab if raw_ids else None
        )
        seqs, users = torch.tensor(rows, dtype=torch.long), [None] * len(rows)
    else:
        batch = next(iter(iter_batches(manifest, task, "test", limit, shuffle=False, seed=0, epoch=0)))
        raw_users = manifest.load_users()
        seqs = batch.seq
        users = [raw_users[u] if raw_users else u for u in batch.user.tolist()]
    kind, view = run.model.kinds[task], task_view(run, task)
    class_names = manifest.task(task).class_names if manifest is not None else None
    vocab = manifest.load_vocab(task) if manifest is not None and kind != "class" else None
    records = []
    for start in range(0, len(seqs), PREDICT_ROWS):
        scores = score_histories(view, task, seqs[start : start + PREDICT_ROWS])
        records += [
            {**({} if user is None else {"user": user}), **format_record(kind, row, k, class_names, vocab)}
            for user, row in zip(users[start : start + PREDICT_ROWS], scores, strict=True)
        ]
    return records
