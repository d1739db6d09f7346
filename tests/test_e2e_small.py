"""Small end-to-end runs: resume, appending tasks, capacity refusal, crash-safe checkpoints."""

import json
import shutil

import pytest
from helpers import REPO, run_conure, tiny_config, with_shards

from conure_dist.checkpoint.format import COMMIT
from conure_dist.cli import main
from conure_dist.config import load_config
from conure_dist.data.dataset import open_dataset
from conure_dist.data.manifest import Manifest
from conure_dist.dist import DistInfo
from conure_dist.train.state import CapacityError

pytestmark = pytest.mark.slow


CPU = DistInfo(0, 1, 0, __import__("torch").device("cpu"), None)
TASKS = [("t1", 0.6), ("click", 0.5), ("gender", 0.5)]


def test_resume_after_a_lost_checkpoint_and_appending_tasks_match_an_uninterrupted_run(tmp_path):
    full = run_conure(load_config(tiny_config(tmp_path, TASKS)), str(tmp_path / "a"), CPU)

    # Run the first two tasks, then "crash" before the last commit landed.
    run_conure(load_config(tiny_config(tmp_path, TASKS[:2])), str(tmp_path / "b"), CPU)
    last = sorted((tmp_path / "b" / "checkpoints").iterdir())[-1]
    assert last.name.endswith("click-done")
    (last / COMMIT).unlink()
    # Resume with a third task appended: redoes click from its trained checkpoint, then gender.
    resumed = run_conure(load_config(tiny_config(tmp_path, TASKS)), str(tmp_path / "b"), CPU, resume=True)
    assert _last_start(tmp_path / "b") == {"resume": True, "task_index": 1, "stage": "trained", "position": None}
    assert resumed["matrix"] == full["matrix"]
    assert resumed["task_checksums"] == full["task_checksums"]


def _last_start(out) -> dict:
    """Where the newest run in ``out`` began: its log's last start record."""
    starts = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"event": "start"' in x]
    return {k: starts[-1][k] for k in ("resume", "task_index", "stage", "position")}


def test_resume_skips_a_corrupted_checkpoint(tmp_path):
    cfg = load_config(tiny_config(tmp_path, TASKS[:2]))
    first = run_conure(cfg, str(tmp_path / "r"), CPU)
    newest = sorted((tmp_path / "r" / "checkpoints").iterdir())[-1]
    (newest / "model.pt").write_bytes(b"garbage")
    again = run_conure(cfg, str(tmp_path / "r"), CPU, resume=True)
    assert _last_start(tmp_path / "r")["stage"] == "trained"  # from click's trained checkpoint, not from scratch
    assert again["matrix"] == first["matrix"]
    # The redone work is saved under indices after the broken folder's: the newest name is the
    # newest checkpoint.
    folders = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert folders[-1].endswith("click-done") and int(folders[-1][:5]) > int(newest.name[:5])


def test_a_fresh_run_refuses_an_out_dir_holding_checkpoints(tmp_path):
    cfg = load_config(tiny_config(tmp_path, TASKS[:1]))
    run_conure(cfg, str(tmp_path / "r"), CPU)
    before = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="already holds checkpoints of a run: add --resume"):
        run_conure(cfg, str(tmp_path / "r"), CPU)
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == before


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    cfg = load_config(tiny_config(tmp_path, TASKS[:1]))
    report = run_conure(cfg, str(tmp_path / "fresh"), CPU, resume=True)
    assert _last_start(tmp_path / "fresh") == {"resume": True, "task_index": 0, "stage": "start", "position": None}
    assert len(report["matrix"]) == 1 and report["matrix"][0][0] > report["reference"]["t1"]


def test_resume_refuses_a_different_task_order(tmp_path):
    run_conure(load_config(tiny_config(tmp_path, TASKS[:2])), str(tmp_path / "o"), CPU)
    other = load_config(tiny_config(tmp_path, [TASKS[0], TASKS[2]]))
    with pytest.raises(ValueError, match="may only append tasks"):
        run_conure(other, str(tmp_path / "o"), CPU, resume=True)


