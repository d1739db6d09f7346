"""Training options: learning-rate schedule, early stopping, gradient clipping, several cut-offs.
Their defaults leave a run as it was."""

import json

import pytest
import torch
from helpers import cli, tiny_config

from conure_dist.continual.ownership import TaskOwnership
from conure_dist.continual.views import MaskedModel
from conure_dist.dist import DistInfo
from conure_dist.model import ConureModel, TaskSpec
from conure_dist.train.engine import TorchEngine
from conure_dist.train.phase import phase_parameters
from conure_dist.train.schedule import lr_factor

CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)
TASKS = [("t1", 0.6), ("click", 0.5)]


def test_lr_factor_warms_up_then_decays_to_zero():
    assert [lr_factor(s, 10, "constant", 3) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    linear = [lr_factor(s, 10, "linear", 0) for s in range(11)]
    assert linear[0] == 1.0 and linear[5] == pytest.approx(0.5) and linear[10] == 0.0
    cosine = [lr_factor(s, 10, "cosine", 2) for s in range(11)]
    assert cosine[:2] == [1 / 3, 2 / 3] and cosine[2] == 1.0 and cosine[6] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(cosine[2:], cosine[3:], strict=False)) and cosine[10] == pytest.approx(0.0)


def test_clipping_bounds_the_update_and_never_moves_frozen_weights():
    torch.manual_seed(0)
    model = ConureModel(40, [TaskSpec("t1", "sequence", 40)], 8, 3, [1, 2])
    names = model.prunable_names()
    ownership = TaskOwnership.empty({n: p.shape for n, p in model.named_parameters() if n in names})
    weights = dict(model.named_parameters())
    ownership.prune(1, {n: weights[n] for n in names}, 0.5)
    masked = MaskedModel(model, ownership)
    masked.set_view("retrain", 1)  # the task's kept weights train; the released ones are frozen
    trainable = phase_parameters(model, "t1", first_phase=False)
    engine = TorchEngine(masked, trainable, 1e-2, 0.0, CPU, "fp32", clip_grad_norm=1e-3)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    seq = torch.randint(1, 40, (8, 10))
    engine.train_step([(seq, "t1", None, torch.arange(1, 40))])
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in trainable.values() if p.grad is not None))
    assert norm.item() == pytest.approx(1e-3, rel=1e-4)  # clipped to the bound
    for name in names:
        free = ownership.owners[name] == 0
        assert torch.equal(trainable[f"model.{name}"][free], before[f"model.{name}"][free])


def _epochs(out):
    return [
        json.loads(line)
        for line in (out / "log.jsonl").read_text().splitlines()
        if json.loads(line)["event"] in ("epoch", "early_stop")
    ]


@pytest.mark.slow
def test_early_stopping_and_cutoffs_in_a_run(tmp_path):
    path = tiny_config(tmp_path, TASKS)
    common = ["run", "--config", str(path), "tasks.*.epochs=6", "tasks.*.retrain_epochs=0", "tasks.*.lr=0.05"]
    cli(*common, "--out", str(tmp_path / "all"))
    cli(*common, "train.patience=1", "train.topk=[5,10]", "--out", str(tmp_path / "stop"))
    full, stopped = _epochs(tmp_path / "all"), _epochs(tmp_path / "stop")
    stops = [e for e in stopped if e["event"] == "early_stop"]
    assert stops, "a high learning rate over 6 epochs should stop early somewhere"
    trained = [e for e in stopped if e["event"] == "epoch"]
    assert len(trained) < len(full)
    for stop in stops:  # the phase stopped right after one epoch that did not beat the best
        same = [e for e in trained if e["task"] == stop["task"] and e["phase"] == stop["phase"]]
        assert same[-1]["epoch"] == stop["epoch"] and stop["epoch"] < 6
    click = next(e for e in trained if e["task"] == "click" and e["epoch"] == 1)["valid"]
    assert {"mrr@5", "mrr@10", "hr@10", "recall@10"} <= set(click) and click["hr@10"] >= click["hr@5"]
    # The epochs before the first stop are the uninterrupted run's (patience only ends phases).
    first = stops[0]
    upto = [e for e in full if e["event"] == "epoch"][
        : trained.index(next(e for e in trained if e["task"] == first["task"] and e["phase"] == first["phase"]))
    ]
    assert [e["loss"] for e in upto] == [e["loss"] for e in trained[: len(upto)]]
    report = json.loads((tmp_path / "stop" / "report.json").read_text())
    assert report["matrix"][0][0] == report["test_metrics"]["t1"]["mrr@5"]  # the first cut-off fills the matrix


@pytest.mark.slow
def test_a_schedule_changes_training_and_defaults_do_not(tmp_path):
    path = tiny_config(tmp_path, TASKS[:1])
    common = ["run", "--config", str(path), "train.max_steps_per_epoch=4", "tasks.*.retrain_epochs=0"]
    cli(*common, "--out", str(tmp_path / "plain"))
    cli(*common, "train.lr_schedule=constant", "train.warmup_steps=0", "--out", str(tmp_path / "same"))
    cli(*common, "train.lr_schedule=cosine", "train.warmup_steps=2", "--out", str(tmp_path / "cosine"))
    losses = {
        name: [e["loss"] for e in _epochs(tmp_path / name) if e["event"] == "epoch"]
        for name in ("plain", "same", "cosine")
    }
    assert losses["plain"] == losses["same"]
    assert losses["cosine"][0] is None and losses["cosine"][1] != losses["plain"][1]


