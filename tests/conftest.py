import json
import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Keep test runs quiet and reproducible on small CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# A worker process that crashes (a signal, an abort in native code) prints every thread's
# Python stack to its stderr, which the failing test shows.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


def _torch_state() -> tuple:
    import torch

    return (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )


_TORCH_AT_START = _torch_state()


@pytest.fixture(autouse=True)
def _torch_global_state():
    """What a run switches in this process's torch (threads, deterministic algorithms, the NaN
    fill of empty tensors) is put back as it was when the session started after each test (and
    after the shared fixtures its first test set up), whether the run finished or raised: no
    test inherits another's settings."""
    import torch

    yield
    threads, deterministic, warn_only, fill = _TORCH_AT_START
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible HTTP server (moto) on 127.0.0.1 with a bucket ``conure-test``.

    Clients find it through the standard AWS variables, which subprocesses (torchrun workers)
    inherit too.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in AWS_VARIABLES}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing-key-id",
        AWS_SECRET_ACCESS_KEY="testing-secret-key",
        AWS_ENDPOINT_URL=endpoint,
        AWS_DEFAULT_REGION="us-east-1",
    )
    import fsspec

    fsspec.get_filesystem_class("s3").clear_instance_cache()
    fsspec.filesystem("s3").mkdir("conure-test")
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        fsspec.get_filesystem_class("s3").clear_instance_cache()
        server.stop()


AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")


@pytest.fixture(scope="session")
def tiny_trained_run(tmp_path_factory) -> Path:
    """A tiny finished run of a sequence, an item and a class task (t1, click, gender), trained
    once through the CLI (in this process) for the tests that use a trained model (export, embed, serve).
    Tests read it; what they write goes next to it, never into it."""
    from helpers import cli, tiny_config

    tmp = tmp_path_factory.mktemp("tiny_trained")
    cli(
        "run",
        "--config",
        str(tiny_config(tmp, [("t1", 0.6), ("click", 0.5), ("gender", 0.5)])),
        "--out",
        str(tmp / "run"),
    )
    return tmp / "run"


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """The quick-start preset, run once through the CLI (in this process) for the tests of what
    it gives and for the 2-process comparison: this process's torch threads (so that evaluating
    its checkpoints here repeats its scores exactly), the stride partition (which that comparison
    needs; on one process both partitions read everything), every checkpoint kept so that old
    logits can be compared. (data root, run directory, report); tests read it, never write into
    it."""
    from helpers import cli

    tmp = tmp_path_factory.mktemp("quickstart")
    out = tmp / "run"
    cli(
        "run",
        "--config",
        str(REPO / "configs" / "quickstart.yaml"),
        "--out",
        str(out),
        f"data.root={tmp / 'data'}",
        "train.progress=false",
        "train.keep_checkpoints=100",
        "data.partition=stride",
        threads=None,
    )
    return tmp / "data", out, json.loads((out / "report.json").read_text())
