"""``conure serve``: an HTTP endpoint answering every finished task of a checkpoint.

The checkpoint is loaded once; each finished task answers under its own inference view, exactly
as ``conure predict --input`` does (the same padding, truncation and scoring code in
``conure_dist.serving.inference``). Requests for one task are batched dynamically: whatever arrives
within ``max_wait_ms`` of the first (up to ``max_batch`` histories) goes through one forward
pass. Forward passes run one at a time in a single worker thread, so the event loop keeps
accepting requests while the shared model computes.

Only the checkpoint is required. Where the manifest at the run's ``data.root`` is readable,
answers also carry raw item ids and class names.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from conure_dist.continual.views import MaskedModel
from conure_dist.errors import UserError
from conure_dist.serving.inference import (
    TrainedRun,
    check_history,
    format_record,
    load_trained,
    manifest_for,
    pad_history,
    score_histories,
    task_view,
)

log = logging.getLogger(__name__)

MAX_K = 1000
"""The most items one answer may list."""
MAX_SEQUENCES = 1024
"""The most histories one request may carry."""
MAX_BODY_BYTES = 1 << 20
"""Default request-body limit (``conure serve --max-body-bytes``): 1,024 histories of 100 ids
take about half of it."""

EXAMPLE = '{"task": "t1", "seq": [3, 5, 8], "k": 10}'
"""A request body, quoted where a body is refused."""

History = Annotated[list[StrictInt], Field(min_length=1)]


class PredictRequest(BaseModel):
    """``POST /predict``: one history (``seq``) or several (``sequences``) of T1 item ids, oldest
    first, for one task; ``k`` items per answer (item and sequence tasks)."""

    model_config = ConfigDict(extra="forbid")

    task: str
    seq: History | None = None
    sequences: Annotated[list[History], Field(min_length=1, max_length=MAX_SEQUENCES)] | None = None
    k: StrictInt = Field(5, ge=1, le=MAX_K)

    @model_validator(mode="after")
    def _one_form(self) -> PredictRequest:
        if (self.seq is None) == (self.sequences is None):
            raise ValueError("give exactly one of 'seq' (one history) or 'sequences' (a list of histories)")
        return self


class ServeError(Exception):
    """A request the server refuses: its HTTP status and a message naming the field at fault."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ServedTask:
    """A finished task as the server answers it: its view of the model and its extras."""

    name: str
    kind: str
    num_outputs: int
    view: MaskedModel
    class_names: list[str] | None = None
    vocab: list[str] | None = None

    @property
    def max_k(self) -> int:
        """Items an answer can list: every output, but never the sequence task's padding item 0
        (its score is -inf, which JSON cannot carry)."""
        return self.num_outputs - 1 if self.kind == "sequence" else self.num_outputs

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "num_outputs": self.num_outputs,
            "class_names": self.class_names,
            "raw_ids": self.vocab is not None,
        }


@dataclass
class Counters:
    """What the server has done, for ``GET /stats``: a batch proves itself by fewer forward
    passes than requests."""

    requests: int = 0
    sequences: int = 0
    forward_passes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "sequences": self.sequences, "forward_passes": self.forward_passes}


@dataclass
class Job:
    """One request waiting in a task's queue: its padded rows and ``k``; ``done`` gets its records."""

    rows: list[list[int]]
    k: int
    done: asyncio.Future


@dataclass
class Scorer:
    """The shared model and its tasks. ``answer`` runs in the worker thread, one call at a time."""

    run: TrainedRun
    tasks: dict[str, ServedTask]
    max_batch: int
    manifest_note: str | None = None

    def answer(self, task: str, jobs: list[tuple[list[list[int]], int]]) -> list[list[dict[str, Any]]]:
        """Records for each (rows, k) of ``task``, scored together in passes of ``max_batch`` rows."""
        served = self.tasks[task]
        rows = [row for job_rows, _ in jobs for row in job_rows]
        scores = torch.cat(
            [
                score_histories(served.view, task, torch.tensor(rows[i : i + self.max_batch]))
                for i in range(0, len(rows), self.max_batch)
            ]
        )
        records, start = [], 0
        for job_rows, k in jobs:
            part = scores[start : start + len(job_rows)]
            records.append([format_record(served.kind, row, k, served.class_names, served.vocab) for row in part])
            start += len(job_rows)
        return records


