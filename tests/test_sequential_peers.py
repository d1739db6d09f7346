"""The T1 comparisons' inputs: the count-based references and the RecBole export see exactly the
leave-one-out split of the data root (tiny MovieLens files, exact rows and counts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.recbole_peer import export
from benchmarks.sequential_references import count_transitions, main
from data_tools.movielens import write_movielens
from tests.test_data_movielens import write_files


@pytest.fixture
def loo_root(tmp_path: Path) -> str:
    # T1 in time, as ids: user 0: 6 2 5 3 4 1; user 1: 3 2 7; user 2: 2 5 (test_split_loo).
    src = write_files(tmp_path / "raw")
    out = str(tmp_path / "loo")
    write_movielens(str(src), out, seq_len=3, t1_ratings="all", protocol="leave_one_out", split=(0.5, 0.25, 0.25))
    return out


def test_transitions_are_counted_once_each_in_the_training_windows(loo_root: str) -> None:
    # Training windows: (0 6 2), (2 5 3), (0 0 3), (0 2 5); the shared 2 of user 0 links them.
    train = np.array([[0, 6, 2], [2, 5, 3], [0, 0, 3], [0, 2, 5]])
    first, second = count_transitions(train, num_items=8)
    assert {(int(a), int(b)): int(first[a, b]) for a, b in zip(*np.nonzero(first), strict=True)} == {
        (6, 2): 1,
        (2, 5): 2,
        (5, 3): 1,
    }
    assert {k: {int(i): int(v[i]) for i in np.flatnonzero(v)} for k, v in second.items()} == {(2, 5): {3: 1}}
    result = main(["--data", loo_root, "--k", "5"])
    assert result["test"]["markov2"]["count"] == 2 and result["valid"]["popular"]["count"] == 2


def test_recbole_export_holds_every_training_prefix_and_the_same_held_out_items(loo_root: str, tmp_path: Path) -> None:
    sizes = export(loo_root, str(tmp_path / "atomic"), max_len=2)
    folder = tmp_path / "atomic" / "ml100k_loo"
    rows = {s: (folder / f"ml100k_loo.{s}.inter").read_text().splitlines() for s in ("train", "valid", "test")}
    assert rows["train"][0] == "user_id:token\titem_id_list:token_seq\titem_id:token"
    # User 1's training part is one item (3): no prefix to predict, as in its training window.
    assert rows["train"][1:] == ["0\t6\t2", "0\t6 2\t5", "0\t2 5\t3", "2\t2\t5"]
    assert rows["valid"][1:] == ["0\t5 3\t4", "1\t3\t2"]
    assert rows["test"][1:] == ["0\t3 4\t1", "1\t3 2\t7"]
    assert sizes == {"train": 4, "valid": 2, "test": 2}
