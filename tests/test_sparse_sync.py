"""Row-sparse gradient exchange on a real 2-process gloo group: equals the dense average and
moves only the rows some rank touched."""

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch import nn

from conure_dist.dist import DistInfo
from conure_dist.train.sparse_sync import RowSparseAllReduce

pytestmark = pytest.mark.multiprocess
ROWS, COLS, WORLD = 1000, 8, 2


def _grads(rank: int) -> dict[str, torch.Tensor]:
    """Rank-specific gradients: a few touched rows (some shared across ranks), the rest zero."""
    g = torch.Generator().manual_seed(rank)
    table, bias = torch.zeros(ROWS, COLS), torch.zeros(ROWS)
    rows = torch.cat([torch.tensor([3, 500]), torch.randint(0, ROWS, (20,), generator=g)])
    table[rows] = torch.randn(len(rows), COLS, generator=g)
    bias[rows[:5]] = torch.randn(5, generator=g)
    return {"table": table, "bias": bias, "untouched": torch.zeros(ROWS, COLS)}


def _worker(rank: int, init: str, results: dict) -> None:
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        params = {n: nn.Parameter(torch.zeros_like(g)) for n, g in _grads(rank).items()}
        for name, param in params.items():
            if name != "untouched":  # a table nobody touched has no .grad at all
                param.grad = _grads(rank)[name].clone()
        sync = RowSparseAllReduce(params, DistInfo(rank, WORLD, rank, torch.device("cpu"), "gloo"))
        sync()
        results[rank] = ({n: p.grad.clone() for n, p in params.items()}, sync.bytes_last_step, sync.dense_bytes())
    finally:
        tdist.destroy_process_group()


def test_row_sparse_all_reduce_equals_dense_average(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(f"file://{tmp_path / 'store'}", results), nprocs=WORLD, join=True)
    expected = {n: (_grads(0)[n] + _grads(1)[n]) / WORLD for n in ("table", "bias", "untouched")}
    touched = {n: int(expected[n].reshape(ROWS, -1).ne(0).any(1).sum()) for n in expected}
    assert touched["untouched"] == 0 and 20 < touched["table"] <= 44
    for rank in range(WORLD):
        grads, sent, dense = results[rank]
        for name, value in expected.items():
            assert torch.equal(grads[name], value), (rank, name)  # a sum of two floats is exact
        assert dense == (2 * ROWS * COLS + ROWS) * 4
        # Values of the touched rows (union over ranks), plus the padded row ids.
        values = (touched["table"] * COLS + touched["bias"]) * 4
        assert values < sent < values + 2 * 8 * 27
        assert sent < 0.05 * dense