@dataclass
class TaskBatcher:
    """Collects one task's requests into batches and hands each to the worker thread."""

    task: str
    scorer: Scorer
    executor: ThreadPoolExecutor
    max_wait_s: float
    counters: dict[str, Counters]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    _carry: Job | None = None

    async def submit(self, rows: list[list[int]], k: int) -> list[dict[str, Any]]:
        job = Job(rows, k, asyncio.get_running_loop().create_future())
        self.queue.put_nowait(job)
        return await job.done

    async def run(self) -> None:
        """Forever: collect a batch, score it in the worker thread, answer its requests."""
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect(loop)
            try:
                records = await loop.run_in_executor(
                    self.executor, self.scorer.answer, self.task, [(job.rows, job.k) for job in jobs]
                )
            except Exception as exc:  # a failed pass fails its requests, not the server
                log.exception("task %s: forward pass failed", self.task)
                for job in jobs:
                    if not job.done.done():
                        job.done.set_exception(exc)
                continue
            rows = sum(len(job.rows) for job in jobs)
            for counter in (self.counters["*"], self.counters[self.task]):
                counter.requests += len(jobs)
                counter.sequences += rows
                counter.forward_passes += math.ceil(rows / self.scorer.max_batch)
            for job, answer in zip(jobs, records, strict=True):
                if not job.done.done():  # the client may have gone
                    job.done.set_result(answer)

    async def _collect(self, loop: asyncio.AbstractEventLoop) -> list[Job]:
        """The first waiting request and those that arrive within ``max_wait_s`` of it, up to
        ``max_batch`` rows (a request that would overflow waits for the next batch)."""
        first = self._carry or await self.queue.get()
        self._carry = None
        jobs, rows = [first], len(first.rows)
        deadline = loop.time() + self.max_wait_s
        while rows < self.scorer.max_batch:
            try:
                job = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    break
            if rows + len(job.rows) > self.scorer.max_batch:
                self._carry = job
                break
            jobs.append(job)
            rows += len(job.rows)
        return jobs


def load_scorer(ckpt: str, max_batch: int) -> Scorer:
    """The checkpoint's model with a view per finished task, and the manifest's extras (raw ids,
    class names) where the run's manifest can be read."""
    run = load_trained(ckpt)
    run.model.eval()
    extras = {name: (None, None) for name in run.finished}
    note = None
    try:
        manifest = manifest_for(run.ckpt, None)
        for name in run.finished:
            kind = run.model.kinds[name]
            extras[name] = (manifest.task(name).class_names, manifest.load_vocab(name) if kind != "class" else None)
    except Exception as exc:  # unreachable, absent or foreign shards: serve without the extras
        note = f"no manifest ({exc}): answers use T1 ids and class indices only"
        log.warning(note)
    tasks = {}
    for name in run.finished:
        spec = next(s for s in run.ckpt.meta["tasks"] if s["name"] == name)
        class_names, vocab = extras[name]
        tasks[name] = ServedTask(name, spec["kind"], int(spec["num_outputs"]), task_view(run, name), class_names, vocab)
    return Scorer(run, tasks, max_batch, note)


def parse_histories(body: PredictRequest, scorer: Scorer) -> tuple[ServedTask, list[list[int]], int]:
    """The task, the padded input rows and the effective ``k`` of a request; ServeError (404,
    409, 422) for an unknown or unfinished task or an id outside the T1 vocabulary."""
    run = scorer.run
    finished = ", ".join(run.finished) or "none"
    if body.task not in run.task_names:
        raise ServeError(404, f"task: no task '{body.task}' in this checkpoint (finished tasks: {finished})")
    if body.task not in scorer.tasks:
        raise ServeError(409, f"task: '{body.task}' is not finished in this checkpoint (finished tasks: {finished})")
    seq_len, num_items = int(run.ckpt.meta["seq_len"]), int(run.ckpt.meta["num_seq_items"])
    named = (
        [("seq", body.seq)]
        if body.seq is not None
        else [(f"sequences[{i}]", s) for i, s in enumerate(body.sequences or [])]
    )
    rows = []
    for where, seq in named:
        try:
            rows.append(pad_history(check_history(seq, num_items), seq_len))
        except ValueError as exc:
            raise ServeError(422, f"{where}: {exc}") from None
    served = scorer.tasks[body.task]
    return served, rows, min(body.k, served.max_k)


def _field(loc: tuple[Any, ...]) -> str:
    """``("body", "sequences", 2, 0)`` -> ``sequences[2][0]``: the field as the client wrote it."""
    parts = [p for p in loc if p != "body"]
    if not parts:
        return "body"
    name = str(parts[0])
    return name + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts[1:])


