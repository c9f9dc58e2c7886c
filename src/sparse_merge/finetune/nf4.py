"""4-bit NormalFloat (NF4) quantisation, block-wise absmax, as in QLoRA.

``quantize_nf4`` is pure torch, so the quantised path runs and is tested on CPU and on GPUs
alike; it uses the NF4 levels and block-wise absmax scaling of bitsandbytes' ``nf4`` type but
not its fused kernels (``NF4Linear`` dequantises the whole weight each forward). Not
implemented here: QLoRA's double quantisation of the block scales (scales stay in fp32: 32 bits
per 64 weights, 0.5 bit per weight, where double quantisation takes ~0.127, 8/64 + 32/(64 * 256):
~0.37 bit per weight more).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# The 16 NF4 levels: quantiles of N(0, 1) normalised to [-1, 1] with an exact zero (QLoRA, App. E).
NF4_LEVELS = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ]
)  # fmt: skip


@dataclass
class NF4Tensor:
    """A quantised tensor: two 4-bit codes per byte plus one fp32 absmax scale per block."""

    packed: torch.Tensor  # [ceil(n / 2)] uint8
    scales: torch.Tensor  # [n_blocks] float32
    shape: torch.Size
    block_size: int

    @property
    def numel(self) -> int:
        """Number of quantised values."""
        return int(torch.Size(self.shape).numel())

    def nbytes(self) -> int:
        """Storage in bytes (codes + scales)."""
        return self.packed.numel() + 4 * self.scales.numel()


@torch.no_grad()
def quantize_nf4(w: torch.Tensor, block_size: int = 64) -> NF4Tensor:
    """Quantise ``w`` to NF4: per block of ``block_size`` values, divide by the block's absmax and
    round to the nearest NF4 level."""
    flat = w.detach().float().reshape(-1)
    n = flat.numel()
    pad = (-n) % block_size
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)  # [B, bs]
    scales = blocks.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny)  # [B]
    normed = (blocks / scales[:, None]).reshape(-1)[:n]  # [n] in [-1, 1]
    levels = NF4_LEVELS.to(flat.device)
    mids = (levels[1:] + levels[:-1]) / 2  # [15] decision boundaries
    codes = torch.bucketize(normed, mids).to(torch.uint8)  # [n] in 0..15
    if n % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    packed = (codes[0::2] << 4) | codes[1::2]
    return NF4Tensor(packed, scales, w.shape, block_size)


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor ``q`` stands for, with shape ``q.shape``."""
    codes = torch.stack([q.packed >> 4, q.packed & 0xF], 1).reshape(-1)[: q.numel].long()  # [n]
    values = NF4_LEVELS.to(q.packed.device)[codes]
    pad = (-q.numel) % q.block_size
    blocks = torch.nn.functional.pad(values, (0, pad)).view(-1, q.block_size) * q.scales[:, None]
    return blocks.reshape(-1)[: q.numel].view(q.shape).to(dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 and dequantised on the fly."""

    def __init__(self, q: NF4Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.q = q
        self.out_features, self.in_features = q.shape
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )
        self.compute_dtype = dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64) -> NF4Linear:
        """Quantise an ``nn.Linear``."""
        return cls(quantize_nf4(linear.weight, block_size), linear.bias, linear.weight.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The [out, in] weight the layer computes with."""
        return dequantize_nf4(self.q, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Q(W)^T + b``."""
        return nn.functional.linear(x, self.dequantized_weight(), self.bias)
