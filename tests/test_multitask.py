"""MultiTaskScorer: every finished task in one call, bit-identical (torch.equal) to one
``score_histories(task_view(run, task), task, rows)`` call per task."""

from __future__ import annotations

import copy

import pytest
import torch

from conure_dist.continual.ownership import TaskOwnership
from conure_dist.continual.views import MaskedModel
from conure_dist.methods.patches import add_patches
from conure_dist.model import ConureModel, TaskSpec
from conure_dist.serving.inference import TrainedRun, load_trained, score_histories, task_view
from conure_dist.serving.multitask import (
    MultiTaskScorer,
    conv_input_span,
    last_position_spans,
    score_all_tasks,
    trim_span,
)

BATCHES = [1, 5, 16, 37]


def histories(batch: int, seq_len: int, num_items: int, seed: int) -> torch.Tensor:
    """Random histories of 1..seq_len items, left-padded with 0."""
    gen = torch.Generator().manual_seed(seed)
    seqs = torch.randint(1, num_items, (batch, seq_len), generator=gen)
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=gen)
    return seqs.masked_fill(torch.arange(seq_len)[None, :] < (seq_len - lengths)[:, None], 0)


def run_histories(run: TrainedRun, batch: int, seed: int = 0) -> torch.Tensor:
    return histories(batch, int(run.ckpt.meta["seq_len"]), int(run.ckpt.meta["num_seq_items"]), seed)


def per_task(run: TrainedRun, tasks: list[str], seqs: torch.Tensor) -> dict[str, torch.Tensor]:
    return {task: score_histories(task_view(run, task), task, seqs) for task in tasks}


