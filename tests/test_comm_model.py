"""The communication model (``conure_dist.scaling.comm_model``): ring formulas, expected touched
rows, the cheaper exchange, and its bytes against the bytes counted at the exchange seam of real
1-, 2- and 4-process gloo runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import REPO, tiny_config

from conure_dist.scaling import comm_model as cm

GLOO = cm.LINKS["gloo"]


def test_ring_collectives_send_what_the_ring_algorithm_sends():
    size, world = 1_000_000, 8
    wire, seconds = cm.ring_all_reduce(size, world, GLOO)
    assert wire == 2 * 7 / 8 * size
    assert math.isclose(seconds, 14 * (GLOO.latency + size / 8 / GLOO.bandwidth))
    assert cm.ring_all_gather(100, 4, GLOO)[0] == 300
    assert cm.ring_all_reduce(size, 1, GLOO) == (0.0, 0.0)
    # Across 4 nodes the hierarchical all-reduce sends 8x less over InfiniBand and is faster.
    topo = cm.topology(32)
    assert topo.num_nodes == 4 and topo.slowest.name == "infiniband"
    flat, hier = cm.all_reduce_time(size, topo), cm.all_reduce_time(size, topo, hierarchical=True)
    assert hier[1] < flat[1]
    inter_wire = cm.ring_all_reduce(size / 8, 4, cm.LINKS["infiniband"])[0]
    assert math.isclose(inter_wire * 8, 2 * 3 / 4 * size)


def test_expected_distinct_items_match_sampling():
    popularity = cm.zipf_popularity(5000, 1.1)
    g = np.random.default_rng(0)
    for draws in (10, 1000, 20000):
        sampled = np.mean([len(np.unique(g.choice(5000, draws, p=popularity))) for _ in range(20)])
        assert abs(cm.expected_distinct(popularity, draws) - sampled) < 0.02 * sampled + 2


def test_row_sparse_wins_on_small_batches_and_dense_once_the_union_covers_the_table():
    table = cm.Table("softmax", 646_000, 256)
    topo = cm.topology(16)
    batch = cm.SequenceBatch(4, 99.0, cm.zipf_popularity(646_000, 1.0), cm.num_negatives(646_000, 0.01))
    rows = cm.expected_rows(batch, 16)["softmax"]
    assert cm.compare_exchanges(table, *rows, topo).choice == "row_sparse"
    # Weak scaling: 256 ranks of 512 sequences touch almost every row; a dense all-reduce is cheaper.
    big = cm.SequenceBatch(512, 99.0, cm.zipf_popularity(646_000, 0.6), cm.num_negatives(646_000, 0.2))
    rows = cm.expected_rows(big, 256)["softmax"]
    assert rows[1] > 0.95 * 646_000
    assert cm.compare_exchanges(table, *rows, cm.topology(256)).choice == "dense"


def test_touched_rows_of_a_batch():
    seq = torch.tensor([[0, 0, 5, 7, 9], [0, 3, 3, 4, 5]])
    rows = cm.touched_rows(seq, torch.tensor([11, 7]))
    assert rows["embedding"].tolist() == [3, 4, 5, 7]  # inputs: all but the last position, no padding
    assert rows["softmax"].tolist() == [3, 4, 5, 7, 9, 11]  # targets after a real item, and negatives


@pytest.fixture(scope="module")
def measured_bytes(tmp_path_factory):
    """The worker's counted and predicted bytes at 1, 2 and 4 processes (T1 row-sparse, then a
    later task's dense buckets), on one tiny dataset."""
    tmp = tmp_path_factory.mktemp("comm")
    config = tiny_config(tmp, [("t1", 0.5), ("click", 0.5)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    out = {}
    for nproc in (1, 2, 4):
        path = tmp / f"bytes{nproc}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        cmd += [str(REPO / "tests/comm_bytes_worker.py"), str(config), str(path), "dist.sparse_exchange=row_sparse"]
        result = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-12000:]
        out[nproc] = json.loads(path.read_text())
    return out


@pytest.mark.slow
@pytest.mark.multiprocess
def test_model_bytes_equal_the_bytes_counted_at_the_exchange_seam(measured_bytes):
    for nproc, result in measured_bytes.items():
        assert result["world_size"] == nproc and len(result["ranks"]) == nproc
        for rank in result["ranks"]:
            t1, later = rank
            assert t1["steps"] > 0 and later["steps"] > 0
            if nproc == 1:  # nothing is exchanged
                assert t1["measured"] == t1["exact"] == {} and later["measured"] == {}
                continue
            assert t1["row_sparse"] == [
                "model.backbone.embedding.weight",
                "model.heads.t1.weight",
                "model.heads.t1.bias",
            ]
            for phase in (t1, later):
                assert phase["measured"] == {k: int(v) for k, v in phase["exact"].items()}, (nproc, phase["task"])
            assert set(t1["measured"]) == {
                "loss.all_reduce",
                "dense.all_reduce",
                "row_sparse.all_gather",
                "row_sparse.all_reduce",
            }
            assert set(later["measured"]) == {"loss.all_reduce", "dense.all_reduce"}
            # Sizes that do not depend on the batch: the expected figures are the exact ones.
            for phase in (t1, later):
                steps = phase["steps"]
                for key in ("loss.all_reduce", "dense.all_reduce"):
                    assert phase["expected_per_step"][key] * steps == phase["measured"][key]
            # Touched rows in expectation: within 10% of the counted row-sparse bytes.
            for key in ("row_sparse.all_gather", "row_sparse.all_reduce"):
                measured = t1["measured"][key] / t1["steps"]
                assert abs(t1["expected_per_step"][key] - measured) < 0.10 * measured, (nproc, key)


def test_paper_size_predictions_hold_their_invariants():
    """benchmarks/scaling_model.py (docs/scaling.md's predicted tables) on the paper's TTL sizes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("scaling_model", REPO / "benchmarks/scaling_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pred = module.predictions()
    # T1's global batch of 32 splits up to 32 GPUs only.
    assert [r["world_size"] for r in pred["t1_strong_global_32"]] == [8, 16, 32]
    for row in pred["t1_weak_4_per_gpu"]:
        assert row["global_batch"] == 4 * row["world_size"]
        assert row["row_sparse_comm_ms"] < row["dense_comm_ms"]  # 20% negatives: about a fifth of the rows
        assert row["auto_comm_ms"] <= row["row_sparse_comm_ms"] + 1e-9
        assert row["auto_comm_hierarchical_ms"] <= row["auto_comm_ms"] + 1e-9
    later = pred["later_weak_64_per_gpu"]
    assert all(r["dense_payload_mb"] == later[0]["dense_payload_mb"] for r in later)
    assert later[0]["comm_share"] < 0.5 < later[-1]["comm_share"]  # communication overtakes compute
