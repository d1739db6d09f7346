"""``torch.compile`` where it pays: the backbone and a few hot element-wise functions.

On a GPU the T1 step, a later task's step and exact evaluation spend most of their time in
element-wise passes over large tensors (the streamed softmax's [rows, chunk] logits, the
[users, items] scores of evaluation, the activations of 16 conv layers). Compiling fuses those
passes into single kernels; the matrix products stay cuBLAS's. The math is the same functions
run eagerly on CPU and in the tests.

Compilation is a property of each model: ``compile_model`` compiles its backbone and marks it
(``model.compiled``) and its streamed-softmax heads, and the ``@hot`` functions run compiled only
for a call that asks (``compiled=True``, passed on from that mark). So two models in one process
(an experiment's methods, a benchmark's plain and fast paths) never change each other's code
path. A run compiles from ``dist.compile`` (``resolve``). Functions marked ``@hot`` are small and
compiled on first use with dynamic shapes, so the varying row counts of T1 (padding) do not
recompile them.
The backbone is compiled with static shapes: each input shape (a phase's batch, its last smaller
batch, evaluation) builds its graph once, in seconds, where one dynamic-shape graph of the
16-layer stack took minutes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)
RECOMPILE_LIMIT = 32
"""Graphs per compiled function: the backbone sees full sequences (T1), last-position windows of
two lengths, training and inference views, and a smaller last batch of each."""


def resolve(setting: str, device: torch.device) -> bool:
    """``dist.compile``: ``auto`` compiles on CUDA GPUs that Triton supports (compute capability
    7.0 or later); on CPU the compile time outweighs what it saves."""
    if setting != "auto":
        return setting == "always"
    if device.type != "cuda":
        return False
    from torch.utils._triton import has_triton

    if has_triton() and torch.cuda.get_device_capability(device) >= (7, 0):
        return True
    log.warning("dist.compile=auto: no Triton for %s, running eagerly", torch.cuda.get_device_name(device))
    return False


def hot(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with one more keyword, ``compiled``: run compiled (built on first such call) when
    true, eagerly otherwise."""
    graphs: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def wrapper(*args: Any, compiled: bool = False, **kwargs: Any) -> Any:
        if not compiled:
            return fn(*args, **kwargs)
        if not graphs:
            graphs.append(torch.compile(fn, dynamic=True))
        return graphs[0](*args, **kwargs)

    return wrapper


COMPILED_SOFTMAX_CHUNK = 32768
"""Negatives per block of T1's streamed softmax when its element-wise work is one fused kernel:
larger blocks mean fewer, fuller matrix products. At the paper's T1 batch of 256 x 100 positions
a block's logits (and, in backward, its softmax) take 1.7 GB each in bf16, 3.4 GB in fp32."""


def compile_model(model: nn.Module) -> None:
    """Compile a ``ConureModel``'s backbone in place (parameter names and checkpoints are
    unchanged), mark the model and its streamed-softmax heads as compiled (their ``@hot``
    functions then run compiled) and widen the heads' blocks.

    The ownership view swaps the conv kernels in on every forward (``functional_call``); the
    compiled graph takes them as inputs, so the swap does not recompile. Graphs of earlier models
    (an experiment runs many in one process) are dropped first, so they do not count towards the
    recompile limit, past which new shapes would silently run eagerly.
    """
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    model.backbone.compile(dynamic=False)
    model.compiled = True
    for head in model.heads.values():
        if getattr(head, "chunk", None):
            head.chunk = max(head.chunk, COMPILED_SOFTMAX_CHUNK)
            head.compiled = True


def compile_if(model: nn.Module, setting: str, device: torch.device) -> bool:
    """Compile ``model`` where ``dist.compile`` (``setting``) says so on ``device``; whether it did."""
    on = resolve(setting, device)
    if on:
        compile_model(model)
    return on
