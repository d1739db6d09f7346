"""``conure config``: every key documented, with the default or a preset's resolved value."""

import json
import subprocess
import sys

import pytest
from helpers import REPO

from conure_dist.config import RunConfig, load_config
from conure_dist.config.describe import describe, value_at


def test_every_key_is_listed_once_and_documented():
    keys = describe()
    names = [k.key for k in keys]
    assert len(names) == len(set(names))
    assert {"seed", "data.root", "data.synthetic.seed", "train.grad_accum", "tasks.*.lr", "dist.zero_stage"} <= set(
        names
    )
    assert [k.key for k in keys if not k.doc] == []  # a new field needs its docstring
    defaults = RunConfig().to_dict()
    for k in keys:
        if not k.key.startswith("tasks.*.") and k.default != "(required)":
            assert k.default == value_at(defaults, k.key), k.key
    assert next(k for k in keys if k.key == "tasks.*.name").doc.startswith("Task name")
    assert next(k for k in keys if k.key == "data.partition").type == "'auto' | 'range' | 'stride'"


@pytest.mark.slow
def test_the_command_shows_a_presets_values_after_overrides():
    preset = str(REPO / "configs" / "quickstart.yaml")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "conure_dist",
            "config",
            "--config",
            preset,
            "--json",
            "tasks.*.lr=0.01",
            "train.topk=7",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = {r["key"]: r for r in json.loads(out)}
    cfg = load_config(preset, ["tasks.*.lr=0.01", "train.topk=7"])
    assert rows["train.topk"]["value"] == 7 and rows["train.topk"]["default"] == 5
    assert rows["tasks.*.lr"]["value"] == [0.01] * len(cfg.tasks)
    assert rows["tasks.*.name"]["value"] == [t.name for t in cfg.tasks]
    bad = subprocess.run(
        [sys.executable, "-m", "conure_dist", "config", "train.topk=7"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "add --config" in bad.stderr
