"""s3:// under faults, against a real S3-compatible server (moto) and real sockets on 127.0.0.1:
buckets are never created implicitly, requests give up after a bounded number of attempts, and
every failure is one line naming the endpoint and the URL."""

import contextlib
import io
import socket
import threading
import time

import fsspec
import pytest
import torch
from conftest import free_port
from helpers import tiny_config

from conure_dist.checkpoint.checkpointer import Checkpointer
from conure_dist.cli import main
from conure_dist.dist import DistInfo
from conure_dist.object_store import MAX_ATTEMPTS, MissingBucketError, ObjectStoreError, StoreFileSystem

CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)


@pytest.fixture
def fresh_clients():
    """Filesystems built from the environment as it is now (fsspec caches them per arguments)."""
    StoreFileSystem.clear_instance_cache()
    yield
    StoreFileSystem.clear_instance_cache()


def _run_error(tmp_path, out: str) -> tuple[int, str, float]:
    """``conure run --out out`` on a tiny local dataset: exit code, stderr, seconds."""
    config = tiny_config(tmp_path, [("t1", 0.5)])
    err, start = io.StringIO(), time.monotonic()
    with contextlib.redirect_stderr(err):
        code = main(["run", "--config", str(config), "--out", out])
    return code, err.getvalue(), time.monotonic() - start


def test_a_mistyped_output_bucket_is_refused_and_never_created(s3_endpoint, tmp_path, fresh_clients):
    code, err, _ = _run_error(tmp_path, "s3://conure-tset/run")
    assert code == 2
    assert err.splitlines()[-1] == (
        f"error: --out s3://conure-tset/run: s3://conure-tset: no such bucket at {s3_endpoint}; buckets are "
        "never created implicitly: check the name, or create it first"
    )
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    assert "conure-tset" not in fs.ls("")


def test_the_checkpoint_writer_never_recreates_a_lost_bucket(s3_endpoint, fresh_clients):
    fs = fsspec.filesystem("s3")
    fs.mkdir("conure-midrun")  # a bucket asked for by name is still created
    writer = Checkpointer("s3://conure-midrun/run", CPU)
    writer.register("model.pt", torch.nn.Linear(2, 2))
    writer.register("ownership.pt", torch.nn.Linear(2, 1))
    writer.register("meta.json", {"format": 1})
    first = writer.save(0, "first")
    assert fs.exists(f"{first}/COMMIT")
    # The store restarts empty mid-run: the next checkpoint fails, naming the bucket, and the
    # bucket stays gone instead of coming back holding one lone checkpoint.
    fs.rm("conure-midrun", recursive=True)
    fs.invalidate_cache()
    assert "conure-midrun" not in fs.ls("")
    with pytest.raises(MissingBucketError, match="s3://conure-midrun: no such bucket"):
        writer.save(1, "second")
    fs.invalidate_cache()
    assert "conure-midrun" not in fs.ls("")


@contextlib.contextmanager
def _silent_endpoint():
    """A TCP server on 127.0.0.1 that accepts connections and never answers; yields (url, count)."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    finally:
        server.close()
        for conn in accepted:
            conn.close()


def test_a_silent_endpoint_fails_after_bounded_attempts_naming_it(monkeypatch, fresh_clients):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    with _silent_endpoint() as (endpoint, accepted):
        # 1 s timeouts instead of 5 and 10, so the test takes seconds; the attempts are the defaults'.
        fs = StoreFileSystem(endpoint_url=endpoint, config_kwargs={"connect_timeout": 1, "read_timeout": 1})
        start = time.monotonic()
        with pytest.raises(ObjectStoreError) as info:
            fs.cat_file("conure-test/run/report.json")
        elapsed = time.monotonic() - start
    message = str(info.value)
    assert message.startswith(f"s3://conure-test/run/report.json: the object store at {endpoint} did not answer")
    assert f"ReadTimeoutError after {MAX_ATTEMPTS} attempts" in message and "\n" not in message
    assert len(accepted) == MAX_ATTEMPTS  # botocore's retries only: s3fs's loop no longer multiplies them
    assert elapsed < MAX_ATTEMPTS * 1 + 10


def test_an_unreachable_endpoint_or_no_credentials_is_one_line(monkeypatch, tmp_path, fresh_clients):
    refused = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", refused)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    code, err, elapsed = _run_error(tmp_path, "s3://conure-test/run")
    assert code == 2 and elapsed < 60
    assert err.splitlines()[-1].startswith(
        f"error: --out s3://conure-test/run: s3://conure-test: the object store at {refused} did not answer "
        f"HeadBucket (EndpointConnectionError after {MAX_ATTEMPTS} attempts"
    )
    assert "Traceback" not in err

    StoreFileSystem.clear_instance_cache()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    code, err, _ = _run_error(tmp_path, "s3://conure-test/run")
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"error: --out s3://conure-test/run: s3://conure-test: no credentials for the object store at {refused} "
        "(Unable to locate credentials); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
    )
