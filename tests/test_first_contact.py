"""What a new user meets first: one-line errors for their mistakes (tracebacks for bugs), the
summary line, and what ``predict`` prints for a class task."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from conure_dist.cli import main
from conure_dist.errors import UserError
from conure_dist.report import format_table
from conure_dist.serving.inference import format_record


def test_a_user_mistake_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["run", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'nope.yaml'}: config file not found\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "log.jsonl").write_text("{oops\n")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'a' / 'log.jsonl'} line 1: not JSON")


@pytest.mark.slow
def test_an_internal_value_error_keeps_its_traceback(tmp_path, monkeypatch):
    import conure_dist.experiment.compare as compare

    def broken(*runs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(compare, "compare_runs", broken)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        main(["compare", str(tmp_path), str(tmp_path)])
    # Through the interpreter, as a user would see it: the traceback, and not the user-error code.
    code = (
        "import sys, conure_dist.experiment.compare as c\n"
        "def broken(*runs): raise ValueError('an internal invariant broke')\n"
        "c.compare_runs = broken\n"
        "from conure_dist.cli import main\n"
        f"sys.exit(main(['compare', {str(tmp_path)!r}, {str(tmp_path)!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().endswith("ValueError: an internal invariant broke")


def test_user_errors_are_value_errors_and_config_errors_are_user_errors():
    from conure_dist.config import ConfigError
    from conure_dist.data.stream import ShardError

    assert issubclass(UserError, ValueError) and issubclass(ConfigError, UserError)
    assert issubclass(ShardError, UserError)


def _report(world_size: int, engine: str, zero_stage: int = 0) -> dict:
    return {
        "tasks": [{"name": "t1", "primary_metric": "mrr@5"}],
        "matrix": [[0.5]],
        "capacity": [],
        "reference": {},
        "wall_seconds": 1.25,
        "world_size": world_size,
        "engine": engine,
        "config": {"dist": {"engine": engine, "zero_stage": zero_stage}},
    }


@pytest.mark.parametrize(
    "world_size,engine,stage,line",
    [
        (1, "ddp", 0, "wall 1.2s, 1 process (no DDP)"),
        (2, "ddp", 0, "wall 1.2s, 2 processes, DDP"),
        (4, "deepspeed", 2, "wall 1.2s, 4 processes, DeepSpeed ZeRO-2"),
        (1, "deepspeed", 1, "wall 1.2s, 1 process, DeepSpeed ZeRO-1"),
    ],
)
def test_the_summary_line_says_what_ran(world_size, engine, stage, line):
    assert format_table(_report(world_size, engine, stage)).splitlines()[-1] == line


def test_predict_gives_class_probabilities_that_sum_to_one():
    logits = torch.tensor([-0.064, -1.322])
    record = format_record("class", logits, k=5, class_names=["F", "M"])
    assert record["class"] == 0 and record["label"] == "F" and "scores" not in record
    p0 = 1 / (1 + math.exp(-1.322 + 0.064))  # softmax of two logits: the sigmoid of their difference
    assert record["probabilities"] == [0.77868, 0.22132] == pytest.approx([p0, 1 - p0], abs=1e-4)
    assert sum(record["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    items = format_record("item", torch.tensor([0.1, 2.0, -1.0, 3.0]), k=2)
    assert items == {"items": [3, 1], "scores": [3.0, 2.0]}
