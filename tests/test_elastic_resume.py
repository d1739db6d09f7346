"""Elastic resume: a checkpoint taken inside a phase on W processes resumes on W' != W.

In process (gloo groups of 3, then 2 ranks; fp32 and bf16 autocast): ZeRO-2 optimizer state
saved by one world and re-partitioned for the next holds, per parameter, exactly the Adam
moments and step of the saving world, and the next step gives the parameters the saving world's
next step gave. Through the CLI (torchrun + gloo): for DDP and ZeRO-2 (ZeRO-1's optimizer state
takes the same path), a 2-process run's mid-phase checkpoint resumes on 1 process, and that run's
own later one on 2 again; each repeats the uninterrupted run's data, losses and parameters and
passes the frozen-weights audit.
"""

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from helpers import REPO, cli, conure, tiny_config

from conure_dist.checkpoint.format import COMMIT, load_checkpoint
from conure_dist.cli import main
from conure_dist.config import DistConfig
from conure_dist.continual.ownership import TaskOwnership
from conure_dist.continual.views import MaskedModel
from conure_dist.dist import DistInfo
from conure_dist.experiment.compare import compare_runs
from conure_dist.model import ConureModel, TaskSpec
from conure_dist.train.deepspeed_engine import SavedShards, reshard_zero_state, zero_state_classes
from conure_dist.train.engine import build_engine
from conure_dist.train.phase import phase_parameters

pytestmark = pytest.mark.multiprocess
GLOBAL_BATCH = 12  # divisible by 1, 2 and 3 ranks
STEPS = 3
PRECISIONS = {"fp32": 1e-5, "bf16": 1e-3}
"""Each precision's tolerance for the step after a resume against the saving world's (lr 1e-2)."""
KEYS = ("exp_avg", "exp_avg_sq")


def _global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same global batch of T1 sequences and shared negatives on every rank."""
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randint(1, 40, (GLOBAL_BATCH, 10), generator=generator), torch.randperm(39, generator=generator)[
        :8
    ] + 1


def _full_state(engine, trainable) -> dict[str, torch.Tensor]:
    """Every parameter's whole Adam moments, through DeepSpeed's public API (collective)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    engine.optimizer._lazy_init_hp_params_optimizer_state()  # what a step links first, after a load too
    return {
        f"{name}/{key}": safe_get_full_optimizer_state(param, key).clone()
        for name, param in trainable.items()
        for key in KEYS
    }


def _adam_step(engine) -> int:
    base = engine.optimizer.optimizer
    steps = {int(base.state[g["params"][0]]["step"]) for g in base.param_groups}
    assert len(steps) == 1
    return steps.pop()


