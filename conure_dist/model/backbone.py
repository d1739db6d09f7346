"""NextItNet backbone: item embedding followed by residual blocks of causal dilated convolutions.

Pure architecture: no ranks, masks, paths or config objects beyond plain arguments.
Shapes: B batch, L sequence length, C channels, K kernel width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalConv1d(nn.Module):
    """Causal dilated 1-D convolution over [B, L, C] computed as a single GEMM.

    Output position j reads inputs j - (K-1-i)*d for i in 0..K-1, so never a future position.
    The kernel is stored as [K, C_in, C_out]: the K shifted copies of the input are concatenated
    along channels and multiplied by the kernel viewed as [K*C_in, C_out].
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.weight = nn.Parameter(torch.empty(kernel_size, in_channels, out_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x_BLC: torch.Tensor, out_len: int | None = None) -> torch.Tensor:
        """Outputs at the last ``out_len`` positions of ``x`` (default: all of them).

        ``x`` holds the last positions of the sequence; where it holds fewer than the outputs
        read, it must start at position 0, and the missing left context is the zero padding.
        """
        k, d = self.kernel_size, self.dilation
        length = x_BLC.shape[1] if out_len is None else out_len
        span = length + (k - 1) * d
        if x_BLC.shape[1] >= span:
            window = x_BLC[:, x_BLC.shape[1] - span :]
        else:
            window = F.pad(x_BLC, (0, 0, span - x_BLC.shape[1], 0))
        shifted = torch.cat([window[:, i * d : i * d + length] for i in range(k)], dim=-1)
        return shifted @ self.weight.reshape(-1, self.weight.shape[-1]) + self.bias


class ResidualBlock(nn.Module):
    """Pre-norm NextItNet block: LN -> ReLU -> conv(d) -> LN -> ReLU -> conv(2d), plus the input."""

    def __init__(self, channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.conv1 = CausalConv1d(channels, channels, kernel_size, dilation)
        self.norm2 = nn.LayerNorm(channels)
        self.conv2 = CausalConv1d(channels, channels, kernel_size, 2 * dilation)

    def forward(self, x_BLC: torch.Tensor, out_lens: tuple[int, int] | None = None) -> torch.Tensor:
        """With ``out_lens`` = (n1, n2): conv1 at the last n1 positions, the block output at the
        last n2 (see ``NextItNet.forward(last_only=True)``)."""
        n1, n2 = out_lens or (None, None)
        h = self.conv1(F.relu(self.norm1(x_BLC)), n1)
        h = self.conv2(F.relu(self.norm2(h)), n2)
        return (x_BLC if n2 is None else x_BLC[:, x_BLC.shape[1] - n2 :]) + h

    def receptive_lens(self, out_len: int, length: int) -> tuple[int, int, int]:
        """(input, conv1, output) window lengths for ``out_len`` outputs of a length-``length`` sequence."""
        mid = min(length, out_len + (self.conv2.kernel_size - 1) * self.conv2.dilation)
        return min(length, mid + (self.conv1.kernel_size - 1) * self.conv1.dilation), mid, out_len


class NextItNet(nn.Module):
    """Item sequence [B, L] (0 = padding) -> hidden states [B, L, C]."""

    def __init__(
        self,
        num_items: int,
        channels: int,
        kernel_size: int,
        block_dilations: list[int],
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_items, channels, padding_idx=0)
        self.blocks = nn.ModuleList(ResidualBlock(channels, kernel_size, d) for d in block_dilations)
        self.reset_parameters(init_std)

    def reset_parameters(self, init_std: float) -> None:
        """A fresh initialisation of every parameter (embedding, layer norms, convs)."""
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        nn.init.normal_(self.embedding.weight, std=init_std)
        with torch.no_grad():
            self.embedding.weight[0].zero_()
        for block in self.blocks:
            for conv in (block.conv1, block.conv2):
                _init_conv(conv)

    def append_blocks(self, dilations: list[int], generator: torch.Generator) -> list[int]:
        """Append residual blocks (indices returned) that start as the identity: conv1 drawn as at
        initialisation from ``generator``, conv2 zero, so the deeper stack computes exactly what
        the shallower one did until the new blocks train."""
        channels, kernel_size = self.embedding.embedding_dim, self.blocks[0].conv1.kernel_size
        device = self.embedding.weight.device
        first = len(self.blocks)
        for d in dilations:
            block = ResidualBlock(channels, kernel_size, d)
            _init_conv(block.conv1, generator)
            nn.init.zeros_(block.conv2.weight)
            nn.init.zeros_(block.conv2.bias)
            self.blocks.append(block.to(device))
        return list(range(first, len(self.blocks)))

    def forward(self, seq_BL: torch.Tensor, last_only: bool = False, depth: int | None = None) -> torch.Tensor:
        """``depth``: run only the first ``depth`` blocks (a task that came before the backbone grew)."""
        blocks = self.blocks if depth is None else self.blocks[:depth]
        if not last_only:
            h = self.embedding(seq_BL)
            for block in blocks:
                h = block(h, None)
            return h
        windows = self.last_position_windows(seq_BL.shape[1], depth)
        h = self.embedding(seq_BL[:, seq_BL.shape[1] - windows[0][0] :])
        for block, (_, mid, out) in zip(blocks, windows, strict=True):
            h = block(h, (mid, out))
        return h[:, -1]

    def last_position_windows(self, length: int, depth: int | None = None) -> list[tuple[int, int, int]]:
        """Per block (of the first ``depth``), the (input, conv1, output) window lengths the last
        position depends on."""
        out, windows = 1, []
        for block in reversed(self.blocks if depth is None else self.blocks[:depth]):
            windows.append(block.receptive_lens(out, length))
            out = windows[-1][0]
        return windows[::-1]

    def conv_weight_names(self, depth: int | None = None) -> list[str]:
        """Names of the conv kernels (of the first ``depth`` blocks): the tensors that Conure
        partitions between tasks."""
        count = len(self.blocks) if depth is None else depth
        return [f"blocks.{i}.{conv}.weight" for i in range(count) for conv in ("conv1", "conv2")]


def _init_conv(conv: CausalConv1d, generator: torch.Generator | None = None) -> None:
    """Normal kernel with variance 1/fan_in, zero bias."""
    fan_in = conv.weight.shape[0] * conv.weight.shape[1]
    with torch.no_grad():
        if generator is None:
            nn.init.normal_(conv.weight, std=(1.0 / fan_in) ** 0.5)
        else:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (1.0 / fan_in) ** 0.5)
    nn.init.zeros_(conv.bias)
