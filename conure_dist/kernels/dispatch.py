"""Where the fused kernels run: the ``kernel`` settings, checked without importing Triton.

* ``auto`` (default): the Triton kernels for CUDA tensors whose products run in 16 bits (bf16
  or fp16: autocast's dtype, or the inputs') on a GPU with bf16 tensor cores (compute
  capability 8.0 or later), when ``triton`` is installed; today's torch path otherwise. CPU
  tensors never run in Triton's interpreter under ``auto``, so CPU runs keep their numbers, and
  fp32 products (full precision, as torch computes them) stay with cuBLAS: Triton would run
  them on the GPU's FMA units, not measured to pay yet. Before its first use in a process,
  each kernel runs a small probe against the torch path (``self_check.kernel_works``): a
  kernel that fails to compile, to launch or to agree logs a warning and stays unused.
* ``chunked``: always the torch path (the chunked softmax, materialized scores).
* ``triton``: always the kernels; CPU tensors need ``TRITON_INTERPRET=1`` set before the
  kernels are first used (the tests: the interpreter is slow, for small shapes only).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from conure_dist.errors import UserError

KERNELS = ("auto", "chunked", "triton")
AUTO_DTYPES = (torch.bfloat16, torch.float16)
"""Product dtypes for which ``auto`` picks the kernels (tensor-core products)."""


def check_kernel(kernel: str) -> str:
    """``kernel`` if it is a known setting, else a ValueError naming the choices."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got '{kernel}'")
    return kernel


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _gpu_supported(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)


def product_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the matrix products run in: autocast's where autocast is on, else the inputs'
    (as the chunked path and the eager heads compute them)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def setting_picks_triton(kernel: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the ``kernel`` setting picks the Triton kernels for products in ``dtype`` (see
    ``product_dtype``) on ``device``, before ``auto``'s probe (``conure_dist.kernels.use_triton``);
    a clear error where ``triton`` is forced but cannot run."""
    if check_kernel(kernel) == "chunked":
        return False
    if kernel == "auto":
        return (
            device.type == "cuda"
            and dtype in AUTO_DTYPES
            and triton_installed()
            and _gpu_supported(device.index if device.index is not None else torch.cuda.current_device())
        )
    if not triton_installed():
        raise RuntimeError("kernel='triton' needs the triton package (pip install triton; Linux x86-64)")
    if device.type != "cuda":
        from conure_dist.kernels.common import INTERPRETED

        if not INTERPRETED:
            raise UserError(
                f"kernel='triton' on {device.type} tensors runs in Triton's interpreter: set "
                "TRITON_INTERPRET=1 before the kernels are first used"
            )
    return True