def _same_state(a: object, b: object) -> bool:
    """Equal nested state: tensors by value, the rest by ``==``."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and torch.equal(a, b)
    return a == b


def _phase(rank: int, world: int, precision: str, prev: Path | None, out: Path) -> dict:
    """One phase of one world in the chain: resume from ``prev`` (checking moments, step and the
    next step against what the saving world recorded), train, save to ``out`` and record the
    step after it."""
    torch.manual_seed(0)
    model = ConureModel(40, [TaskSpec("t1", "sequence", 40)], 12, 3, [1, 2])
    masked = MaskedModel(
        model, TaskOwnership.empty({n: p.shape for n, p in model.named_parameters() if n in model.prunable_names()})
    )
    masked.set_view("train", 1)
    dist = DistInfo(rank, world, rank, torch.device("cpu"), "gloo")
    cfg = DistConfig(
        engine="deepspeed",
        zero_stage=2,
        precision=precision,
        deepspeed_config=str(REPO / "configs/deepspeed/zero2.json"),
    )
    if prev is not None:
        model.load_state_dict(torch.load(prev / "model.pt"))
    trainable = phase_parameters(model, "t1", True)
    engine = build_engine(masked, trainable, 1e-2, 1e-3, dist, cfg, per_rank_batch=GLOBAL_BATCH // world)
    step = 0
    report: dict = {}

    def train_step() -> None:
        seq, negatives = _global_batch(step)
        engine.train_step([(seq[rank::world], "t1", None, negatives)])

    if prev is not None:
        saved = json.loads((prev / "info.json").read_text())

        def read(r: int, kind: str = "") -> dict:
            return torch.load(prev / f"part{kind}-{r}.pt", weights_only=False)

        # DeepSpeed's elastic format (zero_optimization.elastic_checkpoint) re-partitions alike.
        rigid = reshard_zero_state(engine.optimizer, SavedShards(saved["world"], read))
        elastic = reshard_zero_state(engine.optimizer, SavedShards(saved["world"], lambda r: read(r, "-elastic")))
        report["elastic_equal"] = _same_state(rigid["base_optimizer_state"], elastic["base_optimizer_state"])
        report["padded"] = any(any(read(r)["optimizer"]["group_paddings"]) for r in range(saved["world"]))
        engine.load_state_dict({"shards": SavedShards(saved["world"], read)})
        expected = torch.load(prev / "moments.pt")
        loaded = _full_state(engine, trainable)
        report["moments_diff"] = max((loaded[k] - expected[k]).abs().max().item() for k in expected)
        report["moments_moved"] = min(expected[k].abs().max().item() for k in expected)
        report["step"] = (_adam_step(engine), saved["step"])
        step = saved["step"]
        train_step()
        step += 1
        reference = torch.load(prev / "next.pt")
        report["next_diff"] = max((p.detach() - reference[n]).abs().max().item() for n, p in trainable.items())
    for _ in range(STEPS):
        train_step()
        step += 1
    # What a mid-phase checkpoint keeps: the model (rank 0), every rank's optimizer part.
    torch.save(engine.state_dict(), out / f"part-{rank}.pt")
    engine.optimizer.elastic_checkpoint = True
    torch.save({"optimizer": engine.optimizer.state_dict()}, out / f"part-elastic-{rank}.pt")
    engine.optimizer.elastic_checkpoint = False
    moments = _full_state(engine, trainable)
    if rank == 0:
        torch.save(model.state_dict(), out / "model.pt")
        torch.save(moments, out / "moments.pt")
        (out / "info.json").write_text(json.dumps({"world": world, "step": step}))
    train_step()
    if rank == 0:
        torch.save({n: p.detach().clone() for n, p in trainable.items()}, out / "next.pt")
    engine.close()
    return report


def _stage(rank: int, world: int, init: str, prev: str | None, out: str, results: dict) -> None:
    """One world: a phase in fp32, then one in bf16 (autocast), each continuing its chain."""
    logging.disable(logging.WARNING)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        for precision in PRECISIONS:
            (Path(out) / precision).mkdir(parents=True, exist_ok=True)
            results[(world, rank, precision)] = _phase(
                rank, world, precision, None if prev is None else Path(prev) / precision, Path(out) / precision
            )
    finally:
        tdist.destroy_process_group()


def test_zero2_optimizer_state_moves_between_world_sizes(tmp_path):
    """3 -> 2 ranks: parameters split across ranks at other places, a saved partition with
    padding (2 -> 1 and 1 -> 2 are the CLI tests below). The moments arrive exactly; the next
    step agrees to float rounding in fp32, to bf16's in bf16 (autocast: what the ranks compute
    in bf16 depends on how the batch is split)."""
    manager = mp.Manager()
    prev = None
    for i, world in enumerate((3, 2)):
        out = tmp_path / f"w{i}"
        results = manager.dict()
        mp.spawn(
            _stage, args=(world, f"file://{tmp_path / f'store{i}'}", prev, str(out), results), nprocs=world, join=True
        )
        if prev is not None:
            for rank in range(world):
                for precision, tolerance in PRECISIONS.items():
                    report = results[(world, rank, precision)]
                    assert report["elastic_equal"] and report["padded"], report
                    assert report["moments_moved"] > 0, "every parameter has Adam state"
                    assert report["moments_diff"] == 0.0, (world, rank, precision, report)
                    assert report["step"][0] == report["step"][1] > 0, report
                    assert report["next_diff"] < tolerance, (world, rank, precision, report)
        prev = str(out)


# -- through the CLI ---------------------------------------------------------------------------
TASKS = [("t1", 0.6), ("click", 0.5)]
# ZeRO-1 saves and restores its optimizer state as ZeRO-2 does (the same DeepSpeed optimizer and
# the same code here, which tells stages apart only as 0 or sharded): zero2 stands for both.
ENGINES = {"ddp": ["dist.engine=ddp"], "zero2": ["dist.engine=deepspeed", "dist.zero_stage=2"]}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    """One synthetic data set for every run of this module (the first run prepares it)."""
    return str(tmp_path_factory.mktemp("data"))


def _args(tmp_path: Path, data_root: str, engine: str) -> list[str]:
    """Two tasks, one epoch of 6 steps per phase, a checkpoint every 2 steps (s2, s4)."""
    path = tiny_config(
        tmp_path,
        TASKS,
        data_root=data_root,
        train={"progress": False, "eval_batch_size": 256, "keep_checkpoints": 100, "num_threads": 1},
    )
    return [
        "run",
        "--config",
        str(path),
        "--resume",
        "data.partition=stride",
        "tasks.*.retrain_epochs=0",
        "train.max_steps_per_epoch=6",
        "train.checkpoint_every_steps=2",
        *ENGINES[engine],
    ]


def _cut_copy(run: Path, out: Path, last: str) -> None:
    """``run`` as a run stopped right after its checkpoint ``*-{last}``: a copy without the
    checkpoints taken after it."""
    shutil.copytree(run, out)
    folders = sorted((out / "checkpoints").iterdir())
    keep = next(i for i, p in enumerate(folders) if p.name.endswith(last))
    assert (folders[keep] / COMMIT).exists()
    for folder in folders[keep + 1 :]:
        shutil.rmtree(folder)


def _checkpoint(run: Path, suffix: str):
    return load_checkpoint(str(next(p for p in (run / "checkpoints").iterdir() if p.name.endswith(suffix))))


def _moments(ckpt) -> dict[str, torch.Tensor]:
    """A mid-phase checkpoint's Adam state per parameter, whole: DDP's by parameter index; ZeRO's
    put together from every rank's fragments (``param_slice_mappings``, in rank order)."""
    if ckpt.has_part("optimizer.pt"):
        state = ckpt.read_part("optimizer.pt")["optimizer"]["state"]
        return {f"{i}/{k}": v.flatten() for i, s in state.items() for k, v in s.items()}
    pieces: dict[str, list[torch.Tensor]] = {}
    for rank in range(ckpt.meta["world_size"]):
        saved = ckpt.read_part(f"optimizer-rank{rank}.pt", zero_state_classes())["optimizer"]
        base = saved["base_optimizer_state"]
        for group, mapping in enumerate(saved["param_slice_mappings"]):
            state = base["state"][base["param_groups"][group]["params"][0]]
            pieces.setdefault("step", [state["step"].reshape(1)])
            for name, address in mapping.items():
                for key in KEYS:
                    pieces.setdefault(f"{name}/{key}", []).append(
                        state[key][address.start : address.start + address.numel]
                    )
    return {k: torch.cat(v) for k, v in pieces.items()}