def test_resume_refuses_another_model_and_other_result_settings_unless_forced(tmp_path, caplog):
    path = tiny_config(tmp_path, TASKS[:1])
    first = run_conure(load_config(path), str(tmp_path / "m"), CPU)
    with pytest.raises(
        ValueError,
        match=r"checkpoints hold another model \(model.channels is 8, the checkpoint's "
        r"16\); resume with the checkpoint's model",
    ):
        run_conure(load_config(path, ["model.channels=8"]), str(tmp_path / "m"), CPU, resume=True)
    changed = load_config(path, ["seed=9", "tasks.0.lr=0.1"])
    with pytest.raises(
        ValueError, match=r"differ from the checkpoint's: seed=9 \(was 3\), tasks.0.lr=0.1 \(was 0.003\); "
    ):
        run_conure(changed, str(tmp_path / "m"), CPU, resume=True)
    again = run_conure(changed, str(tmp_path / "m"), CPU, resume=True, force=True)
    assert again["matrix"] == first["matrix"]
    assert "differ from the checkpoint's: seed=9 (was 3), tasks.0.lr=0.1 (was 0.003) (--force)" in caplog.text
    # Settings of a task not reached yet are free to change; those of the task under way need --force.
    three = tiny_config(tmp_path, TASKS, name="three.yaml")
    run_conure(load_config(three), str(tmp_path / "n"), CPU)
    _drop_commits_after(tmp_path / "n", "click-trained")
    caplog.clear()
    under_way = load_config(three, ["tasks.1.retrain_epochs=2", "tasks.2.lr=0.01"])
    with pytest.raises(ValueError, match=r"differ from the checkpoint's: tasks.1.retrain_epochs=2 \(was 1\);"):
        run_conure(under_way, str(tmp_path / "n"), CPU, resume=True)
    run_conure(load_config(three, ["tasks.2.lr=0.01"]), str(tmp_path / "n"), CPU, resume=True)
    assert "tasks.2.lr" not in caplog.text


def test_a_task_without_free_capacity_is_refused(tmp_path):
    path = tiny_config(tmp_path, [("t1", 0.0), ("click", 0.5)])
    with pytest.raises(ValueError, match=r"tasks.0.prune_ratio.*0 keeps every free conv weight for 't1', so 'click'"):
        load_config(path)
    assert load_config(path, ["continual.min_free_fraction=0.2"]).tasks[0].prune_ratio == 0.0
    assert load_config(path, ["method.name=finetune"]).tasks[0].prune_ratio == 0.0  # prunes nothing
    # Should a task still end up owning every weight (prune_ratio: auto may choose 0), the next stops.
    cfg = load_config(path, ["tasks.0.prune_ratio=0.5"])
    cfg.tasks[0].prune_ratio = 0.0
    with pytest.raises(CapacityError, match="cannot start: every conv weight is owned"):
        run_conure(cfg, str(tmp_path / "full"), CPU)


def test_unknown_task_and_missing_data_fail_clearly(tmp_path, capsys):
    path = tiny_config(tmp_path, [("t1", 0.5), ("nosuch", 0.5)])
    assert main(["run", "--config", str(path), "--out", str(tmp_path / "x")]) == 2
    assert "tasks.1.name" in capsys.readouterr().err
    path = tiny_config(tmp_path, TASKS[:1])
    assert (
        main(
            [
                "run",
                "--config",
                str(path),
                "--out",
                str(tmp_path / "y"),
                "data.source=none",
                f"data.root={tmp_path / 'empty'}",
            ]
        )
        == 2
    )
    assert "no manifest.json" in capsys.readouterr().err


def test_batch_sizes_and_out_are_checked_before_any_compute(tmp_path, capsys):
    from conure_dist.train.context import build_context

    cfg = load_config(tiny_config(tmp_path, TASKS), ["tasks.2.batch_size=33"])
    two_ranks = DistInfo(0, 2, 0, __import__("torch").device("cpu"), "gloo")  # no group is needed to refuse
    with pytest.raises(ValueError, match="tasks.2.batch_size=33 is not divisible by the world size 2"):
        build_context(cfg, None, two_ranks)
    assert not (tmp_path / "data").exists()
    (tmp_path / "file").write_text("x")
    assert main(["run", "--config", str(tiny_config(tmp_path, TASKS)), "--out", str(tmp_path / "file")]) == 2
    assert "--out " + str(tmp_path / "file") + " is a file" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_a_diverging_loss_stops_the_run_naming_task_and_phase(tmp_path, capsys):
    path = tiny_config(tmp_path, TASKS[:1])
    assert main(["run", "--config", str(path), "--out", str(tmp_path / "nan"), "tasks.0.lr=1e30"]) == 2
    err = capsys.readouterr().err
    assert "error: task 't1' (train phase, epoch 1, step" in err and "lower tasks.0.lr" in err
    assert not (tmp_path / "nan" / "report.json").exists()


