"""``conure embed``: every T1 user's vector under a task's inference view, as per-rank NumPy
shards plus an index, equal bit for bit on 1 and 2 processes and to the view's hidden state."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from helpers import cli_on
from torch import nn
from torch.func import functional_call

from conure_dist.continual.views import MaskedModel
from conure_dist.data.manifest import SPLITS
from conure_dist.data.stream import iter_batches
from conure_dist.dist import DistInfo
from conure_dist.serving.embed import embed_users
from conure_dist.serving.export import task_input
from conure_dist.serving.inference import TrainedRun, load_trained, manifest_for

pytestmark = pytest.mark.slow
NUM_USERS = 400
# 53 leaves batches of 2 rows at the end of a split (320 = 6 * 53 + 2): padded to 53 rows, they
# are computed exactly as the full ones.
OPTIONS = ("--batch-size", "53", "--users-per-shard", "150")


@pytest.fixture(scope="module")
def run_dir(tiny_trained_run: Path) -> Path:
    return tiny_trained_run


def embed(run_dir: Path, task: str, out: str, nproc: int = 1) -> dict:
    printed = cli_on(nproc, "embed", "--ckpt", str(run_dir), "--task", task, "--out", out, *OPTIONS)
    return json.loads(printed[printed.index("{") :])


@pytest.fixture(scope="module")
def one_process(run_dir: Path) -> dict[str, Path]:
    """``t1`` and ``click`` embedded by one process."""
    out = {}
    for task in ("t1", "click"):
        out[task] = run_dir.parent / f"embed-{task}"
        summary = embed(run_dir, task, str(out[task]))
        assert summary == {
            "task": task,
            "users": NUM_USERS,
            "shards": 3,
            "dim": 16,
            "out": str(out[task]),
            "index": str(out[task] / "index.json"),
        }
    return out


def read_embedding(url: str) -> tuple[dict, dict[str, dict[int, np.ndarray]]]:
    """index.json and, per shard file, user -> vector."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    index = json.loads(fs.cat_file(f"{root}/index.json"))
    shards = {}
    for entry in index["shards"]:
        with np.load(io.BytesIO(fs.cat_file(f"{root}/{entry['file']}")), allow_pickle=False) as z:
            assert set(z.files) == {"users", "vectors"}, "synthetic data records no raw user ids"
            users, vectors = z["users"], z["vectors"]
        assert users.dtype == np.int64 and vectors.dtype == np.float32 and vectors.shape == (len(users), 16)
        shards[entry["file"]] = dict(zip(users.tolist(), vectors, strict=True))
    return index, shards


def merged(shards: dict[str, dict[int, np.ndarray]]) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    for part in shards.values():
        assert not set(part) & set(out), "a user appears in two shards"
        out.update(part)
    return out


