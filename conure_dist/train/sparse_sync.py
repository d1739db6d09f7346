"""Row-sparse gradient averaging for the big item tables under data parallelism.

In T1 the item embedding and the sampled-softmax table (646K rows on TTL) are trained, but one
step touches only the rows of the items in its sequences and of the shared negatives. A dense
all-reduce moves every row anyway. Here each rank finds the rows where its gradient is non-zero,
the ranks agree on the union (one all-gather of row ids), and only those rows are all-reduced.
Rows outside the union are zero on every rank, so the result equals the dense average.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn

from conure_dist.dist import DistInfo


class RowSparseAllReduce:
    """Averages ``params``' gradients over ranks, exchanging only rows some rank touched.

    ``bytes_last_step`` holds what one rank contributed in the last call: the row values it
    all-reduced plus the row ids it all-gathered (the figure comparable to a dense all-reduce's
    buffer size).
    """

    def __init__(self, params: dict[str, nn.Parameter], dist: DistInfo) -> None:
        self.params = params
        self.dist = dist
        self.bytes_last_step = 0

    def dense_bytes(self) -> int:
        """Bytes a dense all-reduce of these gradients would move per rank."""
        return sum(p.numel() * p.element_size() for p in self.params.values())

    def __call__(self) -> None:
        grads = []
        for param in self.params.values():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grads.append(param.grad.reshape(param.shape[0], -1))
        device = grads[0].device
        local = [g.ne(0).any(dim=1).nonzero().squeeze(1) for g in grads]
        counts = torch.tensor([len(r) for r in local], device=device)
        all_counts = [torch.empty_like(counts) for _ in range(self.dist.world_size)]
        tdist.all_gather(all_counts, counts)
        width = int(torch.stack(all_counts).sum(dim=1).max())
        ids = torch.full((width,), -1, dtype=torch.long, device=device)
        flat = torch.cat(local)
        ids[: len(flat)] = flat
        gathered = [torch.empty_like(ids) for _ in range(self.dist.world_size)]
        tdist.all_gather(gathered, ids)
        # Row ids of every rank, split back per table; their union is what gets reduced.
        unions = []
        for index in range(len(grads)):
            rows = []
            for rank_ids, rank_counts in zip(gathered, all_counts, strict=True):
                start = int(rank_counts[:index].sum())
                rows.append(rank_ids[start : start + int(rank_counts[index])])
            unions.append(torch.unique(torch.cat(rows)))
        values = torch.cat([g[rows].reshape(-1) for g, rows in zip(grads, unions, strict=True)])
        tdist.all_reduce(values)
        values /= self.dist.world_size
        offset = 0
        for grad, rows in zip(grads, unions, strict=True):
            size = len(rows) * grad.shape[1]
            grad[rows] = values[offset : offset + size].view(len(rows), grad.shape[1])
            offset += size
        self.bytes_last_step = values.numel() * values.element_size() + ids.numel() * ids.element_size()
