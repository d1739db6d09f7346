"""Shards, checkpoints and reports on a real S3-compatible server (moto) through s3fs."""

import json
import shutil

import fsspec
import pytest
from helpers import cli, conure, tiny_config

pytestmark = pytest.mark.slow
TASKS = [("t1", 0.6), ("click", 0.5), ("gender", 0.5)]


def test_run_lives_in_s3_and_resumes_after_the_local_directory_is_gone(s3_endpoint, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    data, out = "s3://conure-test/e2e/data", "s3://conure-test/e2e/run"
    config = tiny_config(work, TASKS, data_root=data)
    command = ["run", "--config", config.name, "--out", out, "--resume"]
    conure(*command, nproc=2, cwd=work)

    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    manifest = json.loads(fs.cat_file("conure-test/e2e/data/manifest.json"))
    assert [t["name"] for t in manifest["tasks"]][:3] == ["t1", "click", "like"]
    first = json.loads(fs.cat_file("conure-test/e2e/run/report.json"))
    assert first["world_size"] == 2
    checkpoints = sorted(fs.ls("conure-test/e2e/run/checkpoints"))
    assert checkpoints[-1].endswith("gender-done") and fs.exists(checkpoints[-1] + "/COMMIT")

    # A crash before the last commit, and a lost machine: only the object store remains.
    fs.rm(checkpoints[-1] + "/COMMIT")
    fs.rm("conure-test/e2e/run/report.json")
    shutil.rmtree(work)
    work.mkdir()
    tiny_config(work, TASKS, data_root=data)
    conure(*command, nproc=2, cwd=work)

    fs.invalidate_cache()
    again = json.loads(fs.cat_file("conure-test/e2e/run/report.json"))
    assert again["matrix"] == first["matrix"]
    assert again["task_checksums"] == first["task_checksums"]
    starts = [
        json.loads(x) for x in fs.cat_file("conure-test/e2e/run/log.jsonl").decode().splitlines() if '"start"' in x
    ]
    assert starts[-1]["task_index"] == 2, "the second run resumed at the last task"
    audit = json.loads(cli("audit", "--ckpt", out, "--json"))
    assert audit["ok"] and audit["checkpoint"].startswith("s3://")

    # Credentials never reach logs, reports or checkpoints.
    import os

    secrets = [os.environ["AWS_SECRET_ACCESS_KEY"].encode(), os.environ["AWS_ACCESS_KEY_ID"].encode()]
    for path in fs.find("conure-test/e2e/run"):
        blob = fs.cat_file(path)
        assert not any(s in blob for s in secrets), f"credentials leaked into {path}"
