"""A model of the training and evaluation steps: FLOPs and memory traffic per part, and the
sequences (or users) per second a card's peak figures allow.

    python benchmarks/step_model.py                       # TTL's sizes on H100, H200, A100
    python benchmarks/step_model.py --check-cpu --json benchmarks/results/step_model_cpu.json

Each part of a step (backbone convolutions, the sampled softmax, the item-table gradients, L2,
Adam, ...) is counted as matrix-product FLOPs and bytes moved to and from memory; its time is the
larger of the two at the card's attainable rates (a roofline per part), and a step's time is the
sum over parts plus a launch cost per kernel. The counts follow the code (``count_*``): the
backbone's windows come from ``NextItNet.last_position_windows``, the softmax's from its
kernels' structure (forward, one recomputing backward; the chunked path's logits passes).

Cards: peak dense bf16 tensor FLOP/s, fp32 FLOP/s and memory bandwidth from the vendors' data
sheets (SXM parts), at attainable fractions that are assumptions (``MATMUL_EFFICIENCY``,
``BANDWIDTH_EFFICIENCY``), not measurements. The ``cpu`` card is calibrated on the machine it
runs on (a large fp32 GEMM and a large copy, measured) and checked (``--check-cpu``): the model
predicts a CPU T1 and later-task step at small sizes and the same steps are timed; a GPU figure
can be read against its prediction the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

MATMUL_EFFICIENCY = 0.6
"""Fraction of peak tensor FLOP/s that large bf16 products reach (assumed)."""
BANDWIDTH_EFFICIENCY = 0.8
"""Fraction of peak memory bandwidth that streaming element-wise kernels reach (assumed)."""


@dataclass(frozen=True)
class Card:
    name: str
    matmul_flops: float
    """Peak dense matrix-product FLOP/s in the products' dtype (bf16 on GPUs)."""
    bandwidth: float
    """Peak memory bandwidth, bytes/s."""
    exp_rate: float
    """Exponentials per second (a GPU's special-function units: 16 per multiprocessor and clock)."""
    launch_s: float = 5e-6
    """Seconds per kernel launch that do not overlap (a compiled step still launches hundreds)."""
    matmul_efficiency: float = MATMUL_EFFICIENCY
    bandwidth_efficiency: float = BANDWIDTH_EFFICIENCY
    note: str = ""


CARDS = {
    "h100": Card(
        "NVIDIA H100 SXM", 989e12, 3.35e12, 132 * 16 * 1.98e9, note="data sheet: 989 TFLOP/s bf16 dense, 3.35 TB/s"
    ),
    "h200": Card(
        "NVIDIA H200 SXM", 989e12, 4.8e12, 132 * 16 * 1.98e9, note="data sheet: 989 TFLOP/s bf16 dense, 4.8 TB/s"
    ),
    "a100": Card(
        "NVIDIA A100 SXM 80GB", 312e12, 2.039e12, 108 * 16 * 1.41e9, note="data sheet: 312 TFLOP/s bf16, 2.04 TB/s"
    ),
}


@dataclass(frozen=True)
class Sizes:
    """What a step's cost depends on. Defaults: TTL at the paper's model, T1 batch 256."""

    batch: int = 256
    seq_len: int = 100
    channels: int = 256
    items: int = 646_000
    negative_fraction: float = 0.2
    dilations: tuple[int, ...] = (1, 4, 1, 4, 1, 4, 1, 4)
    kernel_size: int = 3
    later_batch: int = 4096
    later_items: int = 646_000
    eval_users: int = 4096
    rows: int | None = None
    """T1 rows scored (None: every position, as the GPU path scores them; the CPU path scores only
    the predicted ones)."""
    act_bytes: int = 2
    """Bytes per activation and product operand: 2 (bf16 autocast), 4 (fp32)."""
    softmax: str = "fused"
    """``fused`` (Triton kernels: no logits in memory) or ``chunked`` (logits blocks in memory)."""
    deterministic: bool = False
    """The fused backward's partial gradients (``train.deterministic``, on by default) or atomics
    (off: what ``configs/ttl.yaml`` sets)."""
    l2_folded: bool = True
    """L2 in Adam's weight decay (CUDA) or as a penalty in the loss (its own passes)."""
    tile: int = 128
    chunk: int = 8192

    @property
    def num_rows(self) -> int:
        return self.rows if self.rows is not None else self.batch * (self.seq_len - 1)

    @property
    def negatives(self) -> int:
        return max(1, round(self.negative_fraction * (self.items - 1)))


