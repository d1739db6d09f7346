"""The checkpointer on its own: commits and torn commit markers, with synchronous and with
asynchronous writes (``tests/test_checkpoint_async.py`` tests what only the latter do)."""

import json

import pytest
import torch

from conure_dist.checkpoint.checkpointer import Checkpointer
from conure_dist.checkpoint.format import COMMIT, CheckpointError, load_checkpoint
from conure_dist.dist import DistInfo

CPU = DistInfo(0, 1, 0, torch.device("cpu"), None)


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def make(request):
    """Checkpointers that write synchronously, or asynchronously (``_save`` waits for them)."""
    return lambda root, **kwargs: Checkpointer(str(root), CPU, async_writes=request.param, **kwargs)


def _save(ckpt: Checkpointer, index: int, value: float) -> str:
    path = ckpt.write(
        index,
        f"t1-step{index}",
        {
            "model.pt": {"w": torch.full((3,), value)},
            "ownership.pt": {"w": torch.zeros(3, dtype=torch.uint8)},
            "meta.json": {"index": index},
            "phase.pt": {"best": {"w": torch.full((3,), value)}},
        },
    )
    ckpt.wait()
    return path


def test_a_torn_commit_marker_falls_back_to_the_previous_checkpoint(tmp_path, make):
    ckpt = make(tmp_path, keep=3)
    _save(ckpt, 0, 1.0)
    newest = _save(ckpt, 1, 2.0)
    # The marker was renamed into place: nothing but the parts and COMMIT is left in the folder.
    assert {p.name for p in (tmp_path / "checkpoints" / "00001-t1-step1").iterdir()} == {
        "model.pt",
        "ownership.pt",
        "meta.json",
        "phase.pt",
        COMMIT,
    }
    commit = tmp_path / "checkpoints" / "00001-t1-step1" / COMMIT
    commit.write_bytes(commit.read_bytes()[:20])  # a marker cut short, as a kill mid-write would leave it
    with pytest.raises(CheckpointError, match=f"{newest}/{COMMIT} is unreadable"):
        load_checkpoint(newest)
    good = ckpt.latest_valid()
    assert good is not None and good.meta["index"] == 0 and torch.equal(good.model["w"], torch.ones(3))


def test_a_commit_marker_without_its_file_list_is_an_error(tmp_path, make):
    ckpt = make(tmp_path)
    path = _save(ckpt, 0, 1.0)
    (tmp_path / "checkpoints" / "00000-t1-step0" / COMMIT).write_text(json.dumps({"files": ["model.pt"]}))
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)
    # Committed, but none intact: an error rather than a fresh start that would delete them.
    with pytest.raises(CheckpointError, match="no committed checkpoint under .* is intact: .*00000-t1-step0/COMMIT"):
        ckpt.latest_valid()


def test_nothing_committed_is_a_fresh_start_and_indices_keep_growing(tmp_path, make):
    ckpt = make(tmp_path)
    assert ckpt.latest_valid() is None and ckpt.last_index() == 0
    (tmp_path / "checkpoints" / "00007-t1-step7").mkdir(parents=True)  # a save cut short before its commit
    assert ckpt.latest_valid() is None and ckpt.last_index() == 7
    _save(ckpt, 3, 1.0)
    assert ckpt.last_index() == 7 and len(ckpt.committed()) == 1


def test_retention_keeps_intact_checkpoints_past_a_broken_one(tmp_path, make):
    ckpt = make(tmp_path, keep=2)
    for index in range(3):
        _save(ckpt, index, float(index))
    names = lambda: [p.rsplit("/", 1)[-1] for p in ckpt.committed()]  # noqa: E731
    assert names() == ["00001-t1-step1", "00002-t1-step2"]
    (tmp_path / "checkpoints" / "00002-t1-step2" / "model.pt").write_bytes(b"garbage")
    resumed = make(tmp_path, keep=2)
    assert resumed.latest_valid().meta["index"] == 1
    _save(resumed, 3, 3.0)
    # Two intact checkpoints (1 and 3): the broken one does not push 1 out.
    assert names() == ["00001-t1-step1", "00002-t1-step2", "00003-t1-step3"]
    _save(resumed, 4, 4.0)
    assert names() == ["00003-t1-step3", "00004-t1-step4"]


class _Counter:
    """A piece of state the checkpointer has never heard of: it saves and loads itself."""

    def __init__(self, value: int) -> None:
        self.value = torch.tensor([value])

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value.copy_(state["value"])


def test_parts_are_any_objects_that_save_themselves(tmp_path, make):
    model = torch.nn.Linear(3, 2)
    ckpt = make(tmp_path)
    path = ckpt.write(
        1,
        "t1-done",
        {"model.pt": model, "ownership.pt": {"w": torch.ones(2, dtype=torch.uint8)}, "meta.json": {"step": 7}},
        rank_parts={"counter.pt": _Counter(41)},
    )
    ckpt.wait()
    loaded = load_checkpoint(path)
    assert loaded.meta == {"format_version": 1, "step": 7}
    assert set(loaded.digests) == {"model.pt", "ownership.pt", "meta.json", "counter.pt"}
    assert all(torch.equal(loaded.model[k], v) for k, v in model.state_dict().items())
    counter = _Counter(0)
    counter.load_state_dict(loaded.read_part("counter.pt"))
    assert counter.value.item() == 41
    with pytest.raises(ValueError, match=r"\['meta.json'\] not given"):
        ckpt.write(2, "t1-bad", {"model.pt": model, "ownership.pt": {}})
