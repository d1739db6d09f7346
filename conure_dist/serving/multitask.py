"""Every finished task's scores for a batch of histories in one call, equal to one call per task.

``score_histories(task_view(run, task), task, rows)`` answers one task: it masks the task's
kernels (``where(owner in 1..t, W, 0)`` per conv) and runs the backbone with a fresh tensor for
every intermediate. ``MultiTaskScorer`` answers every task at once, bit-identical
(``torch.equal``) to that path:

* every view's masked kernels are built once, with the scorer;
* all tasks read the same rows (the sequence task's placeholder column is dropped again by the
  model), and every view has the same layer-1 input (the embedding is not partitioned), so the
  embedding lookup and block 0's layer norm, ReLU and shifted input are computed once for all
  (with ``model.prune_embedding`` each task looks up its own view of the table);
* each conv still runs one GEMM per task (``[rows, K*C] @ [K*C, C]``, then ``+ bias``, as in
  ``CausalConv1d``): from the first conv on the tasks' inputs differ, so a batched GEMM would do
  the same work, and on a GPU it may pick another kernel, i.e. another rounding;
* intermediates live in buffers reused by every layer and task.

Two ways to lay out the GEMMs (``per_task_shapes``):

* ``True`` (default on CUDA): every GEMM has the per-task path's shape (the model's own windows,
  the whole batch), so equality does not depend on how a BLAS splits its work.
* ``False`` (default on the CPU): fewer GEMM rows. The rows go ``chunk_rows`` at a time (a
  layer's activations stay in cache); a layer computes only the positions the last state reads,
  which the dilations space apart (``last_position_spans``; the fast path computes whole
  windows); and a chunk starts at its first item: before it every history holds the values of
  an all-padding one (causal convs read no later position), computed once per length. This
  relies on what ``SCORE_ROW_MULTIPLE`` relies on: a CPU GEMM computes each row the same whatever
  other rows share the call, from 16 rows on; the tests hold it to the per-task path.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from conure_dist.continual.ownership import TaskOwnership
from conure_dist.methods.patches import patched_tasks
from conure_dist.model.conure_model import ConureModel
from conure_dist.serving.inference import SCORE_ROW_MULTIPLE, TrainedRun
from conure_dist.serving.multitask_spans import (  # noqa: F401 - conv_input_span is public here too
    Span,
    conv_input_span,
    held_positions,
    last_position_spans,
    model_spans,
    shifted_input,
    trim_span,
)

EMBEDDING = "backbone.embedding.weight"

DEFAULT_CPU_CHUNK = 64
"""Rows per backbone pass on the CPU: a pass's per-task GEMM operands stay in cache, with ops
large enough that on shared cores a thread-pool barrier per op costs little."""


def view_kernel(weight: torch.Tensor, ownership: TaskOwnership, name: str, task_id: int) -> torch.Tensor:
    """``weight`` as task ``task_id``'s inference view reads it: exactly ``MaskedModel``'s
    ``where(frozen, W, 0)`` with the ``infer`` masks (owner in 1..task_id)."""
    _, frozen = ownership.masks(name, "infer", task_id)
    return torch.where(frozen.to(weight.device), weight.detach(), 0.0)


@dataclass(frozen=True)
class _Conv:
    """One causal conv as every task sees it: per task its view's kernel ``[K*C_in, C_out]``
    (contiguous, as the per-task path's masked kernel reshaped), and the shared bias."""

    kernels: tuple[torch.Tensor, ...]
    bias: torch.Tensor
    kernel_size: int
    dilation: int


@dataclass(frozen=True)
class _Block:
    norm1: nn.LayerNorm
    conv1: _Conv
    norm2: nn.LayerNorm
    conv2: _Conv


class _Workspace:
    """Flat buffers reused by every layer of a pass; views start at offset 0, and a task's slab
    at a multiple of ``rows * C`` floats (rows a multiple of 16), so that GEMM operands are at
    least 64-byte aligned, as fresh tensors are."""

    def __init__(self, key: tuple, tasks: int, plane: int, kernel_size: int, device: torch.device) -> None:
        self.key = key
        self.state = [torch.empty(tasks * plane, device=device) for _ in range(2)]
        self.mid = torch.empty(tasks * plane, device=device)
        self.shift = torch.empty(tasks * plane * kernel_size, device=device)
        self.shared_shift = torch.empty(plane * kernel_size, device=device)


def _take(buffer: torch.Tensor, *shape: int) -> torch.Tensor:
    """The first ``prod(shape)`` entries of a flat buffer, viewed as ``shape``."""
    return buffer[: math.prod(shape)].view(shape)


class MultiTaskScorer:
    """Scores of several finished tasks for the same histories, built once per checkpoint.

    ``score(rows)`` equals ``{t: score_histories(task_view(run, t), t, rows)}`` bit for bit (see
    the module docstring). The scorer holds one masked copy of the conv kernels per task and a
    workspace of ``(3 + K) * T + K`` float tensors ``[rows of a pass, seq_len, C]``. It reads the
    model's parameters and ownership when built: a later change to either (training, pruning,
    loading) makes ``score`` refuse rather than answer from stale kernels; build it after moving
    the model to its device. One call at a time (a lock guards the workspace).
    """

    def __init__(
        self,
        model: ConureModel,
        ownership: TaskOwnership,
        tasks: Sequence[str] | None = None,
        task_ids: dict[str, int] | None = None,
        per_task_shapes: bool | None = None,
        chunk_rows: int = DEFAULT_CPU_CHUNK,
    ) -> None:
        """``tasks``: the tasks to answer (default: those whose view id is at most the last task
        owning weights); ``task_ids``: their 1-based view ids (default: the order of the model's
        heads, the checkpoint's task order). ``per_task_shapes`` (default: on CUDA) and
        ``chunk_rows`` (a multiple of ``SCORE_ROW_MULTIPLE``): see the module docstring."""
        if chunk_rows < 1 or chunk_rows % SCORE_ROW_MULTIPLE:
            raise ValueError(f"chunk_rows must be a positive multiple of {SCORE_ROW_MULTIPLE}, got {chunk_rows}")
        ids = task_ids or {name: i + 1 for i, name in enumerate(model.kinds)}
        self.tasks = list(tasks) if tasks is not None else finished_tasks(model, ownership, ids)
        _check_tasks(model, ownership, self.tasks, ids)
        self.model, self.chunk_rows = model, chunk_rows
        self.depth = model.depth(self.tasks[0])
        self.per_task_shapes = (
            model.backbone.embedding.weight.device.type == "cuda" if per_task_shapes is None else per_task_shapes
        )
        self.ids = [ids[t] for t in self.tasks]
        if EMBEDDING in ownership.owners:
            self.embeddings = [view_kernel(model.backbone.embedding.weight, ownership, EMBEDDING, t) for t in self.ids]
        else:
            self.embeddings = [model.backbone.embedding.weight.detach()]
        self.blocks = [
            _Block(
                block.norm1,
                self._conv(block.conv1, f"backbone.blocks.{i}.conv1.weight", ownership),
                block.norm2,
                self._conv(block.conv2, f"backbone.blocks.{i}.conv2.weight", ownership),
            )
            for i, block in enumerate(model.backbone.blocks[: self.depth])
        ]
        self._watched = [*model.parameters(), *ownership.owners.values()]
        self._versions = self._current_versions()
        self._workspace: _Workspace | None = None
        self._padding: tuple | None = None
        self._length = 0
        self._lock = threading.Lock()

    @classmethod
    def from_run(cls, run: TrainedRun, tasks: Sequence[str] | None = None, **options) -> MultiTaskScorer:
        """A scorer for a loaded checkpoint: its finished tasks, or ``tasks`` (each finished)."""
        for task in tasks or ():
            run.check_finished(task, flag="tasks")
        ids = {name: i + 1 for i, name in enumerate(run.task_names)}
        return cls(run.model, run.ownership, run.finished if tasks is None else list(tasks), ids, **options)

    def _conv(self, conv: nn.Module, name: str, ownership: TaskOwnership) -> _Conv:
        width = conv.weight.shape[-1]
        kernels = tuple(view_kernel(conv.weight, ownership, name, t).reshape(-1, width).contiguous() for t in self.ids)
        return _Conv(kernels, conv.bias.detach(), conv.kernel_size, conv.dilation)

    def _current_versions(self) -> list[int]:
        return [t._version for t in self._watched]

    def _workspace_for(self, rows: int, length: int, device: torch.device) -> _Workspace:
        if self._workspace is None or self._workspace.key != (rows, length, device):
            self._workspace = None  # free the old buffers before allocating the new ones
            plane = rows * length * self.model.backbone.embedding.embedding_dim
            kernel = max((b.conv1.kernel_size for b in self.blocks), default=1)
            self._workspace = _Workspace((rows, length, device), len(self.tasks), plane, kernel, device)
        return self._workspace

    def _norm_shift(
        self,
        norm: nn.LayerNorm,
        src: torch.Tensor,
        src_span: Span,
        conv: _Conv,
        span: Span,
        buffer: torch.Tensor,
        left: torch.Tensor | None,
        record: list | None,
    ) -> torch.Tensor:
        """``relu(norm(src))`` as ``conv``'s GEMM input for the positions ``span``: ``[G, B, n, C]``
        -> ``[G, B, count, K*C]`` (layer norm reads each row alone, so stacking changes nothing);
        ``record`` gets its first row."""
        g, rows, _, channels = src.shape
        normed = F.relu_(norm(src))
        if record is not None:
            record.append(normed[:, 0].clone())
        out = _take(buffer, g, rows, span[0], conv.kernel_size * channels)
        return shifted_input(normed, src_span, span, conv.kernel_size, conv.dilation, out, self._length, left)

    def _block_forward(
        self,
        block: _Block,
        x: torch.Tensor,
        spans: tuple[Span, Span, Span],
        shared: torch.Tensor | None,
        out_buffer: torch.Tensor,
        ws: _Workspace,
        lefts: tuple | None,
        record: list | None,
    ) -> torch.Tensor:
        """One residual block for every task: ``x`` ``[T or 1, B, n, C]`` (1: the same input for
        all) -> ``[T, B, count, C]`` in ``out_buffer``. ``shared``: conv1's GEMM input when it is
        the same for every task (block 0 with an unpartitioned embedding); ``lefts``: the two
        convs' inputs at the positions before the ones computed."""
        (x_span, mid, out), (left1, left2) = spans, lefts or (None, None)
        tasks, rows, channels = len(self.tasks), x.shape[1], x.shape[3]
        first = (
            shared
            if shared is not None
            else self._norm_shift(block.norm1, x, x_span, block.conv1, mid, ws.shift, left1, record)
        )
        h = _take(ws.mid, tasks, rows, mid[0], channels)
        for t in range(tasks):
            _gemm(first[t if first.shape[0] > 1 else 0], block.conv1.kernels[t], h[t])
        second = self._norm_shift(block.norm2, h.add_(block.conv1.bias), mid, block.conv2, out, ws.shift, left2, record)
        result = _take(out_buffer, tasks, rows, out[0], channels)
        for t in range(tasks):
            _gemm(second[t], block.conv2.kernels[t], result[t])
        # Bias, then the residual (IEEE addition commutes exactly: h + x == x + h).
        return result.add_(block.conv2.bias).add_(held_positions(x, x_span, out))

    def _pass(
        self,
        seqs: torch.Tensor,
        plan: list[tuple[Span, Span, Span]],
        lefts: list | None = None,
        record: list | None = None,
    ) -> torch.Tensor:
        """Every task's last-position state ``[T, rows, C]`` for one pass of rows through the
        positions ``plan``: a view into the workspace, valid until the next pass. ``lefts``: per
        block, the convs' inputs before the positions of the plan (see ``_padding_inputs``);
        ``record`` gets every conv's input of the first row."""
        rows, length = seqs.shape
        self._length = length  # for _norm_shift
        ws = self._workspace_for(rows, length, seqs.device)
        count, step = plan[0][0] if plan else (1, 1)
        x = torch.stack(
            [F.embedding(seqs[:, length - 1 - step * (count - 1) :: step], table) for table in self.embeddings]
        )
        lefts = lefts or [None] * len(plan)
        shared = None
        if x.shape[0] == 1 and plan:
            shared = self._norm_shift(
                self.blocks[0].norm1,
                x,
                plan[0][0],
                self.blocks[0].conv1,
                plan[0][1],
                ws.shared_shift,
                lefts[0] and lefts[0][0],
                record,
            )
        for b, (block, spans) in enumerate(zip(self.blocks, plan, strict=True)):
            x = self._block_forward(block, x, spans, shared if b == 0 else None, ws.state[b % 2], ws, lefts[b], record)
        return x[:, :, -1]

    def _padding_inputs(self, length: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per block, both convs' inputs (after norm and ReLU) at every position of an all-padding
        history, ``[T or 1, length, C]``: what any history holds before its first item, since a
        causal state reads no later position. Computed once per length."""
        if self._padding is None or self._padding[0] != (length, device):
            record: list[torch.Tensor] = []
            self._pass(
                torch.zeros(SCORE_ROW_MULTIPLE, length, dtype=torch.long, device=device),
                [((length, 1),) * 3] * len(self.blocks),
                record=record,
            )
            self._padding = (length, device), list(zip(record[::2], record[1::2], strict=True))
        return self._padding[1]

    def _hidden(self, seqs: torch.Tensor) -> torch.Tensor:
        """Every task's last-position state ``[T, B, C]``. With ``per_task_shapes``, one pass with
        the model's windows. Otherwise the rows, sorted by how much left padding they have, go
        ``chunk_rows`` at a time through the last position's spans, each chunk from its first
        non-padding position on: before it, every row holds the all-padding history's values."""
        if self._current_versions() != self._versions:
            raise RuntimeError(
                "the model's parameters or ownership changed since this MultiTaskScorer was built; build a new one"
            )
        rows, length = seqs.shape
        if self.per_task_shapes:
            return self._pass(seqs, model_spans(self.model, length, self.depth))
        plan = last_position_spans(self.model.backbone, length, self.depth)
        real = seqs != 0
        starts = torch.where(real.any(1), real.int().argmax(1), length - 1)
        order = torch.argsort(starts, descending=True, stable=True)
        hidden = torch.empty(len(self.tasks), rows, self.model.backbone.embedding.embedding_dim, device=seqs.device)
        for chunk in order.split(self.chunk_rows):  # rows and chunks: multiples of SCORE_ROW_MULTIPLE
            start = int(starts[chunk].min())
            trimmed = [tuple(trim_span(s, start, length) for s in spans) for spans in plan]
            lefts = self._padding_inputs(length, seqs.device) if start else None
            hidden[:, chunk] = self._pass(seqs[chunk], trimmed, lefts)
        return hidden

    def _padded(self, seqs: torch.Tensor | Sequence[Sequence[int]]) -> tuple[torch.Tensor, int]:
        """The history rows on the model's device, padded as ``score_histories`` pads them (to a
        multiple of ``SCORE_ROW_MULTIPLE`` rows, with copies of the first), and their count."""
        seqs = torch.as_tensor(seqs, dtype=torch.long, device=self.model.backbone.embedding.weight.device)
        if seqs.dim() != 2 or seqs.shape[0] == 0 or seqs.shape[1] == 0:
            raise ValueError(f"expected history rows [batch >= 1, seq_len >= 1], got shape {tuple(seqs.shape)}")
        rows = seqs.shape[0]
        filler = -rows % SCORE_ROW_MULTIPLE
        if filler:
            seqs = torch.cat([seqs, seqs[:1].expand(filler, -1)])
        return seqs, rows

    def score(self, seqs: torch.Tensor | Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """float scores ``[B, outputs]`` per task for history rows ``[B, seq_len]`` (T1 ids,
        left-padded with 0, as ``pad_history`` makes them); the sequence task scores the item
        after each whole history, as ``score_histories`` does."""
        padded, rows = self._padded(seqs)
        with self._lock, torch.no_grad():
            hidden = self._hidden(padded)
            return {task: self.model.heads[task].scores(hidden[i]).float()[:rows] for i, task in enumerate(self.tasks)}

    __call__ = score

    def represent(self, seqs: torch.Tensor | Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Per task the hidden vectors ``[B, C]`` its head scores (``ConureModel.represent`` under
        the task's view, for the rows ``score`` reads)."""
        padded, rows = self._padded(seqs)
        with self._lock, torch.no_grad():
            hidden = self._hidden(padded)
            return {task: hidden[i, :rows].clone() for i, task in enumerate(self.tasks)}


def _gemm(shifted: torch.Tensor, kernel: torch.Tensor, out: torch.Tensor) -> None:
    """``out = shifted @ kernel`` for ``shifted`` ``[B, n, K*C]``: the per-task path's GEMM, its
    3-D input folded to ``[B*n, K*C]`` as ``torch.matmul`` folds it (the bias is added apart, as
    there)."""
    rows, length, width = shifted.shape
    torch.mm(shifted.view(rows * length, width), kernel, out=out.view(rows * length, -1))


def _check_tasks(model: ConureModel, ownership: TaskOwnership, tasks: list[str], ids: dict[str, int]) -> None:
    """Refuse what the scorer cannot answer exactly: unknown tasks, views with no owned weight,
    PeterRec's patches, and ownership of anything but the convs and the embedding."""
    if not tasks:
        raise ValueError("no task to score: the model has no finished task")
    unknown = [t for t in tasks if t not in model.kinds or t not in ids]
    if unknown:
        raise ValueError(f"tasks {unknown} are not tasks of this model (its tasks: {', '.join(model.kinds)})")
    unowned = [t for t in tasks if ids[t] > ownership.last_task()]
    if unowned:
        raise ValueError(f"tasks {unowned} own no weights yet: they are not finished")
    patched = [t for t in tasks if t in patched_tasks(model)]
    if patched:
        raise ValueError(f"tasks {patched} carry PeterRec patches, which MultiTaskScorer does not apply")
    other = sorted(set(ownership.names) - set(model.prunable_names()))
    if other:
        raise ValueError(f"ownership of {other}: MultiTaskScorer views only the convs and the embedding")
    depths = {t: model.depth(t) for t in tasks}
    if len(set(depths.values())) > 1:
        raise ValueError(
            f"tasks run different numbers of blocks of the grown backbone ({depths}): one scorer "
            "per depth (see depth_groups; score_all_tasks groups them)"
        )


def finished_tasks(model: ConureModel, ownership: TaskOwnership, ids: dict[str, int] | None = None) -> list[str]:
    """The model's tasks (view ids ``ids``, default: the heads' order) that own weights."""
    ids = ids or {name: i + 1 for i, name in enumerate(model.kinds)}
    return [t for t in model.kinds if ids[t] <= ownership.last_task()]


def depth_groups(model: ConureModel, tasks: Sequence[str]) -> list[list[str]]:
    """``tasks`` grouped by how many blocks they run (one group unless the backbone grew): what
    one ``MultiTaskScorer`` can answer together."""
    groups: dict[int, list[str]] = {}
    for task in tasks:  # a task the model lacks is left to the scorer, which refuses it by name
        groups.setdefault(model.depth(task) if task in model.kinds else -1, []).append(task)
    return list(groups.values())


def score_all_tasks(
    source: TrainedRun | tuple[ConureModel, TaskOwnership],
    tasks: Sequence[str] | None,
    seqs: torch.Tensor | Sequence[Sequence[int]],
) -> dict[str, torch.Tensor]:
    """``{task: scores}`` for ``tasks`` (None: every finished task) in one call; equal to
    ``score_histories(task_view(run, task), task, seqs)`` per task. Builds a scorer each call:
    keep a ``MultiTaskScorer`` for repeated calls on one checkpoint."""
    if isinstance(source, TrainedRun):
        model, chosen = source.model, source.finished if tasks is None else list(tasks)
        scorer = partial(MultiTaskScorer.from_run, source)
    else:
        model, ownership = source
        chosen = finished_tasks(model, ownership) if tasks is None else list(tasks)
        scorer = partial(MultiTaskScorer, model, ownership)
    scores: dict[str, torch.Tensor] = {}
    for group in depth_groups(model, chosen):  # one group unless the backbone grew
        scores.update(scorer(group).score(seqs))
    return {task: scores[task] for task in chosen}