class Representer(nn.Module):
    """``ConureModel.represent`` as a module's forward, so that ``functional_call`` can run it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, seq: torch.Tensor, task: str) -> torch.Tensor:
        return self.model.represent(seq, task)


def view_hidden(run: TrainedRun, task: str, seq: torch.Tensor) -> torch.Tensor:
    """The hidden state that the task's head scores, computed on the checkpoint's model under the
    task's inference view (the view's effective weights, as ``MaskedModel`` runs the model)."""
    masked = MaskedModel(run.model, run.ownership)
    masked.set_view("infer", run.task_names.index(task) + 1)
    weights = {f"model.{name}": w for name, w in masked.effective_weights().items()}
    with torch.no_grad():
        return functional_call(Representer(run.model), weights, (seq, task), strict=False)


def test_represent_is_what_every_head_scores(run_dir):
    run = load_trained(str(run_dir))
    manifest = manifest_for(run.ckpt, None)
    seq = next(iter(iter_batches(manifest, "t1", "test", 16, shuffle=False, seed=0, epoch=0))).seq
    model = run.model.eval()
    for task, kind in model.kinds.items():
        fed = task_input(seq, kind)
        with torch.no_grad():
            assert torch.equal(model.heads[task].scores(model.represent(fed, task)), model(fed, task))


@pytest.mark.parametrize("task", ["t1", "click"])
def test_every_user_once_in_bounded_shards_with_a_consistent_index(run_dir, one_process, task):
    index, shards = read_embedding(str(one_process[task]))
    assert sorted(merged(shards)) == list(range(NUM_USERS)), "every T1 user exactly once"
    sizes = [len(part) for part in shards.values()]
    assert sizes == [150, 150, 100]
    assert [s["users"] for s in index["shards"]] == sizes
    assert sorted(p.name for p in one_process[task].iterdir()) == ["index.json", *sorted(shards)]
    run = load_trained(str(run_dir))
    manifest = manifest_for(run.ckpt, None)
    assert index["splits"] == {s: manifest.split_info("t1", s).num_instances for s in SPLITS}
    assert index["users"] == NUM_USERS and index["dim"] == 16 and index["task"] == task
    assert index["checkpoint"] == run.ckpt.url and index["world_size"] == 1
    assert index["task_checksum"] == run.ckpt.meta["state"]["task_checksums"][task]


@pytest.mark.parametrize("task", ["t1", "click"])
def test_vectors_are_the_view_hidden_state(run_dir, one_process, task):
    run = load_trained(str(run_dir))
    vectors = merged(read_embedding(str(one_process[task]))[1])
    manifest = manifest_for(run.ckpt, None)
    batch = next(iter(iter_batches(manifest, "t1", "test", 60, shuffle=False, seed=0, epoch=0)))
    fed = task_input(batch.seq, run.model.kinds[task])
    hidden = view_hidden(run, task, fed)
    got = torch.from_numpy(np.stack([vectors[u] for u in batch.user.tolist()]))
    assert torch.equal(got, hidden)
    # ... the vectors the task's head scores: for T1, conure predict's next-item scores.
    masked = MaskedModel(run.model, run.ownership)
    masked.set_view("infer", run.task_names.index(task) + 1)
    with torch.no_grad():
        assert torch.equal(run.model.heads[task].scores(got), masked(fed, task))


@pytest.mark.multiprocess
def test_two_processes_give_the_same_vectors(run_dir, one_process, tmp_path):
    summary = embed(run_dir, "click", str(tmp_path / "two"), nproc=2)
    assert summary["users"] == NUM_USERS
    index, shards = read_embedding(str(tmp_path / "two"))
    assert index["world_size"] == 2
    assert {s["rank"] for s in index["shards"]} == {0, 1}
    assert all(name.startswith(f"part-r{s['rank']:03d}-") for name, s in zip(shards, index["shards"], strict=True))
    assert all(n <= 150 for n in (len(p) for p in shards.values()))
    two = merged(shards)
    one = merged(read_embedding(str(one_process["click"]))[1])
    assert sorted(two) == sorted(one) == list(range(NUM_USERS))
    assert all(np.array_equal(two[u], one[u]) for u in one)


def test_embedding_to_s3(s3_endpoint, run_dir, one_process):
    out = "s3://conure-test/embed/click"
    summary = embed(run_dir, "click", out)
    assert summary["users"] == NUM_USERS and summary["index"] == f"{out}/index.json"
    index, shards = read_embedding(out)
    assert index["users"] == NUM_USERS and len(shards) == 3
    local = merged(read_embedding(str(one_process["click"]))[1])
    remote = merged(shards)
    assert sorted(remote) == sorted(local) and all(np.array_equal(remote[u], local[u]) for u in local)


def test_previous_embedding_is_replaced_and_anything_else_refused(run_dir, one_process, tmp_path):
    cpu = DistInfo(0, 1, 0, torch.device("cpu"), None)
    out = tmp_path / "again"
    out.mkdir()
    for path in one_process["click"].iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    summary = embed_users(str(run_dir), "click", str(out), cpu, batch_size=53, users_per_shard=1000)
    assert summary["shards"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "part-r000-00000.npz"], "stale shards removed"
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and not a previous conure embedding"):
        embed_users(str(run_dir), "click", str(out), cpu)
    assert (out / "notes.txt").read_text() == "mine" and (out / "index.json").exists()
    with pytest.raises(ValueError, match="'nope'"):
        embed_users(str(run_dir), "nope", str(tmp_path / "x"), cpu)


def test_shard_writer_cuts_every_n_users_and_names_raw_ids():
    from conure_dist.serving.embed import ShardWriter

    writer = ShardWriter("memory://embed-writer", rank=2, per_shard=3, raw_users=[f"u{i}" for i in range(10)])
    for start in (0, 4):
        users = np.arange(start, start + 4, dtype=np.int64)
        writer.add(users, np.full((4, 2), start, dtype=np.float32))
    writer.close()
    assert [(s["file"], s["users"]) for s in writer.written] == [
        ("part-r002-00000.npz", 3),
        ("part-r002-00001.npz", 3),
        ("part-r002-00002.npz", 2),
    ]
    with fsspec.open("memory://embed-writer/part-r002-00001.npz", "rb") as f, np.load(f) as z:
        assert z["users"].tolist() == [3, 4, 5] and z["raw_users"].tolist() == ["u3", "u4", "u5"]
        assert z["vectors"][:, 0].tolist() == [0.0, 4.0, 4.0]


def test_vectors_do_not_depend_on_the_batch_size(run_dir):
    from conure_dist.serving.embed import user_vectors
    from conure_dist.serving.export import baked_network

    run = load_trained(str(run_dir))
    network = baked_network(run, "click")
    manifest = manifest_for(run.ckpt, None)
    seq = next(iter(iter_batches(manifest, "t1", "train", 300, shuffle=False, seed=0, epoch=0))).seq
    cpu = torch.device("cpu")
    full = user_vectors(network, seq, len(seq), cpu)
    for size in (1, 2, 3, 7, 53):
        parts = [user_vectors(network, seq[i : i + size], size, cpu) for i in range(0, len(seq), size)]
        assert np.array_equal(np.concatenate(parts), full), size


def test_every_file_has_the_usual_mode(one_process):
    mask = os.umask(0)
    os.umask(mask)
    files = list(one_process["t1"].iterdir())
    assert "index.json" in {p.name for p in files}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(0o666 & ~mask) for p in files}
