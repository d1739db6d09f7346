"""The JSONL event log stays strict JSON whatever a run's numbers are."""

import json

import pytest

from conure_dist.train.logger import JsonlLogger


def _strict(text: str) -> dict:
    def refuse(name: str) -> None:
        raise ValueError(f"non-JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_are_logged_as_null(tmp_path):
    logger = JsonlLogger(str(tmp_path / "log.jsonl"))
    logger.log("epoch", loss=float("nan"), valid={"mrr@5": float("inf"), "count": 3}, history=[1.5, float("-inf")])
    logger.log("done", wall_seconds=2.0)
    first, second = [_strict(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert first["loss"] is None and first["valid"] == {"mrr@5": None, "count": 3} and first["history"] == [1.5, None]
    assert second["event"] == "done" and second["wall_seconds"] == 2.0
    with pytest.raises(ValueError, match="NaN"):
        _strict('{"loss": NaN}')