def test_shards_built_otherwise_and_empty_splits_fail_before_training(tmp_path):
    run_conure(load_config(tiny_config(tmp_path, TASKS[:1])), str(tmp_path / "a"), CPU)
    other = load_config(tiny_config(tmp_path, TASKS[:1]), ["data.synthetic.num_users=500", "data.split_seed=4"])
    with pytest.raises(
        ValueError,
        match=r"built otherwise than this config asks: data.split_seed=4 \(the shards "
        r"have 0\), data.synthetic.num_users=500 \(the shards have 400\)",
    ):
        open_dataset(other)
    few = load_config(
        tiny_config(tmp_path, TASKS, data_root=str(tmp_path / "few")),
        ["data.synthetic.num_users=10", "data.split=[0.8,0.01,0.19]"],
    )
    with pytest.raises(ValueError, match=r"tasks.0: task 't1' has no valid instances under data.root=.*few"):
        run_conure(few, str(tmp_path / "b"), CPU)
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_predict_reads_sequences_from_a_file(tmp_path, capsys):
    cfg = load_config(tiny_config(tmp_path, TASKS))
    run_conure(cfg, str(tmp_path / "p"), CPU)
    seqs = tmp_path / "in.jsonl"
    seqs.write_text('{"seq": [1, 2, 3]}\n{"seq": [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]}\n')
    assert main(["predict", "--ckpt", str(tmp_path / "p"), "--task", "gender", "--input", str(seqs)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and all(x["class"] in (0, 1) for x in lines)
    assert all(abs(sum(x["probabilities"]) - 1) < 1e-4 and x["probabilities"][x["class"]] >= 0.5 for x in lines)
    # The sequence task recommends what follows the whole history: its last item counts.
    seqs.write_text('{"seq": [5, 6, 7, 8, 9]}\n{"seq": [5, 6, 7, 8, 21]}\n{"seq": [6, 7, 8, 21]}\n')
    assert main(["predict", "--ckpt", str(tmp_path / "p"), "--task", "t1", "--input", str(seqs), "--k", "5"]) == 0
    first, second, shorter = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert first["scores"] != second["scores"] and len(first["items"]) == 5
    assert shorter != second  # a different history, with the same last item
    for bad, message in [
        ('{"seq": [1, 2, 99999]}', "in.jsonl line 1: item ids [99999] are outside the T1 vocabulary"),
        ('{"seq": [3, -5]}', "in.jsonl line 1: item ids [-5] are outside"),
        ('{"seq": [1.7, 2]}', "in.jsonl line 1: 'seq' must be a list of integer item ids"),
        ('{"seq": [0, 0]}', "in.jsonl line 1: the sequence has no item"),
        ("", "in.jsonl: no sequence in the file"),
    ]:
        seqs.write_text(bad + "\n")
        assert main(["predict", "--ckpt", str(tmp_path / "p"), "--task", "t1", "--input", str(seqs)]) == 2, bad
        assert message in capsys.readouterr().err, bad
    assert main(["predict", "--ckpt", str(tmp_path / "p"), "--task", "nope", "--input", str(seqs)]) == 2
    err = capsys.readouterr().err
    assert "--task: no task 'nope'" in err and "(its tasks: t1, click, gender)" in err
    with pytest.raises(SystemExit):
        main(["predict", "--ckpt", str(tmp_path / "p"), "--task", "t1", "--k", "0"])
    assert "--k: must be >= 1, got 0" in capsys.readouterr().err
    # Shards that do not describe the checkpoint's tasks are refused by name.
    other = load_config(
        tiny_config(tmp_path, TASKS, data_root=str(tmp_path / "other")), ["data.synthetic.num_items=80"]
    )
    with_shards(other)
    assert main(["eval", "--ckpt", str(tmp_path / "p"), "--data-root", str(tmp_path / "other")]) == 2
    assert (
        "do not match the checkpoint" in (err := capsys.readouterr().err) and "num_seq_items is 81 there, 61 in" in err
    )
    seqs.write_text('{"items": [1]}\n')
    assert main(["predict", "--ckpt", str(tmp_path / "p"), "--task", "gender", "--input", str(seqs)]) == 2
    assert "in.jsonl line 1" in capsys.readouterr().err
    # Given its sequences, predict needs no shards: with the data gone it still answers.
    seqs.write_text('{"seq": [1, 2, 3]}\n')
    assert main(["predict", "--ckpt", str(tmp_path / "p"), "--task", "gender", "--input", str(seqs)]) == 0
    with_data = json.loads(capsys.readouterr().out)
    shutil.rmtree(tmp_path / "data")
    assert main(["predict", "--ckpt", str(tmp_path / "p"), "--task", "gender", "--input", str(seqs)]) == 0
    without = json.loads(capsys.readouterr().out)
    assert without == {k: v for k, v in with_data.items() if k != "label"} and with_data["label"] in ("F", "M")


ML100K = REPO.parent / "shared" / "data" / "ml-100k"


def test_predict_speaks_the_sources_raw_ids(tmp_path, capsys):
    if not ML100K.is_dir():
        pytest.skip(f"MovieLens-100K not found at {ML100K} (shared data directory absent)")
    path = tiny_config(
        tmp_path,
        [("t1", 0.5), ("like5", 0.5), ("gender", 0.5)],
        data={"root": str(tmp_path / "ml"), "source": "movielens", "source_dir": str(ML100K)},
    )
    run_conure(load_config(path, ["train.max_steps_per_epoch=5"]), str(tmp_path / "run"), CPU)
    manifest = Manifest.load(str(tmp_path / "ml"))
    t1_vocab, like5_vocab = manifest.load_vocab("t1"), manifest.load_vocab("like5")
    raw, ids = tmp_path / "raw.jsonl", tmp_path / "ids.jsonl"
    raw.write_text(json.dumps({"seq": [t1_vocab[5], int(t1_vocab[9]), t1_vocab[2]]}) + "\n")
    ids.write_text(json.dumps({"seq": [5, 9, 2]}) + "\n")
    predict = ["predict", "--ckpt", str(tmp_path / "run"), "--task", "like5", "--k", "4"]
    assert main([*predict, "--input", str(raw), "--raw-ids"]) == 0
    assert main([*predict, "--input", str(ids)]) == 0
    by_raw, by_id = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert by_raw == by_id and by_raw["raw_items"] == [like5_vocab[i] for i in by_raw["items"]]
    raw.write_text('{"seq": ["no-such-movie"]}\n')
    assert main([*predict, "--input", str(raw), "--raw-ids"]) == 2
    assert "raw.jsonl line 1: raw item ids ['no-such-movie'] are not in the T1 vocabulary" in capsys.readouterr().err
    # From the test split: each line names its user by the source's id, classes by their name.
    assert main(["predict", "--ckpt", str(tmp_path / "run"), "--task", "gender", "--limit", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    users = set(manifest.load_users())
    assert len(lines) == 3 and all(x["user"] in users and x["label"] == "FM"[x["class"]] for x in lines)


def _drop_commits_after(out, keep_last_matching: str) -> str:
    """Simulate a crash: uncommit every checkpoint after the last one whose name matches."""
    folders = sorted((out / "checkpoints").iterdir())
    keep = max(i for i, p in enumerate(folders) if keep_last_matching in p.name)
    for folder in folders[keep + 1 :]:
        (folder / COMMIT).unlink()
    return folders[keep].name


@pytest.mark.parametrize("phase", ["train", "retrain"])
def test_resume_inside_a_phase_restores_step_optimizer_rng_and_data_position(tmp_path, phase):
    path = tiny_config(tmp_path, TASKS[:2], train={"progress": False, "keep_checkpoints": 100})
    overrides = ["tasks.*.epochs=2", "tasks.*.retrain_epochs=2"]
    clean = run_conure(load_config(path, overrides), str(tmp_path / "clean"), CPU)
    out = tmp_path / "mid"
    cfg = load_config(path, [*overrides, "train.checkpoint_every_steps=3"])
    assert run_conure(cfg, str(out), CPU)["matrix"] == clean["matrix"]
    kept = _drop_commits_after(out, f"click-{phase}-e2-s")
    assert f"-{phase}-e2-s" in kept, kept
    resumed = run_conure(cfg, str(out), CPU, resume=True)
    step = int(kept.rsplit("-s", 1)[1])
    assert _last_start(out) == {
        "resume": True,
        "task_index": 1,
        "stage": f"in_{phase}",
        "position": {"epoch": 1, "step": step},
    }
    assert resumed["matrix"] == clean["matrix"]
    assert resumed["task_checksums"] == clean["task_checksums"]
    # The curves' step counter continues where the checkpoint left it.
    done = [
        [
            json.loads(x)["global_step"]
            for x in (tmp_path / name / "log.jsonl").read_text().splitlines()
            if '"task_done"' in x
        ]
        for name in ("clean", "mid")
    ]
    assert done[0][-1] == done[1][-1] > 0
