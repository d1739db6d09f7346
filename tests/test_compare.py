"""``conure compare``: the table, and the note that says why two runs saw other data."""

from __future__ import annotations

import json

from conure_dist.cli import main
from conure_dist.config import RunConfig
from conure_dist.experiment.compare import compare_runs, data_note


def _write_run(folder, world_size: int, overrides: dict, fingerprint: str):
    cfg = RunConfig().to_dict()
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        cfg[section][key] = value
    folder.mkdir()
    entries = [{"event": "start", "world_size": world_size, "config": cfg}]
    for epoch in range(3):  # epoch 0 only validates: no data fingerprint
        entries.append(
            {
                "event": "epoch",
                "task": "t1",
                "phase": "train",
                "epoch": epoch,
                "loss": 1.0 + epoch,
                "data": None if epoch == 0 else f"{fingerprint}{epoch}",
                "valid": {"mrr@5": 0.5, "count": 9},
            }
        )
    (folder / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return str(folder)


def test_one_against_two_processes_names_data_partition_stride_once(tmp_path, capsys):
    one = _write_run(tmp_path / "one", 1, {}, "a")
    two = _write_run(tmp_path / "two", 2, {}, "b")
    rows = compare_runs(one, two)
    assert [r["same_data"] for r in rows] == [None, False, False]
    note = data_note(one, two, rows)
    assert "ran 1 and 2 processes with data.partition=auto and auto" in note
    assert "run both with data.partition=stride" in note
    assert main(["compare", one, two]) == 0
    out = capsys.readouterr().out
    assert out.count("| NO |") == 2 and out.count("data.partition=stride") == 1
    assert out.splitlines()[-1].startswith("note: the runs trained on other data because they ran 1 and 2")
    assert main(["compare", one, two, "--json"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 3 and "data.partition=stride" in captured.err


def test_same_data_gives_no_note_and_other_seeds_are_named(tmp_path, capsys):
    one = _write_run(tmp_path / "one", 1, {"data.partition": "stride"}, "a")
    two = _write_run(tmp_path / "two", 2, {"data.partition": "stride"}, "a")
    assert data_note(one, two, compare_runs(one, two)) is None
    assert main(["compare", one, two]) == 0
    assert "note:" not in capsys.readouterr().out
    other = _write_run(tmp_path / "other", 1, {"data.split_seed": 4}, "c")
    note = data_note(one, other, compare_runs(one, other))
    assert (
        note == "the runs trained on other data: their configs differ in data.partition: stride / auto; "
        "data.split_seed: 0 / 4"
    )
