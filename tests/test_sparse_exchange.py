"""``dist.sparse_exchange``: auto picks an exchange per item table from the communication model,
logs its figures once per phase, and trains exactly what both fixed choices train."""

from __future__ import annotations

import json

import pytest
from helpers import conure, tiny_config

from conure_dist.config import ConfigError, load_config


def test_unknown_exchange_is_refused(tmp_path):
    config = tiny_config(tmp_path, [("t1", 0.5)])
    with pytest.raises(ConfigError, match="dist.sparse_exchange"):
        load_config(config, ["dist.sparse_exchange=sometimes"])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_auto_trains_what_both_fixed_exchanges_train(tmp_path):
    config = tiny_config(tmp_path, [("t1", 0.5), ("click", 0.5)])
    reports, logs = {}, {}
    for mode in ("auto", "row_sparse", "dense"):
        out = tmp_path / mode
        conure("run", "--config", str(config), "--out", str(out), f"dist.sparse_exchange={mode}", nproc=2)
        reports[mode] = json.loads((out / "report.json").read_text())
        logs[mode] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for mode in ("row_sparse", "dense"):
        # Halving is exact: the dense (DDP) and row-sparse averages of two ranks are the same floats.
        assert reports[mode]["task_checksums"] == reports["auto"]["task_checksums"], mode
        assert reports[mode]["matrix"] == reports["auto"]["matrix"], mode
    events = [e for e in logs["auto"] if e["event"] == "sparse_exchange"]
    # T1's train phase (embedding, softmax weight and bias) and retrain phase (softmax), once each.
    assert [(e["task"], e["phase"], len(e["tables"])) for e in events] == [("t1", "train", 3), ("t1", "retrain", 2)]
    for event in events:
        assert event["link"] == "gloo" and event["mode"] == "auto"
        for table in event["tables"]:
            assert table["row_sparse_seconds"] > 0 and table["dense_seconds"] > 0
            faster = "row_sparse" if table["row_sparse_seconds"] < table["dense_seconds"] else "dense"
            assert table["choice"] == faster
            assert (table["table"] in event["row_sparse"]) == (faster == "row_sparse")
    fixed = [e for e in logs["row_sparse"] if e["event"] == "sparse_exchange"]
    assert fixed[0]["row_sparse"] == [t["table"] for t in fixed[0]["tables"]]
