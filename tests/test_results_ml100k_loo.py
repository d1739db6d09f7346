"""docs/results/ml100k_loo.py's RecBole row: seeds run now (``seed*/result.json``) join the seeds
an earlier summary recorded, a seed run again replaces its recorded figures, and the row says
which seeds came from the record."""

import importlib.util
import json

import pytest
from helpers import REPO

spec = importlib.util.spec_from_file_location("ml100k_loo_results", REPO / "docs/results/ml100k_loo.py")
results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results)


def _result(seed: int, mrr: float) -> dict:
    return {
        "test": {"mrr@5": mrr, "ndcg@5": mrr + 0.01, "hit@5": mrr + 0.02},
        "settings": {"model": "NextItNet", "seed": seed},
        "best_epoch": 2,
        "epochs_run": 5,
        "train_prefixes_per_s": 500.0 + seed,
        "recbole": "1.2.1",
        "threads": 1,
    }


def test_recbole_seeds_run_now_join_and_replace_the_recorded_ones(tmp_path):
    folder = tmp_path / "recbole"
    for seed, mrr in ((1, 0.030), (3, 0.020)):
        (folder / f"seed{seed}").mkdir(parents=True)
        (folder / f"seed{seed}" / "result.json").write_text(json.dumps(_result(seed, mrr)))
    earlier = results._recbole(str(folder))
    assert earlier["seeds"] == [1, 3] and earlier["recorded_seeds"] == []
    summary = tmp_path / "summary.json"
    # The record holds seeds 0 and 1; seed 1 is also in the folder, whose run counts.
    recorded = {**_result(0, 0.010), "seeds": [0, 1], "per_seed": {"mrr@5": [0.010, 0.999]}}
    recorded["per_seed"].update({"ndcg@5": [0.02, 0.999], "hr@5": [0.03, 0.999]})
    recorded.update(best_epoch=[1, 1], epochs_run=[4, 4], train_prefixes_per_s=[400.0, 401.0])
    summary.write_text(json.dumps({"rows": {results.RECBOLE_ROW: recorded}}))
    row = results._recbole(str(folder), str(summary))
    assert row["seeds"] == [0, 1, 3] and row["recorded_seeds"] == [0]
    assert row["per_seed"]["mrr@5"] == [0.010, 0.030, 0.020]
    assert row["per_seed"]["hr@5"] == [0.03, pytest.approx(0.05), pytest.approx(0.04)]
    assert row["train_prefixes_per_s"] == [400.0, 501.0, 503.0] and row["epochs_run"] == [4, 5, 5]
    assert row["test"]["mrr@5"]["n"] == 3 and row["test"]["mrr@5"]["mean"] == pytest.approx(0.02)
