"""docs/results/cap_binding.py: which phases ran to their epoch cap while still improving."""

import importlib.util
import json

from helpers import REPO

spec = importlib.util.spec_from_file_location("cap_binding", REPO / "docs" / "results" / "cap_binding.py")
cap_binding = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cap_binding)

CONFIG = {
    "train": {"class_selection": "nll", "topk": 5},
    "tasks": [
        {"name": "t1", "epochs": 2, "retrain_epochs": 1},
        {"name": "click", "epochs": 4, "retrain_epochs": 2},
        {"name": "gender", "epochs": 5, "retrain_epochs": 2},
    ],
}


def write_run(root, method, seed, curves):
    """A finished run: its report's config, and a log of each phase's validation per epoch
    (epoch 0 = its start)."""
    run = root / "runs" / "main" / method / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps({"config": CONFIG}))
    events = [{"event": "start", "config": CONFIG}]
    for (task, phase), valid in curves.items():
        events += [
            {"event": "epoch", "task": task, "phase": phase, "epoch": i, "valid": v} for i, v in enumerate(valid)
        ]
    (run / "log.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")


def mrr(*values):
    return [{"mrr@5": v, "count": 10} for v in values]


def test_counts_runs_that_reach_their_cap_and_peak_near_it(tmp_path):
    # click train: cap 4. Seed 0 peaks at its last epoch; seed 1 stops early (patience) at epoch 2.
    write_run(
        tmp_path,
        "conure",
        0,
        {
            ("t1", "train"): mrr(0, 0.1, 0.2),
            ("click", "train"): mrr(0, 0.1, 0.2, 0.3, 0.4),
            ("click", "retrain"): mrr(0.4, 0.3, 0.2),
        },
    )
    write_run(tmp_path, "conure", 1, {("click", "train"): mrr(0, 0.5, 0.1)})
    # gender selects on validation NLL, not accuracy: accuracy rises at the cap, NLL was best at 1.
    gender = [{"acc": a, "nll": n} for a, n in ((0.5, 0.9), (0.6, 0.5), (0.6, 0.6), (0.6, 0.7), (0.6, 0.8), (0.9, 0.9))]
    write_run(tmp_path, "stl", 0, {("gender", "train"): gender})
    counts = cap_binding.cap_binding([tmp_path])
    assert counts[("conure", "click", "train")] == {"runs": 2, "reached_cap": 1, "best_near_cap": 1}
    # Retrain: ran to its cap of 2, but its best epoch is the start.
    assert counts[("conure", "click", "retrain")] == {"runs": 1, "reached_cap": 1, "best_near_cap": 0}
    assert counts[("stl", "gender", "train")] == {"runs": 1, "reached_cap": 1, "best_near_cap": 0}
    assert ("conure", "t1", "train") not in counts
    assert cap_binding.cap_binding([tmp_path], t1=True)[("conure", "t1", "train")]["best_near_cap"] == 1
    # A resumed run logs the epochs it trains again a second time: they count once.
    write_run(tmp_path, "stl", 1, {("click", "train"): mrr(0, 0.1, 0.2, 0.3)})
    log = tmp_path / "runs/main/stl/seed1/log.jsonl"
    redo = [
        {"event": "epoch", "task": "click", "phase": "train", "epoch": i, "valid": v}
        for i, v in zip((2, 3), mrr(0.2, 0.3), strict=True)
    ]
    log.write_text(log.read_text() + "".join(json.dumps(e) + "\n" for e in redo))
    assert cap_binding.cap_binding([tmp_path])[("stl", "click", "train")] == {
        "runs": 1,
        "reached_cap": 0,
        "best_near_cap": 1,
    }
    # Ties keep the first best epoch, as training does: a plateau from epoch 1 is not near the cap.
    write_run(tmp_path, "finesmax", 0, {("click", "train"): mrr(0, 0.3, 0.3, 0.3, 0.3)})
    assert cap_binding.cap_binding([tmp_path])[("finesmax", "click", "train")]["best_near_cap"] == 0