def assert_equal_scores(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for task, scores in want.items():
        assert got[task].shape == scores.shape and got[task].dtype == scores.dtype
        assert torch.equal(got[task], scores), (task, (got[task] - scores).abs().nan_to_num().max())


@pytest.fixture(scope="module")
def run(tiny_trained_run) -> TrainedRun:
    return load_trained(str(tiny_trained_run))


@pytest.fixture(scope="module")
def scorer(run: TrainedRun) -> MultiTaskScorer:
    return MultiTaskScorer.from_run(run)


@pytest.fixture(scope="module")
def same_shapes_scorer(run: TrainedRun) -> MultiTaskScorer:
    return MultiTaskScorer.from_run(run, per_task_shapes=True)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("layout", ["chunks_and_spans", "per_task_shapes"])
def test_trained_run_scores_equal_the_per_task_path(run, scorer, same_shapes_scorer, batch, layout):
    scorer = scorer if layout == "chunks_and_spans" else same_shapes_scorer
    assert scorer.tasks == run.finished == ["t1", "click", "gender"]
    assert scorer.per_task_shapes == (layout == "per_task_shapes")
    seqs = run_histories(run, batch, seed=batch)
    got = scorer.score(seqs)
    assert_equal_scores(got, per_task(run, run.finished, seqs))
    # T1 never proposes its padding item; every answer has one row per history.
    assert torch.isneginf(got["t1"][:, 0]).all() and all(s.shape[0] == batch for s in got.values())


def test_one_call_function_and_list_input_answer_the_same(run, scorer):
    seqs = run_histories(run, 7, seed=1)
    want = per_task(run, run.finished, seqs)
    assert_equal_scores(score_all_tasks(run, None, seqs), want)
    assert_equal_scores(score_all_tasks(run, ["gender", "t1"], seqs.tolist()), {t: want[t] for t in ["gender", "t1"]})


def test_representations_are_the_views_hidden_states(run, scorer):
    """``represent`` equals the last-position state of a copy of the backbone holding the task's
    view (every task reads the history itself: T1's placeholder column is dropped again), and
    the heads score it into ``score``'s answers."""
    seqs = run_histories(run, 16, seed=2)
    reps, scores = scorer.represent(seqs), scorer.score(seqs)
    for task in run.finished:
        view = task_view(run, task)
        model = copy.deepcopy(run.model)
        with torch.no_grad():
            for name, weight in view.effective_weights().items():
                model.get_parameter(name).copy_(weight)
            assert torch.equal(reps[task], model.backbone(seqs, last_only=True)), task
            assert torch.equal(run.model.heads[task].scores(reps[task]).float(), scores[task]), task


def test_checkpoint_with_an_unfinished_task_answers_the_finished_ones(tiny_trained_run):
    folder = next((tiny_trained_run / "checkpoints").glob("*-click-done"))
    run = load_trained(str(folder))
    scorer = MultiTaskScorer.from_run(run)
    assert scorer.tasks == run.finished == ["t1", "click"]
    seqs = run_histories(run, 5, seed=3)
    assert_equal_scores(scorer.score(seqs), per_task(run, ["t1", "click"], seqs))
    with pytest.raises(ValueError, match="'gender' is not finished"):
        MultiTaskScorer.from_run(run, ["gender"])
    with pytest.raises(ValueError, match="no task 'age'"):
        score_all_tasks(run, ["age"], seqs)


SPECS = [
    TaskSpec("t1", "sequence", 90),
    TaskSpec("a", "item", 30),
    TaskSpec("b", "item", 41),
    TaskSpec("c", "class", 2),
    TaskSpec("d", "class", 5),
]


SEQ_LEN = 40


def synthetic(
    fast: bool = True, prune_embedding: bool = False, finished: int = 5, seed: int = 0
) -> tuple[ConureModel, TaskOwnership]:
    """A random 5-task model: after each of the first ``finished`` tasks, prune (ratio 0.6) and
    redraw the weights still free, as the next task's training would move them. Layer norms and
    conv biases are moved off their start too (T1 trains them), so that each takes part."""
    torch.manual_seed(seed)
    model = ConureModel(90, SPECS, 16, 3, [1, 2, 4, 8], fast=fast, prune_embedding=prune_embedding).eval()
    params = dict(model.named_parameters())
    ownership = TaskOwnership.empty({n: params[n].shape for n in model.prunable_names()})
    with torch.no_grad():
        for name in model.shared_names():
            params[name].add_(torch.randn_like(params[name]) * 0.1)
        for task_id in range(1, finished + 1):
            ownership.prune(task_id, params, 0.6)
            for name, owner in ownership.owners.items():
                params[name].copy_(torch.where(owner == 0, torch.randn_like(params[name]) * 0.2, params[name]))
        for spec in SPECS[1:]:
            for p in model.heads[spec.name].parameters():
                p.normal_(std=0.3)
    return model, ownership


def views_scores(
    model: ConureModel, ownership: TaskOwnership, seqs: torch.Tensor, count: int = len(SPECS)
) -> dict[str, torch.Tensor]:
    out = {}
    for task_id, spec in enumerate(SPECS[:count], start=1):
        masked = MaskedModel(model, ownership)
        masked.set_view("infer", task_id)
        out[spec.name] = score_histories(masked.eval(), spec.name, seqs)
    return out


@pytest.mark.parametrize(
    "fast, prune_embedding, per_task_shapes, chunk_rows",
    [
        (True, False, False, 16),
        (True, False, True, 16),
        (True, True, False, 32),
        (False, False, False, 16),
        (False, True, True, 16),
    ],
)
def test_five_task_model_scores_equal_every_view(fast, prune_embedding, per_task_shapes, chunk_rows):
    model, ownership = synthetic(fast, prune_embedding)
    scorer = MultiTaskScorer(model, ownership, per_task_shapes=per_task_shapes, chunk_rows=chunk_rows)
    assert scorer.tasks == [s.name for s in SPECS]
    for batch in [*BATCHES, 70]:
        seqs = histories(batch, SEQ_LEN, 90, seed=batch)
        if batch > 16:  # a full history and an all-padding row: chunks from position 0, and the last
            seqs[1] = torch.arange(1, SEQ_LEN + 1)
            seqs[-1] = 0
        assert_equal_scores(scorer.score(seqs), views_scores(model, ownership, seqs))


def test_spans_skip_the_positions_the_dilations_skip():
    """The last state's receptive positions lie inside the model's windows, and the dilated
    stack leaves gaps there: fewer GEMM rows than the fast path's windows."""
    model, _ = synthetic()
    spans = last_position_spans(model.backbone, SEQ_LEN)
    windows = model.backbone.last_position_windows(SEQ_LEN)
    assert spans[-1][2] == (1, 1) and any(step > 1 for block in spans for _, step in block)
    for block_spans, block_windows in zip(spans, windows, strict=True):
        for (count, step), window in zip(block_spans, block_windows, strict=True):
            assert step * (count - 1) < window and count <= window
    assert sum(m[0] + o[0] for _, m, o in spans) < sum(m + o for _, m, o in windows)
    assert conv_input_span((1, 1), 3, 8, SEQ_LEN) == (3, 8)  # one output reads 3 taps 8 apart
    assert conv_input_span((3, 8), 3, 4, SEQ_LEN) == (7, 4)
    assert conv_input_span((30, 1), 3, 8, SEQ_LEN) == (SEQ_LEN, 1)  # clipped at position 0
    assert trim_span((7, 4), 20, SEQ_LEN) == (5, 4)  # positions 39, 35, .., 23: those from 20 on
    assert trim_span((7, 4), 39, SEQ_LEN) == (1, 4) and trim_span((1, 1), 39, SEQ_LEN) == (1, 1)


def test_every_view_answers_differently():
    """The equality above could not hold by accident: each task's view changes its scores."""
    model, ownership = synthetic()
    seqs = histories(16, SEQ_LEN, 90, seed=4)
    mine = views_scores(model, ownership, seqs)
    masked = MaskedModel(model, ownership)
    masked.set_view("infer", len(SPECS))
    for spec in SPECS[:-1]:
        assert not torch.equal(mine[spec.name], score_histories(masked.eval(), spec.name, seqs)), spec.name


def test_default_tasks_are_the_ones_owning_weights():
    model, ownership = synthetic(finished=3)
    seqs = histories(9, SEQ_LEN, 90, seed=5)
    got = score_all_tasks((model, ownership), None, seqs)
    assert list(got) == ["t1", "a", "b"]
    assert_equal_scores(got, views_scores(model, ownership, seqs, count=3))
    with pytest.raises(ValueError, match=r"\['c'\] own no weights"):
        MultiTaskScorer(model, ownership, ["t1", "c"])
    with pytest.raises(ValueError, match="not tasks of this model"):
        MultiTaskScorer(model, ownership, ["zzz"])


def test_a_changed_model_or_ownership_is_refused():
    model, ownership = synthetic(finished=4)
    seqs = histories(3, SEQ_LEN, 90, seed=6)
    scorer = MultiTaskScorer(model, ownership)
    scorer.score(seqs)
    with torch.no_grad():
        model.backbone.blocks[0].conv1.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="changed since this MultiTaskScorer was built"):
        scorer.score(seqs)
    scorer = MultiTaskScorer(model, ownership)
    ownership.prune(5, dict(model.named_parameters()), 0.6)
    with pytest.raises(RuntimeError, match="changed since"):
        scorer.score(seqs)


def test_what_it_cannot_answer_exactly_is_refused():
    torch.manual_seed(0)
    model = ConureModel(90, SPECS[:2], 16, 3, [1, 2])
    add_patches(model, ["a"], 16)
    ownership = TaskOwnership.empty({n: p.shape for n, p in model.named_parameters() if n in model.prunable_names()})
    ownership.prune(1, dict(model.named_parameters()), 0.5)
    ownership.prune(2, dict(model.named_parameters()), 0.5)
    with pytest.raises(ValueError, match="PeterRec patches"):
        MultiTaskScorer(model, ownership)
    scorer = MultiTaskScorer(model, ownership, ["t1"])
    with pytest.raises(ValueError, match="history rows"):
        scorer.score(torch.zeros(0, 14, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_rows must be a positive multiple of 16"):
        MultiTaskScorer(model, ownership, ["t1"], chunk_rows=24)
