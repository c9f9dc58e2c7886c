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

Fused MoE experts: each expert's ``gate_up_proj[e]`` and ``down_proj[e]`` is scored with the
norms of the inputs that expert receives, i.e. of the calibration tokens the router sends to
it (``layerwise``), not of all tokens; the gate and up halves and every expert get the exact
count of a linear of their shape. An expert that no calibration token reaches would score all
zeros (no ranking at all); its weights are ranked by ``|W|`` instead (magnitude pruning, with
a warning). The router stays dense unless ``prune_router=True``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from sparse_merge.errors import check_choice, check_fraction, check_positive
from sparse_merge.models.blocks import PrunableLayer, prunable_layers
from sparse_merge.pruning.base import Calibration
from sparse_merge.pruning.layerwise import (
    CalibratedPruner,
    prune_layerwise,
    record_inputs,
    require_calibration,
    take,
    warn_unrouted,
)
from sparse_merge.pruning.masking import (
    LayerMasks,
    Record,
    apply_keep,
    nm_sparsities,
    parse_nm,
    prune_rows_,
    rows_in_place,
    unit_masks,
)


class ColumnNorms:
    """Running sum of squares of each input feature: ``||X_j||_2 = sqrt(sum_t x_tj^2)``; with
    ``experts`` one row per expert ([E, in], each over the tokens routed to that expert)."""

    def __init__(self, n_in: int, device: torch.device, experts: int | None = None) -> None:
        shape = (n_in,) if experts is None else (experts, n_in)
        self.sq = torch.zeros(shape, dtype=torch.float32, device=device)  # [in] or [E, in]
        self.tokens: int | torch.Tensor = (
            0 if experts is None else torch.zeros(experts, dtype=torch.long)
        )

    def add(self, x: torch.Tensor, expert: int | None = None) -> None:
        """Add the inputs ``x`` [n, in] (of the tokens routed to ``expert``)."""
        sq = x.float().pow(2).sum(0)
        if expert is None:
            self.sq += sq
        else:
            self.sq[expert] += sq
        if isinstance(self.tokens, torch.Tensor):
            self.tokens[0 if expert is None else expert] += x.shape[0]
        else:
            self.tokens += x.shape[0]

    def norms(self) -> torch.Tensor:
        """[in] (or [E, in]) L2 norm of each input feature over all tokens seen."""
        return self.sq.sqrt()


def new_norms(layer: PrunableLayer) -> ColumnNorms:
    """The accumulator of ``layer``'s input norms (per expert for a fused expert parameter)."""
    return ColumnNorms(layer.weight.shape[1], layer.weight.device, layer.num_experts)


