"""Prune from any importance score with any mask granularity (one class, many settings)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn

from sparse_merge.errors import check_choice, check_fraction
from sparse_merge.models.blocks import PrunableLayer, head_dim, prunable_layers
from sparse_merge.pruning.base import Calibration, keep_smallest_out
from sparse_merge.pruning.importance import Importance, MagnitudeImportance
from sparse_merge.pruning.masking import (
    GRANULARITIES,
    LayerMasks,
    Record,
    apply_keep,
    check_nm_sparsity,
    global_masks,
    nm_sparsities,
    parse_nm,
    prune_rows_,
    rows_in_place,
    unit_masks,
)

log = logging.getLogger("sparse_merge")

# the linears of a Llama-style decoder block, whose heads and MLP channels are coupled
COUPLED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ScorePruner(LayerMasks):
    """Scores every prunable weight with ``importance``, then keeps the highest.

    ``granularity``: ``row`` (exactly ``round(sparsity * in)`` pruned per output row),
    ``layer`` (per layer), ``global`` (one threshold over all layers), ``channel`` (whole output
    channels of every layer, each layer ranked on its own), ``head`` (LLM-Pruner's coupled
    structures, in a Llama-style block: whole attention heads, with their query, key and value
    rows and their ``o_proj`` input columns, a key/value group at a time under grouped-query
    attention; whole MLP channels, with their ``gate_proj`` and ``up_proj`` rows and their
    ``down_proj`` input column; each ranked by the summed score of all its weights;
    ``round(sparsity * units)`` of each removed per block; the residual stream's dimensions are
    never touched; a block of another layout is pruned by output channels, layer by layer,
    with a warning). ``nm='2:4'`` gives an N:M pattern instead (it fixes the sparsity at
    (M-N)/M).

    Fused MoE experts: every granularity but ``global`` applies to each expert's gate, up and
    down projection on its own (as to a linear of that shape; ``head`` prunes whole output
    channels there); ``global`` ranks them with everything else. MoE routers stay dense unless
    ``prune_router=True``.
    """

    def __init__(
        self,
        importance: Importance,
        granularity: str = "row",
        nm: str | None = None,
        prune_router: bool = False,
    ) -> None:
        if not isinstance(importance, Importance):
            raise TypeError(f"importance must implement Importance, got {type(importance)}")
        self.importance = importance
        self.granularity = check_choice("granularity", granularity, GRANULARITIES)
        self.nm = parse_nm("nm", nm)
        self.prune_router = bool(prune_router)

    @property
    def uses_calibration(self) -> bool:
        """Whether the importance reads calibration data (magnitude and random do not)."""
        return getattr(self.importance, "uses_calibration", True)

    @property
    def ranks_globally(self) -> bool:
        """Whether one ranking runs over every layer (``global`` granularity without an N:M
        pattern): every layer's scores, then every layer's mask, before any is applied."""
        return self.granularity == "global" and self.nm is None

    @property
    def layer_at_a_time(self) -> bool:
        """Whether pruning holds one layer's scores at a time (``_scores``): an importance that
        scores layers on their own (``each``), without a global ranking."""
        return not self.ranks_globally and hasattr(self.importance, "each")

    def accepted_sparsities(self) -> tuple[float, ...] | None:
        """0 and (M-N)/M with an N:M pattern; ``None`` (any fraction) without one."""
        return nm_sparsities(self.nm)

    def describe(self) -> dict[str, str]:
        """Method, importance and granularity (metadata of saved masks)."""
        pattern = f"{self.nm[0]}:{self.nm[1]}" if self.nm else self.granularity
        return {
            "method": self.importance.name,
            "importance": self.importance.name,
            "granularity": pattern,
        }

    def _prune(
        self, model: nn.Module, calib: Calibration | None, sparsity: float, record: Record
    ) -> bool:
        """Zero the lowest-scoring weights in place, handing each layer's keep-mask to
        ``record`` (``LayerMasks``)."""
        check_fraction("sparsity", sparsity)
        if self.nm is not None:
            check_nm_sparsity(self.nm, sparsity)
        if sparsity == 0:
            return False
        layers = prunable_layers(model, self.prune_router)
        if self.ranks_globally:
            scores = self.importance.compute(model, calib, layers)  # name -> [out, in]
            keeps = global_masks(scores, sparsity)
            del scores
            with torch.no_grad():
                for layer in layers:
                    record(layer.param_name, apply_keep(layer, keeps.pop(layer.param_name)))
            return True
        head = self.granularity == "head"
        dim = head_dim(model) if head else None
        if head:
            layers = self._prune_coupled(model, calib, layers, sparsity, record)
            if not layers:
                return True
        # magnitude (``MagnitudeImportance`` itself: a subclass may score otherwise) per row:
        # one pass over each weight ``rows_in_place`` takes
        if type(self.importance) is MagnitudeImportance:
            rest = []
            for layer in layers:
                if rows_in_place(layer, sparsity, self.granularity, self.nm):
                    prune_rows_(layer, sparsity, None, record)
                else:
                    rest.append(layer)
            layers = rest
        for layer, scores in self._scores(model, calib, layers):
            unit = "channel" if head and not layer.is_attention_input else self.granularity
            keep = unit_masks(layer, scores, sparsity, unit, self.nm, dim)
            del scores  # before the next layer's are computed
            with torch.no_grad():
                record(layer.param_name, apply_keep(layer, keep))
            del keep  # before the next layer's is made
        return True

    def _prune_coupled(
        self,
        model: nn.Module,
        calib: Calibration | None,
        layers: list[PrunableLayer],
        sparsity: float,
        record: Record,
    ) -> list[PrunableLayer]:
        """Prune the heads and MLP channels of every Llama-style block as coupled structures
        (see the class docstring); returns the layers of the other blocks, left to the
        layer-by-layer path. Written here: LLM-Pruner's dependency graph is a library of its
        own for arbitrary graphs, and these two structures are all a decoder block has."""

        def block(layer: PrunableLayer) -> str:  # model.layers.0(.self_attn|.mlp).q_proj
            return layer.name.rpartition(".")[0].rpartition(".")[0]

        blocks: dict[str, dict[str, PrunableLayer]] = {}
        for layer in layers:
            blocks.setdefault(block(layer), {})[layer.name.rpartition(".")[2]] = layer
        coupled = {
            block: parts
            for block, parts in blocks.items()
            if set(parts) == set(COUPLED) and all(len(p.units) == 1 for p in parts.values())
        }
        rest = [layer for layer in layers if block(layer) not in coupled]
        if rest:
            log.warning(
                "structured pruning couples heads and channels in Llama-style blocks "
                "(q/k/v/o_proj, gate/up/down_proj); %d other layers are pruned by output "
                "channels, each on its own",
                len(rest),
            )
        if not coupled:
            return rest
        mine = [layer for parts in coupled.values() for layer in parts.values()]
        scores = {layer.name: sc for layer, sc in self._scores(model, calib, mine)}
        d = head_dim(model)
        for parts in coupled.values():
            s = {name: scores.pop(layer.name) for name, layer in parts.items()}
            groups = s["k_proj"].shape[0] // d  # key/value heads
            per = s["q_proj"].shape[0] // groups  # query rows of one group
            score = (
                s["q_proj"].sum(1).view(groups, per).sum(1)
                + s["k_proj"].sum(1).view(groups, d).sum(1)
                + s["v_proj"].sum(1).view(groups, d).sum(1)
                + s["o_proj"].sum(0).view(groups, per).sum(1)
            )
            group = keep_smallest_out(score.double(), round(sparsity * groups))  # [groups]
            channel = keep_smallest_out(
                (s["gate_proj"].sum(1) + s["up_proj"].sum(1) + s["down_proj"].sum(0)).double(),
                round(sparsity * s["gate_proj"].shape[0]),
            )  # [intermediate]
            rows = {
                "q_proj": group.repeat_interleave(per),
                "k_proj": group.repeat_interleave(d),
                "v_proj": group.repeat_interleave(d),
                "gate_proj": channel,
                "up_proj": channel,
            }
            cols = {"o_proj": group.repeat_interleave(per), "down_proj": channel}
            with torch.no_grad():
                for name, layer in parts.items():
                    shape = layer.weight.shape
                    keep = rows[name][:, None] if name in rows else cols[name][None, :]
                    record(layer.param_name, apply_keep(layer, keep.expand(shape).clone()))
        return rest

    def _scores(
        self, model: nn.Module, calib: Calibration | None, layers: list[PrunableLayer]
    ) -> Iterator[tuple[PrunableLayer, torch.Tensor]]:
        """Each layer with its scores, in order, each dropped once its mask is made: an
        importance that scores layers on their own (``each``: magnitude, random) computes them
        one at a time, so pruning holds one layer's float32 scores (for a 7B model, ~0.2 GB
        instead of ~26 GB); the others score every layer first (their scores come from
        passes over the whole model)."""
        if self.layer_at_a_time:
            scored = self.importance.each(model, calib, layers)  # (zip would hold the last)
            for layer in layers:
                yield layer, next(scored)
            return
        scores = self.importance.compute(model, calib, layers)  # name -> [out, in]
        for layer in layers:
            yield layer, scores.pop(layer.param_name)
