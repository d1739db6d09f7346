"""``conure serve`` over a tiny trained run: a real server process, a real HTTP client.

Answers must equal ``conure predict --input`` for the same histories, whatever they were batched
with; concurrent requests must share forward passes; every bad request gets a 4xx that names
the field at fault, and the server keeps answering.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from conftest import free_port
from helpers import REPO, cli

from conure_dist.serving.inference import load_trained, pad_history, score_histories, task_view
from conure_dist.serving.serve import MAX_SEQUENCES, build_app

pytestmark = pytest.mark.slow

MAX_BATCH = 16
K = 7
# Histories of every shape: shorter than seq_len (10), longer (truncated), inner padding zeros.
_rng = random.Random(7)
HISTORIES = [[_rng.randint(1, 60) for _ in range(_rng.randint(1, 14))] for _ in range(18)] + [[0, 4, 0, 9], [60]]


@pytest.fixture(scope="module")
def run_dir(tiny_trained_run: Path) -> Path:
    return tiny_trained_run


@pytest.fixture(scope="module")
def client(run_dir) -> Iterator[httpx.Client]:
    """``conure serve`` in its own process, as a user starts it."""
    port = free_port()
    log = (run_dir.parent / "serve.log").open("w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "conure_dist",
            "serve",
            "--ckpt",
            str(run_dir),
            "--port",
            str(port),
            "--max-batch",
            str(MAX_BATCH),
            "--max-wait-ms",
            "20",
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_up(base, lambda: proc.poll() is None, run_dir.parent / "serve.log")
        with httpx.Client(base_url=base, timeout=30) as http:
            yield http
        assert proc.poll() is None, "the server died during the tests"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _wait_up(base: str, alive, log_path: Path | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert alive(), f"the server exited:\n{log_path.read_text()[-3000:] if log_path else ''}"
        try:
            if httpx.get(f"{base}/health", timeout=1).json() == {"status": "ok"}:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"no answer from {base}/health within {timeout} s")


@contextmanager
def in_thread_server(app) -> Iterator[httpx.Client]:
    """``app`` served by uvicorn on a free port from a thread of this process."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait_up(f"http://127.0.0.1:{port}", thread.is_alive)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            yield http
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def cli_predict(run_dir: Path, task: str, histories: list[list[int]], k: int) -> list[dict]:
    """What ``conure predict --input`` prints for ``histories``, one record each."""
    path = run_dir.parent / f"in-{task}.jsonl"
    path.write_text("".join(json.dumps({"seq": h}) + "\n" for h in histories))
    out = cli("predict", "--ckpt", str(run_dir), "--task", task, "--input", str(path), "--k", str(k))
    return [json.loads(line) for line in out.splitlines()]


def stats(client: httpx.Client, task: str) -> dict[str, int]:
    return client.get("/stats").json()["tasks"][task]


def test_a_history_scores_the_same_alone_and_in_any_batch(run_dir):
    """What makes the server's answers equal ``conure predict``'s: a row's scores do not depend,
    to the last bit, on the batch it is scored in (without the padding to 16 rows, 1 to 3 rows
    take other BLAS paths and differ)."""
    run = load_trained(str(run_dir))
    rows = torch.tensor([pad_history(h, 10) for h in HISTORIES])
    for task in run.finished:
        view = task_view(run, task)
        together = score_histories(view, task, rows)
        for size in (1, 2, 3, 7):
            parts = torch.cat([score_histories(view, task, rows[i : i + size]) for i in range(0, len(rows), size)])
            assert torch.equal(parts, together), (task, size)


def test_health_and_tasks_list_the_finished_tasks(client):
    assert client.get("/health").json() == {"status": "ok"}
    listing = client.get("/tasks").json()
    assert [(t["name"], t["kind"], t["num_outputs"]) for t in listing["tasks"]] == [
        ("t1", "sequence", 61),
        ("click", "item", 300),
        ("gender", "class", 2),
    ]
    assert listing["tasks"][2]["class_names"] == ["F", "M"]  # from the run's manifest
    assert listing["unfinished"] == [] and listing["manifest"] is True
    assert (listing["seq_len"], listing["num_items"]) == (10, 61)


@pytest.mark.parametrize("task", ["t1", "click", "gender"])
def test_answers_equal_conure_predict_single_and_batched(client, run_dir, task):
    expected = cli_predict(run_dir, task, HISTORIES, K)
    assert len(expected) == len(HISTORIES) == 20
    singles = [client.post("/predict", json={"task": task, "seq": h, "k": K}) for h in HISTORIES]
    assert [r.status_code for r in singles] == [200] * 20
    assert [r.json() for r in singles] == expected
    before = stats(client, task)
    batch = client.post("/predict", json={"task": task, "sequences": HISTORIES, "k": K})
    assert batch.status_code == 200 and batch.json() == {"results": expected}
    after = stats(client, task)
    # 20 histories in one request: two passes of at most MAX_BATCH (16) rows.
    assert (
        after["requests"] - before["requests"],
        after["sequences"] - before["sequences"],
        after["forward_passes"] - before["forward_passes"],
    ) == (1, 20, 2)
    if task == "gender":
        assert all(r["label"] == "FM"[r["class"]] and len(r["probabilities"]) == 2 for r in expected)
    else:
        assert all(len(r["items"]) == K == len(r["scores"]) for r in expected)