@torch.no_grad()
def dense_input_norms(
    model: nn.Module, calib: Calibration, batch_size: int, prune_router: bool = False
) -> dict[str, ColumnNorms]:
    """The input norms of every prunable layer (by layer name) over all of ``calib``'s
    non-padding tokens (per expert: the tokens routed to it), from one forward pass of the
    model as it is."""
    layers = prunable_layers(model, prune_router)
    stats = {layer.name: new_norms(layer) for layer in layers}
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
    """``|W| * ||X_j||`` [out, in] from the weight [out, in] and the input norms [in]; for
    fused experts the weight is [E * out, in] and the norms [E, in] (expert ``e``'s rows use
    row ``e``). Rows whose inputs were never seen (norms all zero: an expert no calibration
    token reached) would all score zero and are scored ``|W|`` instead."""
    mag = weight.abs().float()
    if norms.dim() == 1:
        return mag * norms[None, :] if bool(norms.any()) else mag
    n_experts = norms.shape[0]
    per = mag.view(n_experts, -1, mag.shape[-1])  # [E, out, in]
    seen = norms.any(-1)  # [E]
    scale = torch.where(seen[:, None], norms, torch.ones_like(norms))  # unseen: |W|
    return (per * scale[:, None, :]).view_as(mag)


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
        prune_router: bool = False,
    ) -> None:
        self.n_calibration = int(check_positive("n_calibration", n_calibration))
        self.batch_size = int(check_positive("batch_size", batch_size))
        self.granularity = check_choice("granularity", granularity, ("row", "layer"))
        self.nm = parse_nm("nm", nm)
        self.in_loop = check_choice("in_loop", in_loop, IN_LOOP)
        self.prune_router = bool(prune_router)

    def reference(self, models: Iterable[nn.Module], calib: Calibration | None) -> ReferenceWanda:
        """The in-loop pruner with input norms pooled over one dense pass of each of ``models``
        (called once per search, on its initial genomes)."""
        calib = take(require_calibration(calib, type(self).__name__), self.n_calibration)
        pooled: dict[str, ColumnNorms] = {}
        for model in models:
            norms = dense_input_norms(model, calib, self.batch_size, self.prune_router)
            for name, stat in norms.items():
                if name in pooled:
                    pooled[name].sq += stat.sq
                    pooled[name].tokens += stat.tokens
                else:
                    pooled[name] = stat
        norms = {name: stat.norms() for name, stat in pooled.items()}
        return ReferenceWanda(norms, self.granularity, self.nm, self.prune_router)

    def describe(self) -> dict[str, str]:
        """Method, importance and granularity (metadata of saved masks)."""
        return {"method": "wanda", "importance": "wanda", "granularity": self.pattern()}

    @torch.no_grad()
    def _prune(
        self, model: nn.Module, calib: Calibration | None, sparsity: float, record: Record
    ) -> bool:
        """Zero the lowest-scoring weights in place, block by block, handing each layer's
        keep-mask to ``record`` (``LayerMasks``)."""
        calib = self.calibration(model, calib, sparsity)
        if sparsity == 0:
            return False

        def prune_layer(layer: PrunableLayer, stat: ColumnNorms) -> None:
            warn_unrouted(layer, stat.tokens, "their weights are ranked by |W|")
            scores = wanda_scores(layer.weight, stat.norms())
            keep = unit_masks(layer, scores, sparsity, self.granularity, self.nm)
            record(layer.param_name, apply_keep(layer, keep))

        prune_layerwise(
            model, calib, self.batch_size, new_norms, prune_layer, "wanda", self.prune_router
        )
        return True


class ReferenceWanda(LayerMasks):
    """Wanda scores ``|W| * ||X_j||`` with fixed input norms (by layer module name), measured
    once on reference models (``WandaPruner.reference``); no calibration pass per call."""

    uses_calibration = False

    def __init__(
        self,
        norms: dict[str, torch.Tensor],
        granularity: str = "row",
        nm: tuple[int, int] | None = None,
        prune_router: bool = False,
    ) -> None:
        self.norms, self.granularity, self.nm = norms, granularity, nm
        self.prune_router = prune_router

    def accepted_sparsities(self) -> tuple[float, ...] | None:
        """0 and (M-N)/M with an N:M pattern; ``None`` (any fraction) without one."""
        return nm_sparsities(self.nm)

    @torch.no_grad()
    def _prune(
        self, model: nn.Module, calib: Calibration | None, sparsity: float, record: Record
    ) -> bool:
        """Zero the lowest-scoring weights in place, handing each layer's keep-mask to
        ``record`` (``LayerMasks``)."""
        check_fraction("sparsity", sparsity)
        if sparsity == 0:
            return False
        for layer in prunable_layers(model, self.prune_router):
            norms = self.norms[layer.name].to(layer.weight.device)
            if rows_in_place(layer, sparsity, self.granularity, self.nm, norms):  # one pass
                scale = norms if bool(norms.any()) else None  # as ``wanda_scores`` scores
                prune_rows_(layer, sparsity, scale, record)
                continue
            keep = unit_masks(
                layer, wanda_scores(layer.weight, norms), sparsity, self.granularity, self.nm
            )
            record(layer.param_name, apply_keep(layer, keep))
            del keep  # before the next layer's is made
        return True
