"""The run's summary says when a task learned nothing and when its validation is too small."""

from __future__ import annotations

from conure_dist.report import SMALL_VALIDATION, format_table, learning_notes


def _report(final: list[float], reference: dict[str, float], valid: dict[str, int]) -> dict:
    tasks = [
        {"name": "t1", "kind": "sequence", "primary_metric": "mrr@5"},
        {"name": "gender", "kind": "class", "primary_metric": "acc"},
    ]
    report = {
        "tasks": tasks,
        "matrix": [[final[0], None], final],
        "capacity": [],
        "reference": reference,
        "valid_examples": valid,
        "wall_seconds": 1.0,
        "world_size": 1,
        "engine": "ddp",
    }
    return {**report, **learning_notes(report)}


def test_a_task_that_does_not_beat_its_reference_is_named_in_one_line() -> None:
    report = _report([0.0133, 0.7100], {"t1": 0.0137, "gender": 0.7100}, {"t1": 943, "gender": 943})
    assert report["learned_nothing"] == ["t1", "gender"]
    assert report["notes"] == [
        "t1 learned nothing: its test mrr@5 0.0133 does not beat the most popular reference 0.0137",
        "gender learned nothing: its test acc 0.7100 does not beat the majority class reference 0.7100",
    ]
    lines = format_table(report).splitlines()
    assert report["notes"][0] in lines and report["notes"][1] in lines


def test_tasks_that_beat_their_reference_on_enough_users_get_no_note() -> None:
    report = _report([0.0400, 0.7200], {"t1": 0.0137, "gender": 0.7100}, {"t1": 943, "gender": SMALL_VALIDATION})
    assert report["learned_nothing"] == [] and report["notes"] == []
    table = format_table(report).splitlines()
    assert table[5].split() == ["valid", "examples", "943", str(SMALL_VALIDATION)]


def test_a_small_validation_split_is_noted() -> None:
    report = _report([0.0400, 0.7200], {"t1": 0.0137, "gender": 0.7100}, {"t1": 45, "gender": 943})
    assert report["learned_nothing"] == []
    assert len(report["notes"]) == 1
    assert report["notes"][0].startswith("fewer than 300 validation examples (t1 45): best epochs")


def test_an_experiment_names_a_task_whose_interval_holds_its_reference() -> None:
    from pathlib import Path

    from conure_dist.experiment.report import format_markdown, summarize
    from conure_dist.experiment.spec import Experiment, Variant

    def run(seed: int, t1: float, gender: float) -> dict:
        return {
            "tasks": [
                {"name": "t1", "kind": "sequence", "primary_metric": "mrr@5"},
                {"name": "gender", "kind": "class", "primary_metric": "acc"},
            ],
            "matrix": [[t1, None], [t1, gender]],
            "reference": {"t1": 0.0137, "gender": 0.70},
            "seed": seed,
            "wall_seconds": 1.0,
            "num_backbones": 1,
            "stored_parameters": 100,
        }

    # T1 is clearly above popularity; gender's scores straddle the majority class.
    runs = [run(0, 0.030, 0.69), run(1, 0.032, 0.72), run(2, 0.031, 0.71)]
    experiment = Experiment(Path("e.yaml"), Path("b.yaml"), [], ["stl"], [0, 1, 2], [Variant("main")])
    summary = summarize(experiment, {"main": {"stl": runs}}, wall_seconds=1.0)
    assert summary["variants"]["main"]["stl"]["learned_nothing"] == ["gender"]
    lines = format_markdown(summary).splitlines()
    assert [line for line in lines if "learned nothing" in line] == [
        "- stl: gender learned nothing: its final test score 0.7067 ± 0.0379 over 3 seeds does not exclude "
        "the trivial reference 0.7000."
    ]