def test_concurrent_requests_share_forward_passes_and_answer_correctly(client):
    histories = [HISTORIES[i % len(HISTORIES)] for i in range(32)]
    expected = {
        task: client.post("/predict", json={"task": task, "sequences": histories, "k": 3}).json()["results"]
        for task in ("t1", "click")
    }
    before = {task: stats(client, task) for task in expected}

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=30) as http:
            return await asyncio.gather(
                *(http.post("/predict", json={"task": task, "seq": h, "k": 3}) for h in histories for task in expected)
            )

    responses = asyncio.run(fire())
    answers = [r.json() for r in responses]
    assert [r.status_code for r in responses] == [200] * 64
    assert answers == [expected[task][i] for i in range(32) for task in expected]
    for task in expected:
        after = stats(client, task)
        assert after["requests"] - before[task]["requests"] == 32
        assert after["sequences"] - before[task]["sequences"] == 32
        passes = after["forward_passes"] - before[task]["forward_passes"]
        # 32 requests in batches of at most 16 rows: 2 passes at best, 32 without batching; here
        # 3 to 7 (connections open while the first batch waits). At most 16: 2 requests a pass.
        assert 2 <= passes <= 16, passes


def test_k_beyond_the_candidates_lists_every_real_item(client):
    """t1 has 60 items and the padding id 0, whose score (-inf) is never listed; click has 300."""
    t1 = client.post("/predict", json={"task": "t1", "seq": [4, 5], "k": 1000}).json()
    assert sorted(t1["items"]) == list(range(1, 61)) and t1["scores"] == sorted(t1["scores"], reverse=True)
    click = client.post("/predict", json={"task": "click", "seq": [4, 5], "k": 1000}).json()
    assert sorted(click["items"]) == list(range(300))