@dataclass
class Part:
    flops: float = 0.0
    bytes: float = 0.0
    kernels: int = 0
    exps: float = 0.0
    """Exponentials (the softmax's): on a GPU they run beside the products, on a CPU they cost."""

    def seconds(self, card: Card) -> float:
        compute = self.flops / (card.matmul_flops * card.matmul_efficiency)
        memory = self.bytes / (card.bandwidth * card.bandwidth_efficiency)
        return max(compute, memory, self.exps / card.exp_rate) + self.kernels * card.launch_s


@dataclass
class StepCount:
    parts: dict[str, Part] = field(default_factory=dict)
    sequences: int = 0

    def seconds(self, card: Card) -> float:
        return sum(p.seconds(card) for p in self.parts.values())

    def per_second(self, card: Card) -> float:
        return self.sequences / self.seconds(card)

    def flops(self) -> float:
        return sum(p.flops for p in self.parts.values())

    def report(self, card: Card) -> dict:
        return {
            "per_second": self.per_second(card),
            "step_ms": 1e3 * self.seconds(card),
            "parts_ms": {k: round(1e3 * p.seconds(card), 4) for k, p in self.parts.items()},
            "gflop": self.flops() / 1e9,
            "gbytes": sum(p.bytes for p in self.parts.values()) / 1e9,
        }


def _windows(s: Sizes, last_only: bool) -> list[tuple[int, int, int]]:
    """Per block, (input, conv1 output, block output) positions, as the backbone computes them."""
    length = s.seq_len - 1 if not last_only else s.seq_len
    if not last_only:
        return [(length, length, length)] * len(s.dilations)
    from conure_dist.model.backbone import NextItNet

    with torch.device("meta"):
        net = NextItNet(2, 8, s.kernel_size, list(s.dilations))
    return net.last_position_windows(length)


def count_backbone(s: Sizes, batch: int, last_only: bool, backward: bool = True) -> Part:
    """Conv products (each conv one GEMM of [positions, k*C] x [k*C, C]); forward, and backward's
    two products per conv. Element-wise passes per block over [B, positions, C] activations:
    norm, ReLU, the k shifted copies, the GEMM's output and the residual, twice (a pass reads and
    writes about 2 bytes per byte of activations); backward about twice forward's."""
    c, k = s.channels, s.kernel_size
    part = Part()
    mult = 3 if backward else 1
    for _inp, mid, out in _windows(s, last_only):
        for positions in (mid, out):
            part.flops += mult * 2 * batch * positions * k * c * c
            passes = 2 * (3 + k)  # norm (read+write), ReLU, k copies, product output
            part.bytes += mult * passes * batch * positions * c * s.act_bytes
        part.kernels += mult * 8
    return part


def count_softmax(s: Sizes) -> Part:
    """T1's sampled softmax over the shared negatives: four products of [N, C] x [C, S] (forward
    logits; backward recomputes them and forms d hidden and d weights). Fused: the operands once
    per kernel plus the backward's partial gradients (deterministic: d hidden per pair of tiles
    read and written; the weight gradient stays in cache); chunked: each [N, chunk] block of logits
    written by the product and passed over by the element-wise work: 8 passes forward (the hit
    mask, the cast, bias, mask, log-sum-exp's max, shift, exp, sum) and 10 backward (the product
    again, mask, bias, shift, exp, scale, cast, sums), each reading and writing the block."""
    n, neg, c, b = s.num_rows, s.negatives, s.channels, s.act_bytes
    part = Part(flops=4 * 2 * n * neg * c, exps=2 * n * neg)
    operands = (n + neg) * c * b
    if s.softmax == "fused":
        pairs = math.ceil(n / s.tile) * math.ceil(neg / s.tile)
        partial = pairs * s.tile * c * 4 * 2 if s.deterministic else 2 * (n + neg) * c * 4
        part.bytes = 4 * operands + partial + (n + neg) * c * 4
        part.kernels = 6
    else:
        blocks = math.ceil(neg / s.chunk)
        part.bytes = 4 * operands + (8 + 10) * 2 * n * neg * 4
        part.kernels = blocks * 14
    return part


def count_tables(s: Sizes) -> Part:
    """The item tables' gradients: the gathers of negatives' and targets' rows (and their casts),
    and each gather's backward, a freshly zeroed dense [V, C] fp32 gradient written and the
    gathered rows scattered into it (embedding, softmax weight; biases alike). The fused path
    writes the negatives' rows into the table's gradient itself: one dense gradient pass fewer."""
    v, c, neg, n = s.items, s.channels, s.negatives, s.num_rows
    passes = 2 if s.softmax == "fused" else 3  # zero, scatter-add's read and write
    dense = passes * (2 * v * c + v) * 4
    gathers = 2 * (neg + n) * c * 4
    return Part(bytes=dense + gathers, kernels=12)


