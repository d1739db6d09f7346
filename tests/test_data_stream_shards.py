"""The shard reader on damaged shards (truncated, corrupted, missing, miscounted) and on
``file://`` and S3 roots; the data and helpers are those of ``test_data_stream.py``."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_data_stream import SPEC, SPLIT_SEED, collect, expected_instances, write_many

from conure_dist.data.manifest import Manifest
from conure_dist.data.stream import ShardError, iter_batches
from data_tools.synthetic import generate, write_synthetic


@pytest.fixture(scope="module")
def generated() -> tuple[np.ndarray, list]:
    t1, tasks, _ = generate(SPEC)
    return t1, tasks


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return write_many(str(tmp_path_factory.mktemp("many")))


@pytest.fixture
def damaged(many: Manifest, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the many-shard root and the path of click/train shard 3 in it."""
    root = tmp_path / "copy"
    shutil.copytree(many.root, root)
    return root, root / "click" / "train-000003.tar"


def _read_all(root: Path) -> None:
    for _ in iter_batches(Manifest.load(str(root)), "click", "train", 64, shuffle=False, seed=0, epoch=0):
        pass


def _rewrite_manifest(root: Path, **shard_fields: int | str) -> None:
    path = root / "manifest.json"
    raw = json.loads(path.read_text())
    task = next(t for t in raw["tasks"] if t["name"] == "click")
    shard = task["splits"]["train"]["shards"][3]
    if "num_instances" in shard_fields:
        task["splits"]["train"]["num_instances"] += shard_fields["num_instances"] - shard["num_instances"]
    shard.update(shard_fields)
    path.write_text(json.dumps(raw))


def test_truncated_shard(damaged: tuple[Path, Path]) -> None:
    root, shard = damaged
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ShardError,
        match=f"shard {shard}: .* bytes, the manifest says {len(data)} \\(truncated\\?\\)",
    ):
        _read_all(root)


def test_truncated_shard_with_matching_manifest(damaged: tuple[Path, Path]) -> None:
    """Even if the manifest was rewritten to match, the tar layer names the shard."""
    root, shard = damaged
    cut = shard.read_bytes()[:3000]
    shard.write_bytes(cut)
    _rewrite_manifest(root, sha256=hashlib.sha256(cut).hexdigest(), num_bytes=len(cut))
    with pytest.raises(ShardError, match=f"shard {shard}: (unreadable|holds)"):
        _read_all(root)


def test_corrupted_byte(damaged: tuple[Path, Path]) -> None:
    root, shard = damaged
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"shard {shard}: sha256 differs from the manifest"):
        _read_all(root)


def test_missing_shard(damaged: tuple[Path, Path]) -> None:
    root, shard = damaged
    shard.unlink()
    with pytest.raises(ShardError, match=f"shard {shard}: missing"):
        _read_all(root)


def test_count_mismatch(damaged: tuple[Path, Path]) -> None:
    root, shard = damaged
    actual = json.loads((root / "manifest.json").read_text())["tasks"][1]["splits"]["train"]["shards"][3][
        "num_instances"
    ]
    _rewrite_manifest(root, num_instances=actual + 1)
    with pytest.raises(ShardError, match=f"shard {shard}: holds {actual} instances, the manifest says {actual + 1}"):
        _read_all(root)
    assert issubclass(ShardError, ValueError)


def test_file_url_root(many: Manifest, generated) -> None:
    manifest = Manifest.load("file://" + many.root)
    users, targets, _, _ = collect(iter_batches(manifest, "like", "valid", 100, shuffle=False, seed=0, epoch=0))
    want_users, want_targets = expected_instances(generated, "like", "valid")
    np.testing.assert_array_equal(users, want_users)
    np.testing.assert_array_equal(targets, want_targets)


@pytest.mark.slow
def test_s3_round_trip(s3_endpoint: str, many: Manifest) -> None:
    root = "s3://conure-test/data/synthetic"
    written = write_synthetic(root, SPEC, split_seed=SPLIT_SEED, instances_per_shard=97, records_per_sample=16)
    loaded = Manifest.load(root)
    assert loaded.to_json() == written.to_json() == many.to_json()  # byte-identical shards to the local ones
    assert loaded.shard_urls("click", "train")[0] == f"{root}/click/train-000000.tar"
    remote = collect(iter_batches(loaded, "click", "train", 64, shuffle=True, seed=3, epoch=1, rank=1, world_size=2))
    local = collect(iter_batches(many, "click", "train", 64, shuffle=True, seed=3, epoch=1, rank=1, world_size=2))
    np.testing.assert_array_equal(remote[0], local[0])
    np.testing.assert_array_equal(remote[1], local[1])
    np.testing.assert_array_equal(loaded.load_train_counts("click"), many.load_train_counts("click"))
