"""In-loop pruning without doing the same work twice: the keep-masks of archive members pruned
at a sparsity, one bit per weight, in host memory.

An archive member never changes while it is in the archive, and the pruners that only zero
weights (magnitude, Wanda, random, the score pruners) are deterministic: pruning member ``i`` at
sparsity ``s`` gives the same mask every time. Natural Niches prunes its parents at the
schedule's sparsity every step, so the same (member, sparsity) pairs come back again and again;
the first time the pruned genome's non-zero pattern is packed (``P / 8`` bytes) and remembered,
later times apply it (``masked_fill``), bit for bit what pruning again gives. Pruners that also
change the kept weights (SparseGPT's reconstruction) are not cached.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from sparse_merge.evolution.problem import magnitude_bits
from sparse_merge.merging import kernels
from sparse_merge.merging.task_arithmetic import SAME_SIZE_INT

CHUNK = 1 << 24  # elements packed or unpacked at a time (a multiple of 8)
PIECE = 1 << 20  # elements packed at a time on the CPU (a multiple of 8; its temporaries in cache)


@torch.no_grad()
def pack_nonzero(genome: torch.Tensor) -> torch.Tensor:
    """``genome != 0`` as bits (``numpy.packbits`` order), uint8 [ceil(P / 8)] on the CPU.

    On the CPU the compare runs in NumPy on the floats' bits without their sign (zero exactly
    for +0.0 and -0.0; NaN, infinities and subnormals have others set), a piece at a time: ~4x
    torch's float compare on bfloat16 (0.21-0.24 s against 0.86 s for a 1.5 B genome, a pruned
    parent's cost besides its pruning; ``make bench ARGS=pruning``)."""
    n = genome.numel()
    if genome.device.type == "cpu" and genome.dtype in SAME_SIZE_INT:
        out = np.empty(-(-n // 8), np.uint8)
        for s, part in magnitude_bits(genome, PIECE):
            out[s // 8 : -(-(s + part.size) // 8)] = np.packbits(part != 0)
        return torch.from_numpy(out)
    parts = []
    for s in range(0, n, CHUNK):
        bits = (genome[s : s + CHUNK] != 0).cpu().numpy()
        parts.append(np.packbits(bits))
    return torch.from_numpy(np.concatenate(parts))


@torch.no_grad()
def apply_packed_(genome: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Zero ``genome`` where the packed keep-mask has a 0 bit; returns ``genome``. On the CPU
    in one pass (``kernels.mul_packed_``), elsewhere a chunk of the mask at a time."""
    raw = packed.numpy()
    if kernels.usable(genome):
        return kernels.mul_packed_(genome, raw)
    for s in range(0, genome.numel(), CHUNK):
        e = min(s + CHUNK, genome.numel())
        bits = np.unpackbits(raw[s // 8 : -(-e // 8)], count=e - s).view(np.bool_)
        keep = torch.from_numpy(bits).to(genome.device, non_blocking=True)
        genome[s:e].mul_(keep)  # as ``apply_keep`` zeroes: the same bits as pruning again
    return genome


class MaskCache:
    """Packed keep-masks by (lineage id, sparsity), least recently used out first once they
    take more than ``max_bytes`` (0: the cache is off)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._masks: OrderedDict[tuple[int, float], torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0
        self.nbytes = 0  # bytes held

    def __len__(self) -> int:
        return len(self._masks)

    def has(self, ident: int, sparsity: float) -> bool:
        """Whether the mask of ``ident`` at ``sparsity`` is held."""
        return (int(ident), float(sparsity)) in self._masks

    def prune_(self, genome: torch.Tensor, ident: int, sparsity: float, prune) -> bool:
        """Prune ``genome`` (archive member ``ident``) to ``sparsity``: from the cache when
        it holds that mask, else with ``prune(genome, sparsity)``, remembering the result.
        Returns whether it was a hit."""
        key = (int(ident), float(sparsity))
        packed = self._masks.get(key)
        if packed is not None:
            self._masks.move_to_end(key)
            apply_packed_(genome, packed)
            self.hits += 1
            return True
        prune(genome, sparsity)
        self.misses += 1
        if self.max_bytes > 0:
            self._masks[key] = packed = pack_nonzero(genome)
            self.nbytes += packed.numel()
            while self.nbytes > self.max_bytes and self._masks:
                self.nbytes -= self._masks.popitem(last=False)[1].numel()
        return False

    def forget(self, ident: int) -> None:
        """Drop every mask of ``ident`` (it left the archive)."""
        for key in [k for k in self._masks if k[0] == int(ident)]:
            self.nbytes -= self._masks.pop(key).numel()
