"""docs/results/profile_signal.py: the cross-validated probe behind the profile-task analysis."""

import importlib.util

import pytest
from helpers import REPO

from conure_dist.data.manifest import Manifest
from data_tools.synthetic import SyntheticSpec, write_synthetic

spec = importlib.util.spec_from_file_location("profile_signal", REPO / "docs" / "results" / "profile_signal.py")
profile_signal = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile_signal)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Manifest:
    return write_synthetic(str(tmp_path_factory.mktemp("signal")), SyntheticSpec(num_users=800, num_items=100, seed=2))


def test_planted_profiles_are_found_without_the_test_split(synthetic):
    x, y = profile_signal.bag_of_items(synthetic, "gender")
    train_valid = sum(synthetic.task("gender").splits[s].num_instances for s in ("train", "valid"))
    assert x.shape == (train_valid, synthetic.num_seq_items) and len(y) == train_valid
    assert float(x[:, 0].abs().max()) == 0.0 and x.sum(1).sub(1).abs().max() < 1e-5  # padding dropped, rows sum to 1
    scores = profile_signal.cross_validate(x, y, 2, folds=3, repeats=1)
    best = min((r for name, r in scores.items() if name != "prior"), key=lambda r: r["log_loss"])
    # The synthetic generator plants gender in the users' tastes: the probe must see it.
    assert best["log_loss"] < scores["prior"]["log_loss"] - 0.05
    assert best["accuracy"] > scores["prior"]["accuracy"] + 0.05