def validation_message(exc: RequestValidationError) -> tuple[int, str]:
    """Status and message for a body that failed to parse or validate: 400 for one that is not
    JSON, else 422 with every problem as ``field: what is wrong``."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, f"body: not valid JSON (send a JSON object such as {EXAMPLE})"
    problems = []
    for error in errors:
        where, msg = _field(tuple(error.get("loc", ()))), str(error.get("msg", "invalid"))
        if where == "body" and error.get("type") in ("missing", "model_attributes_type", "dict_type"):
            msg = f"a JSON object is required (content-type: application/json), such as {EXAMPLE}"
        problems.append(f"{where}: {msg.removeprefix('Value error, ')}")
    return 422, "; ".join(problems)


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 without being read. A declared
    ``Content-Length`` over the limit is refused before any byte of the body is received; a body
    without one (chunked) is counted as it arrives and refused at the chunk that passes the limit."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> str:
        return f"body: larger than the server's limit of {self.max_bytes} bytes (conure serve --max-body-bytes)"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await JSONResponse({"detail": self._too_large()}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def counted() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI passes an HTTPException raised while it reads the body on as it is.
                    raise HTTPException(413, self._too_large())
            return message

        await self.app(scope, counted, send)


def build_app(
    ckpt: str, max_batch: int = 64, max_wait_ms: float = 5.0, max_body_bytes: int = MAX_BODY_BYTES
) -> FastAPI:
    """The HTTP app over the checkpoint at ``ckpt`` (a run directory or a checkpoint folder),
    loaded here, once. ``max_batch`` histories at most per forward pass; a request waits at most
    ``max_wait_ms`` for others to share its pass; a body over ``max_body_bytes`` gets 413."""
    if max_batch < 1:
        raise UserError(f"max_batch: must be >= 1, got {max_batch}")
    if max_body_bytes < 1:
        raise UserError(f"max_body_bytes: must be >= 1, got {max_body_bytes}")
    if not max_wait_ms >= 0:
        raise UserError(f"max_wait_ms: must be >= 0, got {max_wait_ms}")
    scorer = load_scorer(ckpt, max_batch)
    counters = {name: Counters() for name in ["*", *scorer.tasks]}
    batchers: dict[str, TaskBatcher] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One worker thread: forward passes share one model and run one at a time.
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conure-forward")
        for name in scorer.tasks:
            batchers[name] = TaskBatcher(name, scorer, executor, max_wait_ms / 1000, counters)
        loops = [asyncio.create_task(b.run(), name=f"batcher-{name}") for name, b in batchers.items()]
        log.info("serving %s (tasks: %s)", scorer.run.ckpt.url, ", ".join(scorer.tasks))
        try:
            yield
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            executor.shutdown(wait=True)

    app = FastAPI(title="conure serve", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = validation_message(exc)
        return JSONResponse({"detail": message}, status_code=status)

    @app.exception_handler(ServeError)
    async def _refused(request: Request, exc: ServeError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/tasks")
    async def tasks() -> dict[str, Any]:
        meta = scorer.run.ckpt.meta
        return {
            "tasks": [t.describe() for t in scorer.tasks.values()],
            "unfinished": [n for n in scorer.run.task_names if n not in scorer.tasks],
            "seq_len": int(meta["seq_len"]),
            "num_items": int(meta["num_seq_items"]),
            "manifest": scorer.manifest_note is None,
        }

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return {
            **counters["*"].as_dict(),
            "max_batch": max_batch,
            "max_wait_ms": max_wait_ms,
            "max_body_bytes": max_body_bytes,
            "tasks": {name: counters[name].as_dict() for name in scorer.tasks},
        }

    @app.post("/predict")
    async def predict(body: PredictRequest) -> dict[str, Any]:
        served, rows, k = parse_histories(body, scorer)
        records = await batchers[served.name].submit(rows, k)
        return records[0] if body.seq is not None else {"results": records}

    return app


def serve(
    ckpt: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 64,
    max_wait_ms: float = 5.0,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> None:
    """Load ``ckpt`` and answer on ``host:port`` until interrupted."""
    import uvicorn

    app = build_app(ckpt, max_batch=max_batch, max_wait_ms=max_wait_ms, max_body_bytes=max_body_bytes)
    uvicorn.run(app, host=host, port=port)