@pytest.mark.slow
def test_prefetching_trains_on_the_same_batches(tmp_path):
    path = tiny_config(tmp_path, TASKS)
    common = ["run", "--config", str(path), "train.log_every=3", "tasks.*.retrain_epochs=0"]
    cli(*common, "data.prefetch=0", "--out", str(tmp_path / "direct"))
    cli(*common, "data.prefetch=3", "--out", str(tmp_path / "ahead"))
    direct, ahead = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("direct", "ahead"))
    assert direct["task_checksums"] == ahead["task_checksums"] and direct["matrix"] == ahead["matrix"]
    logged = [
        [(e["loss"], e.get("data")) for e in _epochs(tmp_path / n) if e["event"] == "epoch" and e["epoch"]]
        for n in ("direct", "ahead")
    ]
    assert logged[0] == logged[1] and all(d for _, d in logged[0])


def _deepspeed_options_worker(rank: int, init: str, results: dict) -> None:
    import logging
    import os

    import torch.distributed as tdist

    from conure_dist.config import DistConfig
    from conure_dist.train.engine import build_engine

    logging.disable(logging.WARNING)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    tdist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    try:
        dist = DistInfo(0, 1, 0, torch.device("cpu"), "gloo")
        g = torch.Generator().manual_seed(5)
        batches = [(torch.randint(1, 40, (8, 10), generator=g), "t1", None, torch.arange(1, 40)) for _ in range(4)]
        out = {}
        for name, engine_cfg, clip in (
            ("torch_clip", DistConfig(), 1e-3),
            ("ds_clip", DistConfig(engine="deepspeed"), 1e-3),
            ("ds", DistConfig(engine="deepspeed"), None),
        ):
            torch.manual_seed(0)
            model = ConureModel(40, [TaskSpec("t1", "sequence", 40)], 8, 3, [1, 2])
            masked = MaskedModel(
                model,
                TaskOwnership.empty({n: p.shape for n, p in model.named_parameters() if n in model.prunable_names()}),
            )
            masked.set_view("train", 1)
            trainable = phase_parameters(model, "t1", first_phase=True)
            engine = build_engine(masked, trainable, 1e-2, 0.0, dist, engine_cfg, per_rank_batch=8, clip_grad_norm=clip)
            for batch in batches[:3]:
                engine.train_step([batch])
            engine.set_lr(0.0)  # a schedule's zero: the next step moves nothing
            frozen = {n: p.detach().clone() for n, p in trainable.items()}
            engine.train_step([batches[3]])
            out[name] = ({n: p.detach().clone() for n, p in trainable.items()}, frozen)
            engine.close()
        results[0] = out
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
def test_deepspeed_clips_and_follows_the_schedule_as_the_plain_engine(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_deepspeed_options_worker, args=(f"file://{tmp_path / 'store'}", results), nprocs=1, join=True)
    out = results[0]
    for name, (after, before) in out.items():
        assert all(torch.equal(after[n], before[n]) for n in after), f"{name}: lr 0 moved a weight"
    torch_clip, ds_clip, ds = (out[n][0] for n in ("torch_clip", "ds_clip", "ds"))
    for n in torch_clip:
        torch.testing.assert_close(ds_clip[n], torch_clip[n], rtol=0, atol=1e-6, msg=n)
    assert max((ds[n] - ds_clip[n]).abs().max().item() for n in ds) > 1e-5  # clipping changed the steps


@pytest.mark.slow
def test_eval_every_and_eval_max_users_in_a_run(tmp_path):
    path = tiny_config(tmp_path, TASKS)
    out = tmp_path / "run"
    args = ["tasks.*.epochs=3", "tasks.*.retrain_epochs=1", "train.eval_every=2", "train.eval_max_users=7"]
    cli("run", "--config", str(path), *args, "--out", str(out))
    epochs = [e for e in _epochs(out) if e["event"] == "epoch"]
    for task, _ in TASKS:
        for phase, last in (("train", 3), ("retrain", 1)):
            entries = [e for e in epochs if e["task"] == task and e["phase"] == phase]
            assert [e["epoch"] for e in entries] == list(range(last + 1))
            # Validated: the start, every second epoch and the last; the others log their loss only.
            validated = [e["epoch"] for e in entries if e["valid"]]
            assert validated == sorted({0, *range(2, last + 1, 2), last}), (task, phase)
            assert all(e["loss"] is not None for e in entries if not e["valid"] and e["epoch"])
            assert {e["valid"]["count"] for e in entries if e["valid"]} == {7}  # the first 7 users only
    report = json.loads((out / "report.json").read_text())
    assert {m["count"] for m in report["test_metrics"].values()} == {7}
    assert {m["count"] for m in report["reference_metrics"].values()} == {7}
    assert report["config"]["train"]["eval_max_users"] == 7
