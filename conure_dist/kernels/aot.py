"""Compile the kernels for a GPU without one: exactly what the wrappers launch, and does it fit?

The wrappers run on CPU tensors of a T1 step's and an evaluation's sizes while their launches go
to a recorder (``common.launched_by``) sized for the target card (its multiprocessors and shared
memory pick the grids and tiles). Each recorded launch is specialized by Triton's own binder for
that target, as a launch on the card would be (pointer dtypes, 16-byte alignment and
divisibility of every pointer and integer, the constexprs, warps and stages), and compiled with
the ``ptxas`` that Triton's wheel ships. For each kernel the report gives its tiles, shared
memory (which must fit the card's: 227 KB per block on sm_90, 163 KB on sm_80), registers and
spill stores (ptxas's own account).

    python -m conure_dist.kernels.aot                      # bf16, sm_90 (H100/H200)
    python -m conure_dist.kernels.aot --arch 80 --dtype bfloat16 --dtype float32

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
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from conure_dist.kernels.common import INTERPRETED, SHARED_BYTES, SM_COUNTS, launched_by

T1_SIZES = {"rows": 25344, "negatives": 129200, "items": 646000, "users": 4096}
"""A T1 step at TTL's sizes (256 sequences x 99 predicted positions, 20% of 646K items as
negatives) and an evaluation batch of 4,096 users over the full table."""


def _record(dtype: torch.dtype, channels: int, sizes: dict[str, int]) -> list[tuple[str, object, tuple, dict]]:
    """(name, kernel, args, kwargs) of every launch of a T1 step's loss as the head computes it
    (``fused_table_logsumexp``), its backward (deterministic, and with atomics) and one evaluation
    batch's ranks, with products in ``dtype`` (bf16: autocast over fp32 parameters)."""
    from conure_dist.kernels.sampled_softmax import fused_table_logsumexp
    from conure_dist.kernels.topk import fused_target_ranks

    launches: list = []
    names = {"_forward_kernel": "softmax_forward", "_backward_kernel": "softmax_backward", "_rank_kernel": "rank"}

    def recorder(kernel, grid, args, kwargs):
        name = names[kernel.__name__] + ("_atomic" if kwargs.get("ATOMIC") else "")
        launches.append((name, kernel, args, kwargs, grid))

    n, s, v, u = sizes["rows"], sizes["negatives"], sizes["items"], sizes["users"]
    params = torch.float32 if dtype == torch.bfloat16 else dtype
    hidden = torch.zeros(n, channels, dtype=params, requires_grad=True)
    table = torch.zeros(v, channels, dtype=params, requires_grad=True)
    bias = torch.zeros(v, dtype=params, requires_grad=True)
    negatives, target = torch.arange(1, s + 1), torch.ones(n, dtype=torch.int64)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    deterministic = torch.are_deterministic_algorithms_enabled()
    with launched_by(recorder), autocast:
        lse = fused_table_logsumexp(hidden, table, bias, negatives, target)  # as the head calls it
        try:  # the backward as runs launch it (train.deterministic), and with atomics
            for on in (True, False):
                torch.use_deterministic_algorithms(on, warn_only=True)
                lse.sum().backward(retain_graph=True)
        finally:
            torch.use_deterministic_algorithms(deterministic)
        with torch.no_grad():
            fused_target_ranks(hidden[:u].detach(), table.detach(), bias.detach(), target[:u], padding_first=True)
    return launches


def _with_target(arch: int):
    return launched_by(lambda *a: None, arch=arch, sms=SM_COUNTS.get(arch, 132))


def compile_launch(kernel, args: tuple, kwargs: dict, arch: int):
    """``kernel`` compiled for ``sm_<arch>`` as a launch with these arguments would compile it,
    and the arguments that launch specializes as divisible by 16 (aligned pointers, sizes)."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**kwargs, "debug": False, "instrumentation_mode": knobs.compilation.instrumentation_mode}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    divisible = [kernel.arg_names[path[0]] for path, a in attrs.items() if ["tt.divisibility", 16] in a]
    return compiled, divisible


def compile_kernels(
    dtype: torch.dtype = torch.bfloat16, channels: int = 256, arch: int = 90, sizes: dict[str, int] = T1_SIZES
) -> dict[str, dict]:
    """Per kernel that a T1 step and an evaluation batch launch: its tiles, launch signature,
    shared memory (and the card's limit), registers and spills when compiled for ``sm_<arch>``."""
    if INTERPRETED:
        raise RuntimeError("the kernels were built for Triton's interpreter: unset TRITON_INTERPRET")
    with _with_target(arch):
        launches = _record(dtype, channels, sizes)
    out = {}
    for name, kernel, args, kwargs, grid in launches:
        compiled, divisible = compile_launch(kernel, args, kwargs, arch)
        meta = compiled.metadata
        out[name] = {
            "tiles": [
                kwargs.get("BLOCK_N"),
                kwargs.get("BLOCK_S", kwargs.get("BLOCK_V")),
                meta.num_warps,
                meta.num_stages,
            ],
            "channel_chunk": kwargs["BLOCK_K"],
            "grid": list(grid),
            "pointer_types": {k: v for k, v in _signature(kernel, args).items() if v.startswith("*")},
            "divisible_by_16": divisible,
            "shared_bytes": meta.shared,
            "shared_limit_bytes": SHARED_BYTES[arch],
            **_resources(compiled),
        }
    return out


def _signature(kernel, args: tuple) -> dict[str, str]:
    return {
        name: triton.runtime.jit.mangle_type(a) if isinstance(a, torch.Tensor) else type(a).__name__
        for name, a in zip(kernel.arg_names[: len(args)], args, strict=True)
    }


def _resources(compiled) -> dict[str, int]:
    """Registers and spills of a compiled kernel: ptxas's own account (its PTX assembled again
    with ``-v``, as Triton assembles it)."""
    arch = compiled.metadata.target.arch
    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        suffix = "a" if arch == 90 else ""
        cmd = [ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", ptx, "-o", os.path.join(tmp, "k.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert regs and spill, log
    return {"registers": int(regs[1]), "spill_store_bytes": int(spill[1]), "spill_load_bytes": int(spill[2])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    parser.add_argument(
        "--dtype",
        action="append",
        choices=["bfloat16", "float16", "float32"],
        help="products' dtype (repeatable; default bfloat16)",
    )
    args = parser.parse_args()
    report = {
        "arch": f"sm_{args.arch}",
        "channels": args.channels,
        "sizes": T1_SIZES,
        "triton": triton.__version__,
        "kernels": {
            d: compile_kernels(getattr(torch, d), args.channels, args.arch) for d in args.dtype or ["bfloat16"]
        },
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
