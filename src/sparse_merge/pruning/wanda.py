"""Wanda (Sun et al., 2023): prune by ``|W_ij| * ||X_j||_2``, compared within each output row.

``||X_j||_2`` is the L2 norm of input feature ``j`` over every (non-padding) calibration token,
computed layer by layer with the inputs propagated through the already-pruned blocks, on every
linear layer of the decoder blocks.

Inside an evolutionary search, pruning is a mutation applied to the parents every step, and
re-running the calibration passes each time is most of a step's cost. ``in_loop='reference'``
(the default) approximates it there: the input norms are measured once, in one dense pass of
each initial genome over the calibration set (pooled over them), and every in-loop pruning
scores ``|W| * ||X_j||`` with those norms (``ReferenceWanda``). What it approximates: the norms
of the model being pruned, measured through its own already-pruned blocks. The search's
models are merges of the initial genomes, whose activations are alike; the benchmark reports
how often its masks agree with full Wanda's. Every model that is reported (the picks, the
references, the baselines) is pruned with full Wanda. ``in_loop='layerwise'`` uses full Wanda
in the loop too.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from sparse_merge.errors import check_choice, check_fraction, check_positive
from sparse_merge.models.blocks import PrunableLayer, prunable_layers
from sparse_merge.pruning.base import Calibration, Masks
from sparse_merge.pruning.layerwise import (
    CalibratedPruner,
    prune_layerwise,
    record_inputs,
    require_calibration,
    take,
)
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


@torch.no_grad()
def dense_input_norms(
    model: nn.Module, calib: Calibration, batch_size: int
) -> dict[str, ColumnNorms]:
    """The input norms of every prunable layer (by module name) over all of ``calib``'s
    non-padding tokens, from one forward pass of the model as it is."""
    layers = prunable_layers(model)
    stats = {
        layer.name: ColumnNorms(layer.weight.shape[1], layer.weight.device) for layer in layers
    }
    mask: list[torch.Tensor] = []
    handles = record_inputs(layers, stats, mask)
    device = next(model.parameters()).device
    body = getattr(model, "base_model", model)  # the blocks without the LM head (not recorded)
    try:
        for ids, attn in calib.batches(batch_size):
            mask[:] = [attn.bool().to(device)]
            body(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||`` [out, in] from the weight [out, in] and the input norms [in]."""
    return weight.abs().float() * norms[None, :]


IN_LOOP = ("reference", "layerwise")


class WandaPruner(CalibratedPruner):
    """Activation-aware pruning: exactly ``round(sparsity * in)`` weights per output row
    (``granularity='row'``, as in the paper) or per layer, or an N:M pattern (``nm='2:4'``).
    ``in_loop``: how a search prunes inside its loop (see the module docstring)."""

    def __init__(
        self,
        n_calibration: int = 128,
        batch_size: int = 8,
        granularity: str = "row",
        nm: str | None = None,
        in_loop: str = "reference",
    ) -> None:
        self.n_calibration = int(check_positive("n_calibration", n_calibration))
        self.batch_size = int(check_positive("batch_size", batch_size))
        self.granularity = check_choice("granularity", granularity, ("row", "layer"))
        self.nm = parse_nm("nm", nm)
        self.in_loop = check_choice("in_loop", in_loop, IN_LOOP)

    def reference(self, models: Iterable[nn.Module], calib: Calibration | None) -> ReferenceWanda:
        """The in-loop pruner with input norms pooled over one dense pass of each of ``models``
        (called once per search, on its initial genomes)."""
        calib = take(require_calibration(calib, type(self).__name__), self.n_calibration)
        pooled: dict[str, ColumnNorms] = {}
        for model in models:
            for name, stat in dense_input_norms(model, calib, self.batch_size).items():
                if name in pooled:
                    pooled[name].sq += stat.sq
                    pooled[name].tokens += stat.tokens
                else:
                    pooled[name] = stat
        norms = {name: stat.norms() for name, stat in pooled.items()}
        return ReferenceWanda(norms, self.granularity, self.nm)

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


class ReferenceWanda:
    """Wanda scores ``|W| * ||X_j||`` with fixed input norms (by layer module name), measured
    once on reference models (``WandaPruner.reference``); no calibration pass per call."""

    uses_calibration = False

    def __init__(
        self,
        norms: dict[str, torch.Tensor],
        granularity: str = "row",
        nm: tuple[int, int] | None = None,
    ) -> None:
        self.norms, self.granularity, self.nm = norms, granularity, nm

    @torch.no_grad()
    def prune(self, model: nn.Module, calib: Calibration | None, sparsity: float) -> Masks:
        """Zero the lowest-scoring weights in place; returns keep-masks by weight parameter name."""
        check_fraction("sparsity", sparsity)
        if sparsity == 0:
            return full_masks(model)
        masks: Masks = {}
        for layer in prunable_layers(model):
            norms = self.norms[layer.name].to(layer.weight.device)
            keep = mask_from_scores(
                wanda_scores(layer.weight, norms), sparsity, self.granularity, self.nm
            )
            masks[layer.param_name] = apply_keep(layer, keep)
        return masks
