"""Compile the kernels for a GPU without one: do they build, and do their tiles fit in registers?

Triton compiles to a GPU binary with the ``ptxas`` its wheel ships, so a CPU-only machine (CI)
can check that every kernel builds for sm_90 (H100/H200) at its default tiles and read each
binary's registers and spill stack (``cuobjdump``). A tile that spills runs slowly; one whose
shared memory exceeds the GPU's would not launch.

    python -m conure_dist.kernels.aot            # bf16 and fp32, the default tiles, sm_90
    python -m conure_dist.kernels.aot --dtype bfloat16 --arch 80

Needs the kernels built for a GPU: not under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from conure_dist.kernels import sampled_softmax, topk
from conure_dist.kernels.common import (
    INTERPRETED,
    Tiles,
    block_channels,
    channel_chunk,
    input_precision,
    launch_options,
    tl_dtype,
)

_SCALARS = {"N": "i32", "S": "i32", "V": "i32", "C": "i32", "num_tiles": "i32", "tiles_per_split": "i32"}


def _signature(kernel, pointers: dict[str, str], constants: dict) -> dict[str, str]:
    """Triton's signature of ``kernel``: pointer types by name, i32 scalars, constexprs."""
    names = kernel.arg_names
    return {n: pointers.get(n) or _SCALARS.get(n) or ("constexpr" if n in constants else "*fp32") for n in names}


def _specs(dtype: torch.dtype, channels: int) -> list[tuple[str, object, dict[str, str], dict, Tiles]]:
    """(name, kernel, pointer types, constexprs, tiles) of every kernel at its default tiles."""
    data = "*bf16" if dtype == torch.bfloat16 else "*fp16" if dtype == torch.float16 else "*fp32"
    common = {"DOT_DTYPE": tl_dtype(dtype), "PRECISION": input_precision(dtype), "INTERPRET": False}
    ptrs = {"h_ptr": data, "w_ptr": data, "neg_ptr": "*i64", "tgt_ptr": "*i64", "count_ptr": "*i32"}
    group = "fp32" if dtype == torch.float32 else "16-bit"
    specs = []
    for kind, kernel in (
        ("forward", sampled_softmax._forward_kernel),
        ("hidden", sampled_softmax._hidden_grad_kernel),
        ("weight", sampled_softmax._weight_grad_kernel),
    ):
        t = sampled_softmax.GPU_TILES[group][kind]
        consts = {**common, "BLOCK_N": t.rows, "BLOCK_S": t.cols, "BLOCK_C": block_channels(channels)}
        specs.append((f"softmax_{kind}", kernel, ptrs, consts, t))
    t, chunk = topk.GPU_TILES[group], channel_chunk(dtype, channels)
    consts = {
        **common,
        "BLOCK_N": t.rows,
        "BLOCK_V": t.cols,
        "BLOCK_K": chunk,
        "NUM_K": triton.cdiv(channels, chunk),
        "SCORE_DTYPE": tl_dtype(torch.float32),
        "PADDING_FIRST": True,
    }
    specs.append(("rank", topk._rank_kernel, ptrs, consts, t))
    return specs


def _resources(cubin: bytes) -> dict[str, int]:
    """Registers and spill stack (bytes per thread) of a compiled kernel, from ``cuobjdump``."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    assert found, out
    return {"registers": int(found[1]), "spill_stack_bytes": int(found[2])}


def compile_kernels(dtype: torch.dtype = torch.bfloat16, channels: int = 256, arch: int = 90) -> dict[str, dict]:
    """Per kernel: its tiles, shared memory and registers when compiled for ``sm_<arch>``."""
    if INTERPRETED:
        raise RuntimeError("the kernels were built for Triton's interpreter: unset TRITON_INTERPRET")
    target, out = GPUTarget("cuda", arch, 32), {}
    for name, kernel, ptrs, consts, t in _specs(dtype, channels):
        by_index = {(kernel.arg_names.index(k),): v for k, v in consts.items()}
        compiled = triton.compile(
            ASTSource(kernel, _signature(kernel, ptrs, consts), by_index), target=target, options=launch_options(t)
        )
        out[name] = {
            "tiles": [t.rows, t.cols, t.num_warps, t.num_stages],
            "shared_bytes": compiled.metadata.shared,
            **_resources(compiled.asm["cubin"]),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    parser.add_argument(
        "--dtype",
        action="append",
        choices=["bfloat16", "float16", "float32"],
        help="products' dtype (repeatable; default bfloat16 and float32)",
    )
    args = parser.parse_args()
    report = {
        d: compile_kernels(getattr(torch, d), args.channels, args.arch) for d in args.dtype or ["bfloat16", "float32"]
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
