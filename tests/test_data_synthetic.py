"""The synthetic generator: determinism, sizes, and signal beyond the trivial references."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from helpers import shards_digest

from conure_dist.data.manifest import Manifest
from conure_dist.data.stream import iter_batches
from data_tools.shards import TaskData
from data_tools.split import split_indices, split_sizes
from data_tools.synthetic import SyntheticSpec, generate, write_synthetic

TOP_K = 10


@pytest.fixture(scope="module")
def default_data() -> tuple[np.ndarray, list[TaskData]]:
    t1, tasks, _ = generate(SyntheticSpec())
    return t1, tasks


def test_generation_is_deterministic() -> None:
    t1, tasks, source = generate(SyntheticSpec())
    t1_again, tasks_again, source_again = generate(SyntheticSpec())
    np.testing.assert_array_equal(t1, t1_again)
    for a, b in zip(tasks, tasks_again, strict=True):
        np.testing.assert_array_equal(a.users, b.users)
        if a.targets is not None:
            np.testing.assert_array_equal(a.targets, b.targets)
    assert source == source_again and source["spec"]["seed"] == 0
    other, _, _ = generate(SyntheticSpec(seed=1))
    assert (other != t1).mean() > 0.5


def test_shapes_and_ranges(default_data: tuple[np.ndarray, list[TaskData]]) -> None:
    t1, tasks = default_data
    assert t1.shape == (3000, 20) and t1.dtype == np.int32
    assert t1.min() == 0 and t1.max() == 500 and len(np.unique(t1)) > 400
    lengths = (t1 > 0).sum(axis=1)
    assert lengths.min() == 10 and lengths.max() == 20
    assert ((t1 > 0) == (np.arange(20)[None, :] >= 20 - lengths[:, None])).all(), "left padding"
    assert [(t.name, t.kind) for t in tasks] == [
        ("t1", "sequence"),
        ("click", "item"),
        ("like", "item"),
        ("gender", "class"),
        ("age", "class"),
    ]
    click, like, gender, age = tasks[1:]
    per_user_click = np.bincount(click.users, minlength=3000)
    per_user_like = np.bincount(like.users, minlength=3000)
    assert per_user_click.min() == 1 and per_user_click.max() == 4
    assert per_user_like.min() == 0 and per_user_like.max() == 2
    assert 7000 < click.num_instances < 8000 and 2700 < like.num_instances < 3300
    assert click.targets.max() < 300 and like.targets.max() < 200
    assert len(np.unique(click.targets)) > 250 and len(np.unique(like.targets)) > 150
    assert gender.class_names == ["F", "M"] and len(age.class_names) == 5
    for task in (gender, age):
        shares = np.bincount(task.targets) / task.num_instances
        assert shares.max() <= 0.6, f"{task.name}: majority share {shares.max():.3f}"
        assert shares.min() >= 0.1, f"{task.name}: a nearly empty class"


def _hit_rate(scores: np.ndarray, targets: np.ndarray) -> float:
    top = np.argsort(-scores, axis=1, kind="stable")[:, :TOP_K]
    return float((top == targets[:, None]).any(axis=1).mean())


def test_next_item_beats_popularity(default_data: tuple[np.ndarray, list[TaskData]]) -> None:
    """A bigram model on the train sequences clearly beats most-popular on the last test item."""
    t1, _ = default_data
    split = split_indices(3000, seed=0, task_index=0)
    train, test = t1[split["train"]], t1[split["test"]]
    bigram = np.zeros((501, 501))
    prev, nxt = train[:, :-1].ravel(), train[:, 1:].ravel()
    np.add.at(bigram, (prev[prev > 0], nxt[prev > 0]), 1)
    popularity = np.bincount(train[:, 1:].ravel(), minlength=501).astype(float)
    popularity[0] = -1
    scores = bigram[test[:, -2]] + 1e-6 * popularity  # popularity breaks ties
    scores[:, 0] = -1
    hr_bigram = _hit_rate(scores, test[:, -1])
    hr_pop = _hit_rate(np.tile(popularity, (len(test), 1)), test[:, -1])
    assert hr_pop < 0.2 and hr_bigram > 2.5 * hr_pop, (hr_bigram, hr_pop)


def _naive_bayes_scores(t1: np.ndarray, task: TaskData, task_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multinomial naive Bayes on the bag of T1 items: (test scores, test targets, train counts)."""
    split = split_indices(task.num_instances, seed=0, task_index=task_index)
    num_outputs = task.num_classes or task.num_items
    vocab = t1.max() + 1

    def bag(users: np.ndarray) -> np.ndarray:
        out = np.zeros((len(users), vocab))
        np.add.at(out, (np.repeat(np.arange(len(users)), t1.shape[1]), t1[users].ravel()), 1)
        out[:, 0] = 0
        return out

    train_y = task.targets[split["train"]]
    joint = np.zeros((num_outputs, vocab))
    np.add.at(joint, train_y, bag(task.users[split["train"]]))
    log_p = np.log((joint + 1) / (joint + 1).sum(axis=1, keepdims=True))
    counts = np.bincount(train_y, minlength=num_outputs)
    scores = bag(task.users[split["test"]]) @ log_p.T + np.log(counts + 1)
    return scores, task.targets[split["test"]], counts


