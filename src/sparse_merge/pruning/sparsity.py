"""Sparsity of the prunable weights, measured exactly (``== 0``), per layer and overall."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sparse_merge.models.blocks import prunable_layers


@dataclass
class SparsityReport:
    """Fraction of exactly-zero prunable weights, overall and per layer."""

    overall: float
    zeros: int
    total: int
    layers: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {
            "overall": self.overall,
            "zeros": self.zeros,
            "total": self.total,
            "layers": self.layers,
        }


@torch.no_grad()
def measure_sparsity(model: nn.Module) -> SparsityReport:
    """Exact sparsity of the Linear layers inside the decoder blocks (embeddings, norms and the
    LM head do not count)."""
    zeros = total = 0
    layers = {}
    for layer in prunable_layers(model):
        w = layer.module.weight
        z = int((w == 0).sum())
        layers[layer.name] = z / w.numel()
        zeros += z
        total += w.numel()
    return SparsityReport(zeros / max(total, 1), zeros, total, layers)