def count_l2(s: Sizes, params: int) -> Part:
    """The L2 penalty in the loss over ``params`` values: forward (square, sum) and backward (the
    gradient written and added): 5 passes of 4 bytes. Folded into Adam: nothing."""
    return Part() if s.l2_folded else Part(bytes=5 * params * 4, kernels=6)


def count_adam(params: int) -> Part:
    """Fused Adam: each value's parameter, moments and gradient read, parameter and moments written."""
    return Part(bytes=7 * params * 4, kernels=4)


def backbone_params(s: Sizes) -> int:
    c = s.channels
    return len(s.dilations) * (2 * (s.kernel_size * c * c + c) + 4 * c)


def count_t1_step(s: Sizes) -> StepCount:
    tables = 2 * s.items * s.channels + s.items
    params = tables + backbone_params(s)
    step = StepCount(sequences=s.batch)
    step.parts["backbone"] = count_backbone(s, s.batch, last_only=False)
    step.parts["softmax"] = count_softmax(s)
    step.parts["tables"] = count_tables(s)
    step.parts["l2"] = count_l2(s, params)
    step.parts["adam"] = count_adam(params)
    return step


def count_later_step(s: Sizes) -> StepCount:
    """A later (item) task's step: the backbone at the last position's receptive field under the
    masked view (each conv's effective weight formed, a pass over it), BPR's two gathered rows,
    Adam over the convs and the task's head."""
    convs = len(s.dilations) * 2 * s.kernel_size * s.channels**2
    head = s.later_items * (s.channels + 1)
    step = StepCount(sequences=s.later_batch)
    step.parts["backbone"] = count_backbone(s, s.later_batch, last_only=True)
    step.parts["masked_view"] = Part(bytes=3 * 2 * convs * 4, kernels=3 * 2 * len(s.dilations))
    step.parts["head"] = Part(flops=3 * 2 * 2 * s.later_batch * s.channels, bytes=3 * head * 4, kernels=10)
    step.parts["l2"] = count_l2(s, convs + head)
    step.parts["adam"] = count_adam(convs + head)
    return step


def count_eval(s: Sizes, fused: bool = False) -> StepCount:
    """Exact evaluation of ``eval_users`` users over all items: the backbone forward at the last
    position, and the [users, items] scores: fused (the rank kernel: the table read per block of
    users, no scores in memory) or materialized (fp32 scores written, then ranked: 3 passes)."""
    u, v, c = s.eval_users, s.later_items, s.channels
    step = StepCount(sequences=u)
    step.parts["backbone"] = count_backbone(s, u, last_only=True, backward=False)
    scores = Part(flops=2 * u * v * c, kernels=3)
    scores.bytes = v * c * s.act_bytes * math.ceil(u / 1024) if fused else 4 * u * v * 4
    step.parts["scores"] = scores
    return step


def calibrate_cpu(channels: int = 64) -> Card:
    """The machine's own rates, measured (best of repeats): fp32 GEMM FLOP/s at the backbone's
    shape ([8192, 3 x channels] x [3 x channels, channels]: small products run far below a large
    GEMM's rate), an element-wise op's streaming bandwidth and exponentials per second."""

    def best(fn, repeats: int = 5) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    a, b = torch.randn(8192, 3 * channels), torch.randn(3 * channels, channels)
    flops = 2 * a.shape[0] * a.shape[1] * b.shape[1] / best(lambda: a @ b)
    src, other, dst = torch.randn(16 * 2**20), torch.randn(16 * 2**20), torch.empty(16 * 2**20)
    # An element-wise op's streaming rate (two reads, one write), as the steps' passes run.
    bandwidth = 3 * src.numel() * 4 / best(lambda: torch.add(src, other, out=dst))
    exp_rate = src.numel() / best(lambda: torch.exp(src, out=dst))
    return Card(
        f"CPU ({torch.get_num_threads()} threads), calibrated",
        flops,
        bandwidth,
        exp_rate,
        launch_s=20e-6,
        matmul_efficiency=1.0,
        bandwidth_efficiency=1.0,
        note="fp32 GEMM at the backbone's shape, add and exp over 64 MB measured here; 20 us per operator (assumed)",
    )


CPU_CHECK = Sizes(
    batch=16,
    seq_len=100,
    channels=64,
    items=20_000,
    dilations=(1, 4, 1, 4),
    later_batch=256,
    later_items=5_000,
    act_bytes=4,
    softmax="chunked",
    l2_folded=False,
)
"""Sizes of the CPU check: small enough to time in seconds on 2 cores."""