def _last_start(run: Path) -> dict:
    starts = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if '"event": "start"' in x]
    return {k: starts[-1][k] for k in ("world_size", "resume", "task_index", "stage", "position")}


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_mid_phase_checkpoint_resumes_on_another_number_of_processes(tmp_path, data_root, engine, capsys):
    """An uninterrupted run on 2 processes; its click-phase checkpoint at step 2 resumed on 1
    process, whose own checkpoint at step 4 is resumed on 2 again. Each resumed run starts at its
    checkpoint's step, trains on the uninterrupted run's batches (same data fingerprint), matches
    its epoch loss and its parameters after the phase to float rounding (its optimizer state at
    step 4 too), and keeps T1's frozen weights (audit)."""
    args = _args(tmp_path, data_root, engine)
    full = tmp_path / "full"
    conure(*args, "--out", str(full), nproc=2)
    reference = json.loads((full / "report.json").read_text())
    previous = full
    for step, saving, resuming in ((2, 2, 1), (4, 1, 2)):
        cut = tmp_path / f"s{step}-on{resuming}"
        _cut_copy(previous, cut, f"click-train-e1-s{step}")
        mid = _checkpoint(cut, f"click-train-e1-s{step}")
        assert mid.meta["world_size"] == saving
        if engine != "ddp":
            assert {f"optimizer-rank{r}.pt" for r in range(saving)} <= set(mid.digests)
        conure(*args, "--out", str(cut), nproc=resuming)

        assert _last_start(cut) == {
            "world_size": resuming,
            "resume": True,
            "task_index": 1,
            "stage": "in_train",
            "position": {"epoch": 0, "step": step},
        }
        report = json.loads((cut / "report.json").read_text())
        assert report["world_size"] == resuming
        assert report["task_checksums"]["t1"] == reference["task_checksums"]["t1"]
        capsys.readouterr()
        assert main(["audit", "--ckpt", str(cut), "--json"]) == 0
        audit = json.loads(capsys.readouterr().out)
        assert audit["ok"] and set(audit["tasks"]) == {"t1", "click"}

        # The resumed epoch against the uninterrupted one: the same global batches and
        # negatives, the same mean loss and the same parameters after it, to float rounding.
        rows = {(r["task"], r["phase"], r["epoch"]): r for r in compare_runs(str(full), str(cut))}
        resumed = rows[("click", "train", 1)]
        assert resumed["same_data"] is True, resumed
        assert resumed["loss_rel_diff"] < 1e-5, resumed
        before, after = _checkpoint(full, "click-trained"), _checkpoint(cut, "click-trained")
        for name, tensor in before.model.items():
            torch.testing.assert_close(after.model[name], tensor, rtol=0, atol=1e-5, msg=name)
        if step == 2:  # two steps after the resume, on 1 process: the optimizer state of 2
            expected, continued = (
                _moments(_checkpoint(full, "click-train-e1-s4")),
                _moments(_checkpoint(cut, "click-train-e1-s4")),
            )
            assert continued.keys() == expected.keys()
            for key, value in expected.items():
                torch.testing.assert_close(continued[key], value, rtol=1e-4, atol=1e-9, msg=key)
        previous = cut


