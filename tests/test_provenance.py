"""The provenance record every report and benchmark carries."""

import subprocess
from pathlib import Path

import torch

from conure_dist import provenance

REPO = Path(__file__).resolve().parents[1]


def test_environment_names_threads_versions_and_commit():
    provenance.git_commit.cache_clear()  # the commit is read once per process; this test reads it afresh
    env = provenance.environment("cpu")
    assert env["threads"] == torch.get_num_threads()
    assert env["torch"] == torch.__version__
    assert env["device"] == "cpu" and env["cuda"] == torch.version.cuda
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI's clean clone is one)
        assert env["commit"].removesuffix("-dirty") == head.stdout.strip()


def test_package_version_of_an_absent_distribution_is_none():
    assert provenance.package_version("no-such-distribution-xyz") is None
    assert provenance.package_version("torch").split("+")[0] == torch.__version__.split("+")[0]
