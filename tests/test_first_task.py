"""train.first_task_cache: T1's train phase stored once and reused, bit for bit, by every run that
would train it identically; what keys it, what a damaged or unfinished entry does, and how
``conure experiment`` shares it between its runs (side by side too)."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
import yaml
from helpers import cli, run_method, tiny_config

from conure_dist.config import load_config
from conure_dist.dist import DistInfo
from conure_dist.model import ConureModel, TaskSpec
from conure_dist.train import first_task
from conure_dist.train.context import build_context
from conure_dist.train.first_task import FirstTaskCache, phase_key

TASKS = [("t1", 0.6), ("click", 0.5), ("gender", 0.5)]
CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)


def _events(out, drop=("time", "seq_per_s", "tokens_per_s", "step_seconds", "peak_mem_gb")):
    """The log's events without wall-clock figures and without the reuse notice."""
    events = []
    for line in (out / "log.jsonl").read_text().splitlines():
        event = {k: v for k, v in json.loads(line).items() if k not in drop and not k.endswith("_per_s")}
        if event["event"] not in ("first_task_reused", "checkpoint", "start", "done"):
            events.append(event)
    return events


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A Conure run that stores T1, the same run again (loads it), and one without the cache."""
    tmp = tmp_path_factory.mktemp("first_task")
    path = str(
        tiny_config(
            tmp, TASKS, train={"progress": False, "eval_batch_size": 256, "first_task_cache": str(tmp / "cache")}
        )
    )
    out = {}
    for name, overrides in (("stored", []), ("loaded", []), ("plain", ["train.first_task_cache=null"])):
        out[name] = run_method(load_config(path, ["tasks.*.epochs=2", *overrides]), str(tmp / name), CPU)
    return tmp, path


@pytest.mark.slow
def test_a_run_that_loads_t1_reports_and_logs_what_training_it_gave(runs):
    tmp, _ = runs
    reports = {n: json.loads((tmp / n / "report.json").read_text()) for n in ("stored", "loaded", "plain")}
    for name in ("stored", "loaded"):
        assert reports[name]["matrix"] == reports["plain"]["matrix"], name
        assert reports[name]["task_checksums"] == reports["plain"]["task_checksums"], name
    assert json.loads((tmp / "stored" / "first_task.json").read_text())["reused"] is False
    assert json.loads((tmp / "loaded" / "first_task.json").read_text())["reused"] is True
    assert not (tmp / "plain" / "first_task.json").exists()
    # The loaded run's log holds T1's epochs and steps as the training run logged them, then its own.
    plain, loaded = _events(tmp / "plain"), _events(tmp / "loaded")
    assert [e for e in loaded if e["task"] == "t1" and e.get("phase") == "train"]
    assert loaded == plain
    reused = [
        json.loads(line)
        for line in (tmp / "loaded" / "log.jsonl").read_text().splitlines()
        if '"first_task_reused"' in line
    ]
    assert len(reused) == 1 and reused[0]["task"] == "t1"


@pytest.mark.slow
def test_the_key_holds_what_t1_reads_and_nothing_after_it(runs):
    tmp, path = runs
    specs = [TaskSpec("t1", "sequence", 61), TaskSpec("click", "item", 61)]

    def key(overrides=(), seed=0):
        cfg = load_config(path, list(overrides))
        torch.manual_seed(seed)
        model = ConureModel(61, specs, 16, 3, [1, 2])
        return phase_key(cfg.to_dict(), model.state_dict(), "t1", 1, torch.device("cpu"))

    base = key()
    assert key() == base
    for later in (
        ["tasks.1.lr=0.5"],
        ["tasks.0.prune_ratio=0.3"],
        ["tasks.0.retrain_epochs=5"],
        ["method.name=stl"],
        ["train.progress=true"],
        ["train.first_task_cache=elsewhere"],
    ):
        assert key(later) == base, later
    for read in (
        ["tasks.0.lr=0.5"],
        ["tasks.0.epochs=7"],
        ["tasks.0.batch_size=16"],
        ["seed=4"],
        ["data.synthetic.num_users=300"],
        ["model.init_std=0.05"],
        ["train.negative_fraction=0.5"],
    ):
        assert key(read) != base, read
    assert key(seed=1) != base  # other initial weights


@pytest.mark.slow
def test_a_damaged_entry_is_refused_by_name_and_an_unfinished_one_is_ignored(runs):
    tmp, path = runs
    (entry,) = (tmp / "cache").iterdir()
    damaged = tmp / "damaged"
    damaged.mkdir()
    copy = damaged / entry.name
    copy.mkdir()
    for f in entry.iterdir():
        copy.joinpath(f.name).write_bytes(f.read_bytes())
    data = bytearray(copy.joinpath("state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.joinpath("state.pt").write_bytes(bytes(data))
    cfg = load_config(path, ["tasks.*.epochs=2", f"train.first_task_cache={damaged}"])
    with pytest.raises(ValueError, match=re.escape(f"{copy}/state.pt does not match its checksum in COMMIT")):
        run_method(cfg, str(tmp / "damaged_run"), CPU)
    # Without COMMIT (a writer killed before its end) the entry does not count: the run trains
    # T1 and commits the entry.
    copy.joinpath("COMMIT").unlink()
    copy.joinpath("state.pt").write_bytes(b"partial")
    report = run_method(cfg, str(tmp / "unfinished_run"), CPU)
    assert json.loads((tmp / "unfinished_run" / "first_task.json").read_text())["reused"] is False
    assert copy.joinpath("COMMIT").exists()
    assert FirstTaskCache(str(damaged)).load(json.loads(copy.joinpath("meta.json").read_text())["key"]) is not None
    assert report["matrix"] == json.loads((tmp / "plain" / "report.json").read_text())["matrix"]


@pytest.mark.slow
def test_an_entry_of_format_1_is_ignored_and_t1_trained_again(runs, monkeypatch):
    """Entries written before the cache was committed as checkpoints are (``COMMIT`` held the key,
    ``meta.json`` the hash) sit under keys that format 2 never computes: a run trains T1 and stores
    it beside them, with the uncached run's results."""
    tmp, path = runs
    cfg = load_config(path, ["tasks.*.epochs=2", f"train.first_task_cache={tmp / 'old'}"])
    initial = build_context(cfg, None, CPU).model.state_dict()
    monkeypatch.setattr(first_task, "FORMAT_VERSION", 1)
    old_key = phase_key(cfg.to_dict(), initial, "t1", 1, torch.device("cpu"))
    monkeypatch.undo()
    (entry,) = (tmp / "cache").iterdir()
    old = tmp / "old" / old_key[:32]
    old.mkdir(parents=True)
    data = entry.joinpath("state.pt").read_bytes()
    meta = {
        **json.loads(entry.joinpath("meta.json").read_text()),
        "format": 1,
        "key": old_key,
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    old.joinpath("state.pt").write_bytes(data)
    old.joinpath("meta.json").write_text(json.dumps(meta))
    old.joinpath("COMMIT").write_text(old_key + "\n")
    report = run_method(cfg, str(tmp / "after_format_1"), CPU)
    marker = json.loads((tmp / "after_format_1" / "first_task.json").read_text())
    assert marker["reused"] is False and marker["key"] != old_key
    assert sorted(p.name for p in (tmp / "old").iterdir()) == sorted([old_key[:32], marker["key"][:32]])
    assert sorted(json.loads(tmp.joinpath("old", marker["key"][:32], "COMMIT").read_text())["files"]) == [
        "meta.json",
        "state.pt",
    ]
    assert report["matrix"] == json.loads((tmp / "plain" / "report.json").read_text())["matrix"]


@pytest.mark.slow
def test_an_experiment_trains_each_t1_once_and_changes_no_result(tmp_path):
    config = tiny_config(tmp_path, TASKS)
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(
        yaml.safe_dump(
            {
                "base": str(config),
                "overrides": ["tasks.*.epochs=2", "train.num_threads=1"],
                "methods": ["conure", "finetune"],
                "seeds": [0, 1],
                "variants": {"main": {}, "short": {"tasks": ["t1", "click"]}},
            }
        )
    )
    cli(
        "experiment",
        "--config",
        str(experiment),
        "--out",
        str(tmp_path / "plain"),
        "--jobs",
        "2",
        "--no-share-first-task",
    )
    assert not (tmp_path / "plain" / "first_task").exists()
    for out, jobs in (("shared", "2"), ("in_turn", "1")):
        cli("experiment", "--config", str(experiment), "--out", str(tmp_path / out), "--jobs", jobs)
        # Two seeds: two T1s, each trained by one of the eight runs and loaded by the others.
        assert len(list((tmp_path / out / "first_task").iterdir())) == 2, out
        markers = [json.loads(p.read_text()) for p in (tmp_path / out / "runs").glob("*/*/seed*/first_task.json")]
        assert len(markers) == 8 and sum(not m["reused"] for m in markers) == 2, out
        for report in (tmp_path / "plain" / "runs").glob("*/*/seed*/report.json"):
            shared = tmp_path / out / report.relative_to(tmp_path / "plain")
            assert json.loads(shared.read_text())["matrix"] == json.loads(report.read_text())["matrix"], shared


@pytest.mark.slow
def test_two_processes_load_t1_on_rank_0_and_share_it(tmp_path):
    """Rank 0 decides and reads; rank 1 receives the tensors by broadcast (the cache need not be
    on a shared disk). The loading run ends where the training run did."""
    from helpers import conure

    path = tiny_config(
        tmp_path,
        TASKS[:2],
        data={"partition": "stride"},
        train={"progress": False, "eval_batch_size": 256, "first_task_cache": str(tmp_path / "cache")},
    )
    for name in ("stored", "loaded"):
        conure("run", "--config", str(path), "--out", str(tmp_path / name), nproc=2)
    reports = {n: json.loads((tmp_path / n / "report.json").read_text()) for n in ("stored", "loaded")}
    assert reports["loaded"]["world_size"] == 2
    assert json.loads((tmp_path / "loaded" / "first_task.json").read_text())["reused"] is True
    assert reports["loaded"]["matrix"] == reports["stored"]["matrix"]
    assert reports["loaded"]["task_checksums"] == reports["stored"]["task_checksums"]


@pytest.mark.slow
def test_the_cache_lives_on_an_object_store_too(tmp_path, s3_endpoint):
    """An entry written to S3 (the moto server) is found and loaded by the next run."""
    cache = "s3://conure-test/first_task_cache"
    path = str(
        tiny_config(tmp_path, TASKS[:2], train={"progress": False, "eval_batch_size": 256, "first_task_cache": cache})
    )
    reports = [run_method(load_config(path), str(tmp_path / name), CPU) for name in ("stored", "loaded")]
    markers = [json.loads((tmp_path / name / "first_task.json").read_text()) for name in ("stored", "loaded")]
    assert [m["reused"] for m in markers] == [False, True]
    assert markers[1]["cache"].startswith(cache + "/")
    assert reports[1]["matrix"] == reports[0]["matrix"]
    import fsspec

    fs = fsspec.filesystem("s3")
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(markers[1]["cache"])) == ["COMMIT", "meta.json", "state.pt"]