BAD_REQUESTS = [
    ({"task": "nope", "seq": [1]}, 404, "task: no task 'nope' in this checkpoint (finished tasks: t1, click, gender)"),
    ({"task": "t1", "seq": [1, 2.5]}, 422, "seq[1]: Input should be a valid integer"),
    ({"task": "t1", "seq": [1, True]}, 422, "seq[1]: Input should be a valid integer"),
    ({"task": "t1", "seq": "1 2 3"}, 422, "seq: Input should be a valid list"),
    ({"task": "t1", "seq": [3, 61]}, 422, "seq: item ids [61] are outside the T1 vocabulary 1..60"),
    ({"task": "click", "seq": [-3, 4]}, 422, "seq: item ids [-3] are outside the T1 vocabulary 1..60"),
    ({"task": "gender", "seq": [0, 0]}, 422, "seq: the sequence has no item (0 is padding)"),
    ({"task": "t1", "seq": []}, 422, "seq: List should have at least 1 item"),
    ({"task": "t1", "seq": [1], "k": 0}, 422, "k: Input should be greater than or equal to 1"),
    ({"task": "t1", "seq": [1], "k": 1001}, 422, "k: Input should be less than or equal to 1000"),
    ({"task": "t1", "seq": [1], "k": "5"}, 422, "k: Input should be a valid integer"),
    ({"task": "t1", "seq": [1], "sequences": [[1]]}, 422, "body: give exactly one of 'seq'"),
    ({"task": "t1"}, 422, "body: give exactly one of 'seq' (one history) or 'sequences'"),
    ({"task": "t1", "sequences": [[1], [2], [5, 99]]}, 422, "sequences[2]: item ids [99] are outside"),
    ({"task": "t1", "sequences": [[1], []]}, 422, "sequences[1]: List should have at least 1 item"),
    ({"task": "t1", "sequences": [[1]] * (MAX_SEQUENCES + 1)}, 422, "sequences: List should have at most 1024 items"),
    ({"task": "t1", "seqs": [1]}, 422, "seqs: Extra inputs are not permitted"),
    ({"seq": [1]}, 422, "task: Field required"),
    ([1, 2], 422, "body: a JSON object is required"),
    (b'{"task": "t1", "seq": [1, 2', 400, "body: not valid JSON"),
    (b"", 422, "body: a JSON object is required"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_REQUESTS, ids=[m[:40] for _, _, m in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_naming_the_problem(client, body, status, message):
    if isinstance(body, bytes):
        response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    else:
        response = client.post("/predict", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    # ... and the server keeps answering.
    good = client.post("/predict", json={"task": "click", "seq": [1, 2, 3], "k": 2})
    assert good.status_code == 200 and len(good.json()["items"]) == 2


def test_an_unfinished_task_is_refused_and_earlier_tasks_answer_as_before(client, run_dir):
    """The checkpoint after click: gender is not finished. t1 and click answer under views that
    later tasks never changed, so exactly as the final checkpoint's server does."""
    folder = next((run_dir / "checkpoints").glob("*-click-done"))
    with in_thread_server(build_app(str(folder), max_batch=4, max_wait_ms=1)) as early:
        listing = early.get("/tasks").json()
        assert [t["name"] for t in listing["tasks"]] == ["t1", "click"] and listing["unfinished"] == ["gender"]
        refused = early.post("/predict", json={"task": "gender", "seq": [1, 2]})
        assert refused.status_code == 409
        assert refused.json()["detail"] == (
            "task: 'gender' is not finished in this checkpoint (finished tasks: t1, click)"
        )
        for task in ("t1", "click"):
            body = {"task": task, "sequences": HISTORIES[:6], "k": 4}
            assert early.post("/predict", json=body).json() == client.post("/predict", json=body).json()


def test_the_checkpoint_alone_is_enough(client, run_dir):
    """Without the shards (manifest gone) the server still answers, in ids and class indices."""
    data, away = run_dir.parent / "data", run_dir.parent / "data-away"
    data.rename(away)
    try:
        app = build_app(str(run_dir))
    finally:
        away.rename(data)
    with in_thread_server(app) as bare:
        listing = bare.get("/tasks").json()
        assert listing["manifest"] is False and listing["tasks"][2]["class_names"] is None
        body = {"task": "gender", "sequences": HISTORIES[:5]}
        with_labels = client.post("/predict", json=body).json()["results"]
        assert bare.post("/predict", json=body).json()["results"] == [
            {k: v for k, v in r.items() if k != "label"} for r in with_labels
        ]
        assert all("label" in r for r in with_labels)


def test_serve_refuses_a_missing_checkpoint(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "conure_dist", "serve", "--ckpt", str(tmp_path / "none")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "error:" in result.stderr and str(tmp_path / "none") in result.stderr


def _raw_post(base: str, head: bytes, parts: list[bytes]) -> tuple[int, dict, int]:
    """POST ``head`` (request line and headers), then body ``parts`` one by one on a plain socket
    until the server answers; (status, JSON body, parts sent before the answer came)."""
    import socket

    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        sent = 0
        sock.settimeout(0.2)
        reply = b""
        for part in [*parts, None]:
            try:
                reply += sock.recv(65536)
            except TimeoutError:
                pass
            if reply or part is None:
                break
            try:
                sock.sendall(part)
            except OSError:  # the server closed the connection after answering
                break
            sent += 1
        sock.settimeout(30)
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            more = sock.recv(65536)
            if not more:
                break
            reply += more
    status = int(reply.split(b" ", 2)[1])
    return status, json.loads(reply.split(b"\r\n\r\n", 1)[1].decode()), sent


def test_a_body_over_the_limit_gets_413_before_it_is_read(client, run_dir):
    # Declared too large: refused before one byte of the body is sent.
    base = str(client.base_url).rstrip("/")
    head = b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 104857600\r\n\r\n"
    status, body, sent = _raw_post(base, head, [b" " * 65536] * 16)
    assert status == 413 and sent == 0
    assert body["detail"] == "body: larger than the server's limit of 1048576 bytes (conure serve --max-body-bytes)"
    assert client.post("/predict", json={"task": "click", "seq": [1, 2, 3], "k": 2}).status_code == 200
    # Chunked (no length): counted as it arrives, refused at the chunk that passes the limit, long
    # before the 100 MB the client would send.
    with in_thread_server(build_app(str(run_dir), max_body_bytes=5000)) as small:
        base = str(small.base_url).rstrip("/")
        head = (
            b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        chunk = b"1000\r\n" + b" " * 4096 + b"\r\n"
        status, body, sent = _raw_post(base, head, [chunk] * 25_600)
        assert status == 413 and sent < 100
        assert "limit of 5000 bytes" in body["detail"]
        fits = {"task": "click", "sequences": HISTORIES, "k": 3}  # about 1 KB
        assert small.post("/predict", json=fits).json() == client.post("/predict", json=fits).json()
        assert small.get("/stats").json()["max_body_bytes"] == 5000


def test_predict_scores_a_long_input_in_bounded_passes_with_the_same_answers(run_dir, monkeypatch):
    from conure_dist.serving import inference

    histories = HISTORIES * 3  # 60 rows
    whole = cli_predict(run_dir, "click", histories, K)  # one pass of 60 rows
    passes = []
    real = inference.score_histories
    monkeypatch.setattr(inference, "PREDICT_ROWS", 16)
    monkeypatch.setattr(inference, "score_histories", lambda *a: passes.append(len(a[2])) or real(*a))
    assert cli_predict(run_dir, "click", histories, K) == whole
    assert passes == [16, 16, 16, 12]  # memory holds 16 rows of scores, not 60
