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
    """Exact sparsity of the prunable weights inside the decoder blocks (embeddings, norms, the
    LM head and MoE routers do not count). A fused MoE expert parameter [E, out, in] gives one
    entry per expert, ``model.layers.0.mlp.experts.gate_up_proj[3]``."""
    zeros = total = 0
    layers = {}
    for layer in prunable_layers(model):
        w = layer.parameter
        if layer.is_experts:
            per = (w == 0).flatten(1).sum(1).tolist()  # [E]
            for e, z in enumerate(per):
                layers[layer.expert_name(e)] = z / w[e].numel()
            z = int(sum(per))
        else:
            z = int((w == 0).sum())
            layers[layer.name] = z / w.numel()
        zeros += z
        total += w.numel()
    return SparsityReport(zeros / max(total, 1), zeros, total, layers)
