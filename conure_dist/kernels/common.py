"""What the Triton kernels share: dtype casts that the interpreter gets right, and launch sizes.

Imported only where a Triton kernel runs (``conure_dist.kernels`` imports it lazily), so the
package works without Triton. Kernels are built when this module is first imported: with
``TRITON_INTERPRET=1`` set then, they run on CPU tensors in Triton's interpreter (the tests).

The interpreter (Triton 3.x) computes a ``tl.dot`` of bfloat16 operands wrongly and truncates
where a GPU rounds to nearest even when it narrows fp32 to bfloat16. Under the interpreter the
kernels therefore round to bfloat16 by bit arithmetic and multiply in fp32: the products of
bfloat16 values are exact in fp32, so this is the math of a GPU's bf16 matrix product with fp32
accumulation, summed in another order.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

try:
    from triton import knobs

    INTERPRETED: bool = bool(knobs.runtime.interpret)
    """Whether this process built the kernels for Triton's interpreter (``TRITON_INTERPRET=1``)."""
except ImportError:  # Triton before 3.4 reads the variable itself
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def cast_for_dot(x, DOT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """``x`` narrowed to the matrix products' dtype (round to nearest even). Under the
    interpreter the value is kept in fp32 (see the module's docstring)."""
    if INTERPRET:
        if DOT_DTYPE == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            y = bits.to(tl.float32, bitcast=True)
        else:
            y = x.to(DOT_DTYPE).to(tl.float32)
    else:
        y = x.to(DOT_DTYPE)
    return y


@triton.jit
def load_rows(h_ptr, tgt_ptr, rows, N, C, BLOCK_C: tl.constexpr, DOT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """A block of hidden rows [rows, channels] in the product dtype, and the rows' targets."""
    ch = tl.arange(0, BLOCK_C)
    h = tl.load(h_ptr + rows[:, None] * C + ch[None, :], mask=(rows[:, None] < N) & (ch[None, :] < C), other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=rows < N, other=-1)
    return cast_for_dot(h, DOT_DTYPE, INTERPRET), tgt


@triton.jit
def round_to(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 ``x`` rounded to ``DTYPE`` (to nearest even), as fp32: what an output in ``DTYPE`` holds."""
    return cast_for_dot(x, DTYPE, INTERPRET).to(tl.float32)


@dataclass(frozen=True)
class Tiles:
    """Rows and columns of one program's tile, and its launch options (GPU only); ``min_arch``:
    the oldest compute capability whose registers hold it without spilling (Hopper's warp-group
    products keep accumulators that Ampere's spill)."""

    rows: int
    cols: int
    num_warps: int = 4
    num_stages: int = 2
    min_arch: int = 80


INTERPRETER_TILES = Tiles(16, 16, 1, 1)
"""Small tiles in the interpreter: the tests' odd sizes then span several tiles, the last partial."""


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    if dtype not in TL_DTYPES:
        raise ValueError(f"the Triton kernels compute in float32, bfloat16 or float16, not {dtype}")
    return TL_DTYPES[dtype]


def input_precision(dtype: torch.dtype) -> str:
    """fp32 products as torch computes them: in full precision unless TF32 is allowed for
    matmuls (``torch.backends.cuda.matmul.allow_tf32``). Other dtypes ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def block_channels(channels: int) -> int:
    """The channel axis as one block (the rank kernel's rows in registers): a power of two >= 16."""
    return max(16, triton.next_power_of_2(channels))


def channel_chunk(dtype: torch.dtype, channels: int, backward: bool = False) -> int:
    """Channels per product step: each pipeline stage holds (rows + columns) x chunk operands,
    64 channels in 16 bits, 32 in fp32 and in the softmax's backward (whose registers also hold
    the [rows, cols] softmax tile), 16 in the interpreter (so that the tests cover several)."""
    full = block_channels(channels)
    return min(full, 16 if INTERPRETED else 64 if dtype != torch.float32 and not backward else 32)


SHARED_BYTES = {90: 232448, 80: 166912, 89: 101376, 86: 101376}
"""The most shared memory one block may use, by compute capability (227 KB on sm_90, 163 KB on
sm_80): the opt-in limit that Triton's launches request."""

SM_COUNTS = {90: 132, 80: 108}
"""Multiprocessors of the cards that ``aot`` compiles for (H100 SXM, A100): their grids."""

_TARGET: dict[str, int] = {}
"""Set by ``launched_by``: the compute capability and multiprocessors to size launches for,
where no GPU is present (``aot``)."""


def target_arch(device: torch.device) -> int:
    """The compute capability (e.g. 90) whose limits size a launch on ``device``."""
    if "arch" in _TARGET:
        return _TARGET["arch"]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


def shared_limit(device: torch.device) -> int:
    """Shared memory per block on ``device`` (or the target that ``aot`` compiles for)."""
    if "arch" not in _TARGET and device.type == "cuda":
        optin = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)
        if optin:  # torch builds before 2.4 do not report it: the architecture's table then
            return int(optin)
    return SHARED_BYTES.get(target_arch(device), min(SHARED_BYTES.values()))


def shared_estimate(tiles: Tiles, chunk: int, dtype: torch.dtype, staged_tile: bool = False) -> int:
    """Shared memory a product loop needs: ``num_stages`` buffers of (rows + cols) x chunk
    operands, plus (``staged_tile``) the [rows, cols] tile that feeds the backward products."""
    size = torch.finfo(dtype).bits // 8
    tile = tiles.rows * tiles.cols * size if staged_tile else 0
    return tiles.num_stages * (tiles.rows + tiles.cols) * chunk * size + tile


def fitting_tiles(
    candidates: tuple[Tiles, ...], chunk: int, dtype: torch.dtype, device: torch.device, staged_tile: bool = False
) -> Tiles:
    """The first of ``candidates`` (best first) made for ``device``'s compute capability whose
    pipeline stages fit its shared memory; the last otherwise."""
    arch, limit = target_arch(device), shared_limit(device)
    for tiles in candidates:
        if tiles.min_arch <= arch and shared_estimate(tiles, chunk, dtype, staged_tile) <= limit:
            return tiles
    return candidates[-1]


def num_splits(num_tiles: int, other_programs: int, device: torch.device) -> int:
    """How many programs share one row block's (or column block's) tiles, so that the grid
    fills the GPU: about four programs per multiprocessor. Two in the interpreter, so that the
    tests exercise the combination of partial results."""
    target = 4 * multiprocessors(device)
    if target == 0:
        return min(2, max(1, num_tiles))
    return max(1, min(num_tiles, math.ceil(target / max(1, other_programs))))


def multiprocessors(device: torch.device) -> int:
    """Multiprocessors to fill on ``device``; 0 in the interpreter (its grids stay tiny)."""
    if "sms" in _TARGET:
        return _TARGET["sms"]
    if INTERPRETED or device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_ranges(num_tiles: int, splits: int) -> tuple[int, int]:
    """(tiles per split, number of splits actually used) for ``splits`` requested."""
    per_split = math.ceil(num_tiles / max(1, splits)) if num_tiles else 1
    return per_split, max(1, math.ceil(num_tiles / per_split))


def check_offsets(**tensors: torch.Tensor) -> None:
    """The kernels address elements with 32-bit offsets: a clear error for a larger tensor."""
    for name, tensor in tensors.items():
        if tensor.numel() >= 2**31:
            raise ValueError(f"{name} has {tensor.numel()} elements; the Triton kernels address at most 2**31 - 1")


def launch_options(tiles: Tiles) -> dict[str, int]:
    """Triton launch keywords: warps and pipeline stages on a GPU (fused multiply-adds allowed,
    explicitly: Triton warns where that is left to its default), none in the interpreter."""
    if INTERPRETED:
        return {}
    return {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages, "enable_fp_fusion": True}


Launcher = Callable[[Any, tuple, tuple, dict], None]
"""Launches ``kernel`` on ``grid`` with positional ``args`` and keyword ``kwargs``."""
_LAUNCHERS: list[Launcher] = []


def launch(kernel: Any, grid: tuple, args: tuple, kwargs: dict) -> None:
    """``kernel[grid](*args, **kwargs)``, or the launcher of the innermost ``launched_by``."""
    if _LAUNCHERS:
        _LAUNCHERS[-1](kernel, grid, args, kwargs)
    else:
        kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def launched_by(launcher: Launcher, arch: int | None = None, sms: int | None = None) -> Iterator[None]:
    """The wrappers' launches go to ``launcher`` (``aot`` compiles exactly what they launch),
    sized for compute capability ``arch`` with ``sms`` multiprocessors where given."""
    saved = dict(_TARGET)
    _LAUNCHERS.append(launcher)
    if arch is not None:
        _TARGET["arch"] = arch
    if sms is not None:
        _TARGET["sms"] = sms
    try:
        yield
    finally:
        _LAUNCHERS.pop()
        _TARGET.clear()
        _TARGET.update(saved)
