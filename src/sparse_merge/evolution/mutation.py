"""Gaussian mutation that never destroys sparsity: noise goes only to non-zero weights."""

from __future__ import annotations

import torch

CHUNK = 1 << 22  # elements per chunk, bounds the noise temporaries


@torch.no_grad()
def mutate_(genome: torch.Tensor, std: float, generator: torch.Generator) -> int:
    """Add ``N(0, std^2)`` to every non-zero entry of ``genome`` in place; zeros stay exactly
    zero. Returns the number of entries changed (0 when ``std == 0``: M2N2's default for
    pre-trained parents). The noise is drawn on ``generator``'s device, chunk by chunk."""
    if std <= 0:
        return 0
    changed = 0
    for s in range(0, genome.numel(), CHUNK):
        part = genome[s : s + CHUNK]
        noise = torch.randn(
            part.numel(), generator=generator, device=generator.device, dtype=torch.float32
        ).to(part.device, part.dtype)
        nonzero = part != 0
        part.add_(noise.mul_(std).mul_(nonzero))
        # a non-zero weight that noise sends to exactly 0 would count as pruned; keep it non-zero
        hit = nonzero & (part == 0)
        if hit.any():
            part[hit] = torch.finfo(part.dtype).tiny
        changed += int(nonzero.sum())
    return changed
