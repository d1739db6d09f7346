"""Recompute the stored checksums of every finished task's frozen weights and ownership.

Why a rewritten ``COMMIT`` does not hide altered frozen weights: ``COMMIT``'s sha256 only tells
a damaged file from an intact one. What a finished task froze is checksummed once, when it
finishes (``task_checksum``), and that value is then copied, never recomputed, into every later
checkpoint's ``meta.json`` and into ``report.json``. ``eval`` (every command that loads a trained
run) and ``--resume`` recompute each finished task's checksum from the weights and ownership
records they load and compare it with the recorded one (``verify_frozen``), and compare the
recorded values across every committed checkpoint of the run directory and its report
(``check_recorded_checksums``). Altered weights thus fail unless the attacker also rewrites the
checksum in that ``meta.json``, in every other kept checkpoint and in the report, consistently.
Against an attacker who can rewrite the whole directory, only a secret outside it helps:
with ``CONURE_CHECKPOINT_KEY`` set, ``COMMIT`` carries an HMAC of its digests
(``checkpoint.format``), which cannot be recomputed without the key.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass

from conure_dist.checkpoint.format import (
    MAIN_PARTS,
    Checkpoint,
    CheckpointError,
    committed_folders,
    read_commit,
    read_verified,
)
from conure_dist.continual.growth import apply_growth
from conure_dist.continual.ownership import TaskOwnership, task_checksum
from conure_dist.model import ConureModel, TaskSpec

log = logging.getLogger(__name__)


@dataclass
class AuditResult:
    task: str
    stored: str
    recomputed: str

    @property
    def ok(self) -> bool:
        return self.stored == self.recomputed


def model_from_checkpoint(ckpt: Checkpoint) -> tuple[ConureModel, TaskOwnership]:
    """Rebuild the model from a checkpoint alone (no data needed) and load its weights strictly."""
    cfg = ckpt.meta["config"]["model"]
    specs = [TaskSpec(**s) for s in ckpt.meta["tasks"]]
    model = ConureModel(
        ckpt.meta["num_seq_items"],
        specs,
        cfg["channels"],
        cfg["kernel_size"],
        cfg["block_dilations"],
        cfg["init_std"],
        prune_embedding=cfg.get("prune_embedding", False),
    )
    apply_growth(model, None, ckpt.meta["state"].get("growth", []))
    model.load_state_dict(ckpt.model, strict=True)
    return model, TaskOwnership.from_state_dict(ckpt.ownership)


def checksum_of_task(model: ConureModel, ownership: TaskOwnership, state: dict, task_index: int) -> str:
    """``task_checksum`` of the model's task ``task_index`` (0-based, in the model's task order):
    the kernels it runs and owns, and what it froze besides (``ConureModel.frozen_with``)."""
    name = list(model.kinds)[task_index]
    return task_checksum(ownership, state, task_index + 1, model.frozen_with(name), model.prunable_names(name))


def audit_checkpoint(ckpt: Checkpoint) -> list[AuditResult]:
    """One result per finished task; a changed frozen weight or ownership entry fails its task."""
    model, ownership = model_from_checkpoint(ckpt)
    state = model.state_dict()
    names = [s["name"] for s in ckpt.meta["tasks"]]
    results = []
    for index, name in enumerate(names):
        stored = ckpt.meta["state"]["task_checksums"].get(name)
        if stored is None:
            continue
        results.append(AuditResult(name, stored, checksum_of_task(model, ownership, state, index)))
    return results


def verify_frozen(ckpt: Checkpoint, model: ConureModel, ownership: TaskOwnership) -> int:
    """Raise ``CheckpointError`` naming the tasks whose frozen weights or ownership in ``model``
    (as loaded from ``ckpt``) no longer match the checksums recorded when they finished; the
    number of tasks checked otherwise."""
    state = model.state_dict()
    recorded = ckpt.meta["state"]["task_checksums"]
    names = list(model.kinds)
    changed = [
        name
        for name, stored in recorded.items()
        if checksum_of_task(model, ownership, state, names.index(name)) != stored
    ]
    if changed:
        raise CheckpointError(
            f"{ckpt.url}: the frozen weights of finished task(s) {', '.join(changed)} do not match the checksums "
            "recorded when they finished: the checkpoint was altered after it was written (conure audit --ckpt "
            "shows each task)"
        )
    return len(recorded)


def check_recorded_checksums(ckpt: Checkpoint, others: dict[str, dict[str, str]]) -> None:
    """Raise ``CheckpointError`` where another record of the run (an older checkpoint's meta, the
    report: name -> task checksums) holds another checksum for a task ``ckpt`` records: frozen
    weights never change once recorded."""
    mine = ckpt.meta["state"]["task_checksums"]
    for where, theirs in others.items():
        differ = [t for t in mine.keys() & theirs.keys() if mine[t] != theirs[t]]
        if differ:
            raise CheckpointError(
                f"{ckpt.url}: the recorded checksum of finished task(s) {', '.join(sorted(differ))} differs from "
                f"{where}'s; frozen weights never change, so one of them was altered"
            )


def recorded_elsewhere(ckpt: Checkpoint) -> dict[str, dict[str, str]]:
    """The task checksums that the run's other records hold: every other committed checkpoint
    beside ``ckpt`` (its verified ``meta.json``) and the run's ``report.json``, by file."""
    folder = posixpath.dirname(ckpt.path.rstrip("/"))
    records: dict[str, dict[str, str]] = {}
    for other in committed_folders(ckpt.fs, folder):
        if other.rstrip("/") == ckpt.path.rstrip("/"):
            continue
        try:
            digests = read_commit(ckpt.fs, other)
            meta = json.loads(read_verified(ckpt.fs, other, MAIN_PARTS[2], digests[MAIN_PARTS[2]]))
            records[posixpath.join(other, MAIN_PARTS[2])] = meta["state"]["task_checksums"]
        except (CheckpointError, KeyError, ValueError) as exc:
            log.warning("not compared with %s: %s", other, exc)
    if posixpath.basename(folder) == "checkpoints":
        report = posixpath.join(posixpath.dirname(folder), "report.json")
        if ckpt.fs.exists(report):
            try:
                records[report] = json.loads(ckpt.fs.cat_file(report))["task_checksums"]
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("not compared with %s: %s", report, exc)
    return records


def verify_run(ckpt: Checkpoint, model: ConureModel, ownership: TaskOwnership) -> int:
    """``verify_frozen`` and ``check_recorded_checksums`` against the run's other records; the
    number of finished tasks checked."""
    checked = verify_frozen(ckpt, model, ownership)
    check_recorded_checksums(ckpt, recorded_elsewhere(ckpt))
    return checked
