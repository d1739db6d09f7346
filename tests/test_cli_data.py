"""``conure data``'s options for the related synthetic tasks and the MovieLens T1-user filter."""

import json
from pathlib import Path

import pytest

from conure_dist.cli import main
from conure_dist.data.manifest import Manifest

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


def _t1_users(root: Path) -> int:
    manifest = Manifest.load(str(root))
    t1 = manifest.tasks[0]
    return sum(t1.splits[s].num_instances for s in ("train", "valid", "test"))


def test_synthetic_relation_reaches_the_generator(tmp_path):
    args = ["data", "synthetic", "--num-users", "200", "--num-items", "40", "--seq-len", "8"]
    assert main([*args, "--out", str(tmp_path / "rel"), "--relation", "related", "--relation-strength", "0.5"]) == 0
    spec = json.loads((tmp_path / "rel" / "manifest.json").read_text())["source"]["spec"]
    assert (spec["relation"], spec["relation_strength"]) == ("related", 0.5)
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "bad"), "--relation", "tied"])


@pytest.mark.slow
@pytest.mark.skipif(not ML100K.is_dir(), reason="needs ../shared/data/ml-100k (the real MovieLens-100K)")
def test_movielens_keeps_users_with_more_than_five_t1_ratings(tmp_path):
    assert main(["data", "movielens", "--src", str(ML100K), "--out", str(tmp_path / "all")]) == 0
    assert (
        main(["data", "movielens", "--src", str(ML100K), "--out", str(tmp_path / "six"), "--min-t1-interactions", "6"])
        == 0
    )
    assert _t1_users(tmp_path / "all") == 941 and _t1_users(tmp_path / "six") == 894
