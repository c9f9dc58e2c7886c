"""Magnitude pruning: drop the smallest ``|W|`` of each layer (no calibration data)."""

from __future__ import annotations

import torch
from torch import nn

from sparse_merge.errors import check_choice, check_fraction
from sparse_merge.models.blocks import prunable_layers
from sparse_merge.pruning.base import Calibration, Masks, keep_smallest_out


class MagnitudePruner:
    """Unstructured magnitude pruning with exactly ``round(sparsity * n)`` zeros per layer
    (``granularity='layer'``) or per output row (``granularity='row'``)."""

    def __init__(self, granularity: str = "layer") -> None:
        self.granularity = check_choice("granularity", granularity, ("layer", "row"))

    @torch.no_grad()
    def prune(self, model: nn.Module, calib: Calibration | None, sparsity: float) -> Masks:
        """Zero the smallest weights in place; returns keep-masks by weight parameter name."""
        check_fraction("sparsity", sparsity)
        masks: Masks = {}
        for layer in prunable_layers(model):
            w = layer.weight  # [out, in] view
            scores = w.abs().float()
            if self.granularity == "row":
                keep = keep_smallest_out(scores, round(sparsity * w.shape[1]))
            else:
                keep = keep_smallest_out(scores.flatten(), round(sparsity * w.numel())).view_as(w)
            w.masked_fill_(~keep, 0.0)
            masks[layer.param_name] = keep if w is layer.module.weight else keep.t()
        return masks