@pytest.mark.parametrize(("index", "margin"), [(1, 1.4), (2, 1.4)])
def test_item_tasks_beat_popularity(default_data: tuple[np.ndarray, list[TaskData]], index: int, margin: float) -> None:
    t1, tasks = default_data
    scores, targets, counts = _naive_bayes_scores(t1, tasks[index], index)
    hr_model = _hit_rate(scores, targets)
    hr_pop = _hit_rate(np.tile(counts.astype(float), (len(targets), 1)), targets)
    assert hr_model > margin * hr_pop, (tasks[index].name, hr_model, hr_pop)


def test_click_follows_the_last_t1_item(default_data: tuple[np.ndarray, list[TaskData]]) -> None:
    """Counting (last T1 item -> click) pairs on train beats click popularity by far on test."""
    t1, tasks = default_data
    click = tasks[1]
    split = split_indices(click.num_instances, seed=0, task_index=1)
    last = t1[click.users, -1]
    pair_counts = np.zeros((501, 300))
    np.add.at(pair_counts, (last[split["train"]], click.targets[split["train"]]), 1)
    popularity = np.bincount(click.targets[split["train"]], minlength=300).astype(float)
    test = split["test"]
    hr_pairs = _hit_rate(pair_counts[last[test]] + 1e-6 * popularity, click.targets[test])
    hr_pop = _hit_rate(np.tile(popularity, (len(test), 1)), click.targets[test])
    assert hr_pairs > 2.5 * hr_pop, (hr_pairs, hr_pop)


@pytest.mark.parametrize(("index", "gain"), [(3, 0.15), (4, 0.1)])
def test_class_tasks_beat_majority(default_data: tuple[np.ndarray, list[TaskData]], index: int, gain: float) -> None:
    t1, tasks = default_data
    scores, targets, counts = _naive_bayes_scores(t1, tasks[index], index)
    accuracy = float((scores.argmax(axis=1) == targets).mean())
    majority = float((targets == counts.argmax()).mean())
    assert majority < 0.6 and accuracy > majority + gain, (tasks[index].name, accuracy, majority)


def test_like_correlates_with_click(default_data: tuple[np.ndarray, list[TaskData]]) -> None:
    """Users with a like are more often in the genres they click: like shares click's signal."""
    _, tasks = default_data
    click, like = tasks[1], tasks[2]
    assert like.num_instances < 0.5 * click.num_instances
    # Users who click the same item are much more likely than chance to like the same item.
    first_click = np.full(3000, -1)
    first_click[click.users] = click.targets
    first_like = np.full(3000, -1)
    first_like[like.users] = like.targets
    has_both = np.flatnonzero((first_like >= 0) & (first_click >= 0))
    same_click = first_click[has_both][:, None] == first_click[has_both][None, :]
    same_like = first_like[has_both][:, None] == first_like[has_both][None, :]
    np.fill_diagonal(same_click, False)
    np.fill_diagonal(same_like, False)
    assert same_like[same_click].mean() > 2 * same_like.mean()