def time_cpu_steps(s: Sizes, steps: int = 3) -> dict[str, float]:
    """Seconds per T1 and later-task step of the real model and engine on CPU (fp32, chunked
    softmax, Adam, L2 in the loss), the best of ``steps`` after one warm-up (as the calibration
    takes its best: on a shared machine the other figures measure the neighbours), and the T1
    rows scored."""
    from conure_dist.continual.ownership import TaskOwnership
    from conure_dist.continual.views import MaskedModel
    from conure_dist.dist import DistInfo
    from conure_dist.model import ConureModel, TaskSpec
    from conure_dist.train.engine import TorchEngine
    from conure_dist.train.phase import phase_parameters

    cpu = DistInfo(0, 1, 0, torch.device("cpu"), None)
    torch.manual_seed(0)
    tasks = [TaskSpec("t1", "sequence", s.items), TaskSpec("later", "item", s.later_items)]
    model = ConureModel(s.items, tasks, s.channels, s.kernel_size, list(s.dilations))
    names = model.prunable_names()
    masked = MaskedModel(model, TaskOwnership.empty({n: p.shape for n, p in model.named_parameters() if n in names}))
    g = torch.Generator().manual_seed(0)
    out = {}
    for task, task_index, batch in (("t1", 1, s.batch), ("later", 2, s.later_batch)):
        masked.set_view("train", task_index)
        engine = TorchEngine(masked, phase_parameters(model, task, task == "t1"), 1e-3, 0.02, cpu, "fp32")
        seq = torch.randint(1, s.items, (batch, s.seq_len), generator=g)
        if task == "t1":
            inputs = (seq, task, None, torch.randperm(s.items - 1, generator=g)[: s.negatives] + 1)
        else:
            target = torch.randint(0, s.later_items, (batch,), generator=g)
            inputs = (seq, task, target, torch.randint(0, s.later_items, (batch,), generator=g))
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            engine.train_step([inputs])
            times.append(time.perf_counter() - start)
        out[task] = min(times[1:])
        if task == "t1":
            out["t1_rows"] = int(model.example_count(seq, task))
    return out


def check_cpu(s: Sizes = CPU_CHECK, steps: int = 3) -> dict:
    """The model's CPU predictions against timed CPU steps at ``s``."""
    card = calibrate_cpu(s.channels)
    measured = time_cpu_steps(s, steps)
    s = replace(s, rows=measured["t1_rows"])
    t1, later = count_t1_step(s), count_later_step(s)
    return {
        "card": asdict(card),
        "sizes": asdict(s),
        "t1": {"measured_s": measured["t1"], **t1.report(card), "ratio": measured["t1"] / t1.seconds(card)},
        "later": {
            "measured_s": measured["later"],
            **later.report(card),
            "ratio": measured["later"] / later.seconds(card),
        },
    }


def predict(s: Sizes, card: Card) -> dict[str, float]:
    """The targets' figures that ``card`` allows at ``s``: T1 and later-task sequences/s,
    evaluation users/s (fused ranking and materialized fp32 scores)."""
    return {
        "t1_seq_per_s": count_t1_step(s).per_second(card),
        "later_seq_per_s": count_later_step(s).per_second(card),
        "eval_users_per_s": count_eval(s, fused=False).per_second(card),
        "eval_users_per_s_fused": count_eval(s, fused=True).per_second(card),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", action="append", choices=sorted(CARDS), help="repeatable (default: all)")
    parser.add_argument("--batch", type=int, default=Sizes.batch)
    parser.add_argument("--items", type=int, default=Sizes.items)
    parser.add_argument("--channels", type=int, default=Sizes.channels)
    parser.add_argument("--seq-len", type=int, default=Sizes.seq_len)
    parser.add_argument("--deterministic", action="store_true", help="the fused backward's partials, not atomics")
    parser.add_argument("--check-cpu", action="store_true", help="time CPU steps against the model's prediction")
    parser.add_argument("--json")
    args = parser.parse_args()
    s = Sizes(
        batch=args.batch,
        items=args.items,
        later_items=args.items,
        channels=args.channels,
        seq_len=args.seq_len,
        deterministic=args.deterministic,
    )
    report: dict = {"sizes": asdict(s), "cards": {}}
    for name in args.card or sorted(CARDS):
        card = CARDS[name]
        report["cards"][name] = {
            "card": asdict(card),
            "t1": count_t1_step(s).report(card),
            "later": count_later_step(s).report(card),
            "eval_materialized": count_eval(s).report(card),
            "eval_fused": count_eval(s, fused=True).report(card),
        }
    if args.check_cpu:
        from conure_dist.provenance import environment

        report["cpu_check"] = check_cpu()
        report["environment"] = environment(torch.device("cpu"))
    text = json.dumps(report, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
