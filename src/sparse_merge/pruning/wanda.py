"""Wanda (Sun et al., 2023): prune by ``|W_ij| * ||X_j||_2``, compared within each output row.

``||X_j||_2`` is the L2 norm of input feature ``j`` over every (non-padding) calibration token,
computed layer by layer with the inputs propagated through the already-pruned blocks, on every
linear layer of the decoder blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from sparse_merge.errors import check_choice, check_positive
from sparse_merge.models.blocks import PrunableLayer
from sparse_merge.pruning.base import Calibration, Masks
from sparse_merge.pruning.layerwise import CalibratedPruner, prune_layerwise
from sparse_merge.pruning.masking import (
    apply_keep,
    full_masks,
    mask_from_scores,
    parse_nm,
)


class ColumnNorms:
    """Running sum of squares of each input feature: ``||X_j||_2 = sqrt(sum_t x_tj^2)``."""

    def __init__(self, n_in: int, device: torch.device) -> None:
        self.sq = torch.zeros(n_in, dtype=torch.float32, device=device)  # [in]
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add the inputs ``x`` [n, in]."""
        self.sq += x.float().pow(2).sum(0)
        self.tokens += x.shape[0]

    def norms(self) -> torch.Tensor:
        """[in] L2 norm of each input feature over all tokens seen."""
        return self.sq.sqrt()


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||`` [out, in] from the weight [out, in] and the input norms [in]."""
    return weight.abs().float() * norms[None, :]


class WandaPruner(CalibratedPruner):
    """Activation-aware pruning: exactly ``round(sparsity * in)`` weights per output row
    (``granularity='row'``, as in the paper) or per layer, or an N:M pattern (``nm='2:4'``)."""

    def __init__(
        self,
        n_calibration: int = 128,
        batch_size: int = 8,
        granularity: str = "row",
        nm: str | None = None,
    ) -> None:
        self.n_calibration = int(check_positive("n_calibration", n_calibration))
        self.batch_size = int(check_positive("batch_size", batch_size))
        self.granularity = check_choice("granularity", granularity, ("row", "layer"))
        self.nm = parse_nm("nm", nm)

    def describe(self) -> dict[str, str]:
        """Method, importance and granularity (metadata of saved masks)."""
        return {"method": "wanda", "importance": "wanda", "granularity": self.pattern()}

    @torch.no_grad()
    def prune(self, model: nn.Module, calib: Calibration | None, sparsity: float) -> Masks:
        """Zero the lowest-scoring weights in place; returns keep-masks by weight parameter name."""
        calib = self.calibration(calib, sparsity)
        if sparsity == 0:
            return full_masks(model)
        masks: Masks = {}

        def new_stat(layer: PrunableLayer) -> ColumnNorms:
            return ColumnNorms(layer.weight.shape[1], layer.weight.device)

        def prune_layer(layer: PrunableLayer, stat: ColumnNorms) -> None:
            scores = wanda_scores(layer.weight, stat.norms())
            keep = mask_from_scores(scores, sparsity, self.granularity, self.nm)
            masks[layer.param_name] = apply_keep(layer, keep)

        prune_layerwise(model, calib, self.batch_size, new_stat, prune_layer, desc="wanda")
        return masks