def test_write_synthetic(tmp_path: Path) -> None:
    spec = SyntheticSpec(num_users=500, num_items=100, seq_len=8, seed=4)
    manifest = write_synthetic(str(tmp_path / "a"), spec, split_seed=2, instances_per_shard=300, records_per_sample=64)
    assert manifest == Manifest.load(str(tmp_path / "a"))
    assert [t.name for t in manifest.tasks] == ["t1", "click", "like", "gender", "age"]
    assert manifest.dataset == "synthetic" and manifest.seq_len == 8 and manifest.num_seq_items == 101
    assert manifest.source["spec"]["num_users"] == 500 and manifest.split["seed"] == 2
    _, tasks, _ = generate(spec)
    for task, info in zip(tasks, manifest.tasks, strict=True):
        sizes = [info.splits[s].num_instances for s in ("train", "valid", "test")]
        assert sizes == split_sizes(task.num_instances)
        for split in info.splits.values():
            for shard in split.shards:
                data = (tmp_path / "a" / shard.url).read_bytes()
                assert hashlib.sha256(data).hexdigest() == shard.sha256 and len(data) == shard.num_bytes
    # train_counts agree with what the reader streams back.
    targets = np.concatenate(
        [b.target.numpy() for b in iter_batches(manifest, "click", "train", 128, shuffle=False, seed=0, epoch=0)]
    )
    np.testing.assert_array_equal(manifest.load_train_counts("click"), np.bincount(targets, minlength=300))
    seqs = np.concatenate(
        [b.seq.numpy() for b in iter_batches(manifest, "t1", "train", 128, shuffle=False, seed=0, epoch=0)]
    )
    expected = np.bincount(seqs[:, 1:].ravel(), minlength=101)
    expected[0] = 0
    np.testing.assert_array_equal(manifest.load_train_counts("t1"), expected)
    # Same spec and split seed: byte-identical shards.
    again = write_synthetic(str(tmp_path / "b"), spec, split_seed=2, instances_per_shard=300, records_per_sample=64)
    assert again.to_json() == manifest.to_json()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"num_items": 5}, r"num_items=5: must be >= 2 \* num_genres = 20"),
        ({"num_items": 15}, r"num_items=15: must be >= 2 \* num_genres = 20"),
        ({"num_users": 5}, r"num_users=5: must be >= 10"),
        ({"stay_prob": 1.5}, r"stay_prob=1\.5: must be in \[0, 1\]"),
        ({"click_items": 9}, r"click_items=9: must be >= num_genres = 10"),
        ({"seq_len": 5, "recent_window": 6}, r"recent_window=6: must be in \[1, seq_len = 5\]"),
        ({"taste_concentration": 0.0}, r"taste_concentration=0\.0: must be > 0"),
        ({"zipf_exponent": -1}, r"zipf_exponent=-1: must be >= 0"),
        ({"age_noise": -0.1}, r"age_noise=-0\.1: must be >= 0"),
        (
            {"num_genres": 1, "seq_len": 2},
            r"^invalid SyntheticSpec: num_genres=1: must be >= 2; seq_len=2: must be >= 3$",
        ),
    ],
)
def test_spec_validation_states_the_bound(values: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticSpec(**values)


def test_spec_bounds_are_what_the_generator_needs() -> None:
    """The smallest accepted spec generates; a genre of one T1 item would be its own successor."""
    t1, _, _ = generate(SyntheticSpec(num_users=10, num_items=20, seq_len=3, recent_window=3))
    assert t1.shape == (10, 3) and (t1[:, -1] > 0).all()


# sha256 over the shards' sha256s (manifest order) of the default spec written as the quick start
# writes it: the quick start's data, fixed. A change here changes every quick-start number.
DEFAULT_SHARDS_DIGEST = "4a36d35636161c7c571f6da69f7f4adf33dba538458c602ee3803796487937dc"


def test_default_relation_keeps_the_quick_start_data(tmp_path: Path) -> None:
    assert SyntheticSpec().relation == "shared_taste"
    manifest = write_synthetic(str(tmp_path / "qs"), SyntheticSpec(), instances_per_shard=2000)
    assert shards_digest(manifest) == DEFAULT_SHARDS_DIGEST
    assert manifest.source["spec"]["relation"] == "shared_taste"


def _click_sets(click: TaskData) -> dict[int, set[int]]:
    sets: dict[int, set[int]] = {}
    for user, item in zip(click.users.tolist(), click.targets.tolist(), strict=True):
        sets.setdefault(user, set()).add(item)
    return sets


def _share_in_clicks(tasks: list[TaskData]) -> float:
    """Share of like instances whose item is one of that user's click items."""
    clicks = _click_sets(tasks[1])
    like = tasks[2]
    inside = [i in clicks.get(u, set()) for u, i in zip(like.users.tolist(), like.targets.tolist(), strict=True)]
    return float(np.mean(inside))


@pytest.fixture(scope="module")
def paired_data() -> dict[str, tuple[np.ndarray, list[TaskData]]]:
    out = {}
    for relation in ("related", "independent"):
        t1, tasks, _ = generate(SyntheticSpec(relation=relation))
        out[relation] = (t1, tasks)
    return out


def test_related_likes_are_a_subset_of_clicks_and_independent_ones_are_not(
    paired_data: dict[str, tuple[np.ndarray, list[TaskData]]], default_data: tuple[np.ndarray, list[TaskData]]
) -> None:
    t1_rel, related = paired_data["related"]
    t1_ind, independent = paired_data["independent"]
    assert _share_in_clicks(related) == 1.0
    assert _share_in_clicks(independent) == 0.0  # click and like draw from disjoint genres
    # The quick start's data: neither a subset nor disjoint (separate catalogues, ids overlap by number).
    assert 0.0 < _share_in_clicks(default_data[1]) < 0.2
    # The same T1 in all three; related and independent share click and the like users and counts.
    np.testing.assert_array_equal(t1_rel, default_data[0])
    np.testing.assert_array_equal(t1_ind, t1_rel)
    for a, b in zip(related[1:], independent[1:], strict=True):
        np.testing.assert_array_equal(a.users, b.users)
        if a.name != "like":
            np.testing.assert_array_equal(a.targets, b.targets)
    like = related[2]
    assert like.num_items == related[1].num_items == 300 and 2800 < like.num_instances < 3200
    assert 1800 < len(np.unique(like.users)) < 2200 and 7000 < related[1].num_instances < 8000
    # relation_strength 0.5: about half the likes are clicks, the others independent draws.
    halved = SyntheticSpec(relation="related", relation_strength=0.5)
    assert 0.45 < _share_in_clicks(generate(halved)[1]) < 0.55


@pytest.mark.parametrize("relation", ["related", "independent"])
def test_paired_relations_keep_every_task_learnable(
    paired_data: dict[str, tuple[np.ndarray, list[TaskData]]], relation: str
) -> None:
    """Naive Bayes on the bag of T1 items beats popularity on click and like, and the majority
    class on the profile tasks (tied to the genre mix seen in the sequence)."""
    t1, tasks = paired_data[relation]
    for index, margin in ((1, 1.25), (2, 1.25)):
        scores, targets, counts = _naive_bayes_scores(t1, tasks[index], index)
        hr_model = _hit_rate(scores, targets)
        hr_pop = _hit_rate(np.tile(counts.astype(float), (len(targets), 1)), targets)
        assert hr_model > margin * hr_pop, (relation, tasks[index].name, hr_model, hr_pop)
    for index, gain in ((3, 0.2), (4, 0.25)):
        scores, targets, counts = _naive_bayes_scores(t1, tasks[index], index)
        accuracy = float((scores.argmax(axis=1) == targets).mean())
        majority = float((targets == counts.argmax()).mean())
        assert accuracy > majority + gain, (relation, tasks[index].name, accuracy, majority)


def test_paired_relations_are_deterministic(tmp_path: Path) -> None:
    spec = SyntheticSpec(num_users=400, num_items=100, seq_len=8, seed=3, relation="related")
    a = write_synthetic(str(tmp_path / "a"), spec, instances_per_shard=300)
    b = write_synthetic(str(tmp_path / "b"), spec, instances_per_shard=300)
    assert a.to_json() == b.to_json() and shards_digest(a) == shards_digest(b)
    assert a.source["spec"]["relation"] == "related" and a.task("like").num_outputs == 300
    other = write_synthetic(
        str(tmp_path / "c"),
        SyntheticSpec(num_users=400, num_items=100, seq_len=8, seed=4, relation="related"),
        instances_per_shard=300,
    )
    assert shards_digest(other) != shards_digest(a)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"relation": "related_ish"},
            r"relation=related_ish: must be one of \['shared_taste', 'related', 'independent'\]",
        ),
        (
            {"relation": "independent", "relation_strength": 0.5},
            r"relation_strength=0\.5: must be in \[0, 1\], and 1 unless relation is 'related'",
        ),
        ({"relation": "related", "relation_strength": 1.5}, r"relation_strength=1\.5"),
        ({"like_rate": 0.0}, r"like_rate=0\.0: must be in \(0, 1\]"),
    ],
)
def test_relation_options_are_checked(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticSpec(**values)


def test_shards_of_another_relation_are_refused(tmp_path: Path) -> None:
    """data.root built for one relation is not silently used for another; shards written before
    the key existed count as the default's."""
    import json

    import torch

    from conure_dist.config import load_config
    from conure_dist.data.dataset import open_dataset
    from conure_dist.dist import DistInfo
    from data_tools.prepare import build_missing_shards

    cpu = DistInfo(0, 1, 0, torch.device("cpu"), None)

    def prepare_data(cfg):  # as `conure run` does: build what is missing, then read
        build_missing_shards(cfg.data, cpu)
        return open_dataset(cfg)[0]

    preset = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    small = [f"data.root={tmp_path / 'd'}", "data.synthetic.num_users=200", "data.synthetic.num_items=60"]
    assert prepare_data(load_config(preset, small)).source["spec"]["relation"] == "shared_taste"
    related = load_config(preset, [*small, "data.synthetic.relation=related"])
    with pytest.raises(ValueError, match=r"data.synthetic.relation=related \(the shards have shared_taste\)"):
        prepare_data(related)
    manifest_path = tmp_path / "d" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for key in ("relation", "relation_strength", "like_rate"):
        del manifest["source"]["spec"][key]
    manifest_path.write_text(json.dumps(manifest))
    assert prepare_data(load_config(preset, small)).task("like").num_outputs == 200
    with pytest.raises(ValueError, match=r"relation_strength.*applies to relation 'related' only"):
        load_config(preset, [*small, "data.synthetic.relation_strength=0.5"])