def test_switching_between_sharded_and_whole_optimizer_state_inside_a_phase_is_refused(tmp_path, data_root):
    """A DDP checkpoint inside a phase resumed under ZeRO-2 fails before any training, naming
    what to do; between phases any engine may take over."""
    from conure_dist.config import load_config
    from conure_dist.train.loop import ContinualLoop

    args = _args(tmp_path, data_root, "ddp")
    cli(*args, "train.max_steps_per_epoch=3", "--out", str(tmp_path / "ddp"))
    _cut_copy(tmp_path / "ddp", tmp_path / "cut", "t1-train-e1-s2")
    cpu = DistInfo(0, 1, 0, torch.device("cpu"), None)
    cfg = load_config(
        Path(args[2]), [*args[4:], "train.max_steps_per_epoch=3", "dist.engine=deepspeed", "dist.zero_stage=2"]
    )
    with pytest.raises(
        ValueError,
        match=r"optimizer state whole \(DDP or ZeRO-0\) \(dist.engine=ddp dist.zero_stage=0\)"
        r", and this run's engine keeps it sharded: resume it with dist.engine=ddp",
    ):
        ContinualLoop(cfg, str(tmp_path / "cut"), cpu, resume=True)
    _cut_copy(tmp_path / "ddp", tmp_path / "between", "t1-trained")
    assert ContinualLoop(cfg, str(tmp_path / "between"), cpu, resume=True).state.stage == "trained"
