"""Keep-masks from importance scores, with exact counts (stable tie-break, no threshold drift).

Every function takes scores in the weight's ``[out, in]`` layout (higher = more important) and
returns a bool keep-mask of the same shape (True = kept). The number of pruned entries is
exactly ``round(sparsity * n)`` for the unit the granularity defines (a row, a layer, all
layers, a group of M, an output channel or an attention head); ties go to the lower index.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from sparse_merge.errors import ConfigError
from sparse_merge.merging import kernels
from sparse_merge.models.blocks import PrunableLayer, prunable_layers
from sparse_merge.pruning.base import SORT_ROWS, Calibration, Masks, keep_smallest_out

GRANULARITIES = ("row", "layer", "global", "channel", "head")


def parse_nm(key: str, value: str | None) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)`` (N kept in every group of M consecutive inputs); None stays None."""
    if value is None:
        return None
    try:
        n, m = (int(v) for v in str(value).split(":"))
    except ValueError:
        raise ConfigError(
            key, value, "'N:M' with integers 0 < N < M, e.g. '2:4' or '4:8'"
        ) from None
    if not 0 < n < m:
        raise ConfigError(key, value, "'N:M' with integers 0 < N < M, e.g. '2:4' or '4:8'")
    return n, m


def nm_sparsity(nm: tuple[int, int]) -> float:
    """Fraction of weights an N:M pattern removes, (M - N) / M."""
    n, m = nm
    return (m - n) / m


def nm_sparsities(nm: tuple[int, int] | None) -> tuple[float, ...] | None:
    """The sparsities a pruner with pattern ``nm`` can prune to: 0 (nothing pruned) and
    (M - N) / M; ``None`` without a pattern (any fraction in [0, 1))."""
    return None if nm is None else (0.0, nm_sparsity(nm))


def check_nm_sparsity(nm: tuple[int, int], sparsity: float) -> None:
    """An N:M pattern fixes the sparsity: ``sparsity`` must be 0 (no pruning) or (M - N) / M."""
    if sparsity != 0 and abs(sparsity - nm_sparsity(nm)) > 1e-6:
        raise ConfigError(
            "sparsity",
            sparsity,
            f"0 or {nm_sparsity(nm)} for the {nm[0]}:{nm[1]} pattern (it fixes the sparsity)",
        )


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Exactly ``round(sparsity * in)`` pruned in every output row of ``scores`` [out, in]."""
    return keep_smallest_out(scores, round(sparsity * scores.shape[-1]))


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Exactly ``round(sparsity * numel)`` pruned in the whole layer."""
    return keep_smallest_out(scores.flatten(), round(sparsity * scores.numel())).view_as(scores)


def check_nm_width(d_in: int, n: int, m: int, layer: str = "") -> None:
    """An error unless ``d_in`` inputs fall into whole groups of M (``layer``: the weight's
    name, for the message)."""
    if d_in % m:
        where = f"{layer}: " if layer else ""
        raise ValueError(
            f"{where}input size {d_in} is not a multiple of M={m} for an {n}:{m} pattern"
        )


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N kept (the M - N lowest pruned) in every group of M consecutive inputs of each row."""
    out, d_in = scores.shape
    check_nm_width(d_in, n, m)
    groups = scores.reshape(out, d_in // m, m)  # [out, G, M]
    return keep_smallest_out(groups, m - n).reshape(out, d_in)


def channel_mask(scores: torch.Tensor, sparsity: float, unit: int = 1) -> torch.Tensor:
    """Whole output units of ``unit`` consecutive rows (channels, or heads with ``unit=head_dim``)
    pruned by their summed score: exactly ``round(sparsity * n_units)`` units removed."""
    out = scores.shape[0]
    if out % unit:
        raise ValueError(f"{out} output rows do not split into units of {unit}")
    per_unit = scores.float().reshape(out // unit, -1).sum(-1)  # [U]
    keep_units = keep_smallest_out(per_unit, round(sparsity * per_unit.numel()))  # [U]
    return keep_units.repeat_interleave(unit)[:, None].expand_as(scores).clone()


def global_masks(scores: Mapping[str, torch.Tensor], sparsity: float) -> Masks:
    """One threshold over all layers: exactly ``round(sparsity * total)`` pruned overall.

    Scores are compared across layers as they are, so they must share a scale (magnitudes of
    one model do; use per-row or per-layer granularity otherwise). All scores are concatenated
    once on their own device (memory: one float per prunable weight).
    """
    names = list(scores)
    flat = torch.cat([scores[n].float().flatten() for n in names])  # [sum numel]
    keep = keep_smallest_out(flat, round(sparsity * flat.numel()))
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[start : start + size].view_as(scores[n])
        start += size
    return out


def random_scores(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Uniform random scores drawn from ``generator`` on the CPU (seeded, device independent)."""
    return torch.rand(shape, generator=generator)


def mask_from_scores(
    scores: torch.Tensor,
    sparsity: float,
    granularity: str = "row",
    nm: tuple[int, int] | None = None,
    head_dim: int | None = None,
) -> torch.Tensor:
    """Keep-mask of one layer from its scores [out, in] (``global`` needs ``global_masks``)."""
    if nm is not None:
        return nm_mask(scores, *nm)
    if granularity == "row":
        return row_mask(scores, sparsity)
    if granularity == "layer":
        return layer_mask(scores, sparsity)
    if granularity == "channel":
        return channel_mask(scores, sparsity)
    if granularity == "head":
        return channel_mask(scores, sparsity, head_dim or 1)
    raise ValueError(f"granularity {granularity!r} is not one of {GRANULARITIES} for one layer")


def unit_masks(
    layer: PrunableLayer,
    scores: torch.Tensor,
    sparsity: float,
    granularity: str = "row",
    nm: tuple[int, int] | None = None,
    head_dim: int | None = None,
) -> torch.Tensor:
    """Keep-mask [rows, in] of one prunable layer from its scores in the ``layer.weight``
    layout: ``mask_from_scores`` on each of the layer's units (the whole weight of a linear;
    each expert's gate, up or down projection of a fused MoE parameter, so every expert gets
    the exact count of a linear of its shape)."""
    units = layer.units
    if len(units) == 1:
        return mask_from_scores(scores, sparsity, granularity, nm, head_dim)
    keep = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    for unit in units:
        keep[unit.rows] = mask_from_scores(scores[unit.rows], sparsity, granularity, nm, head_dim)
    return keep


@torch.no_grad()
def apply_keep(layer: PrunableLayer, keep: torch.Tensor) -> torch.Tensor:
    """Zero ``layer``'s weight where ``keep`` [out, in] (the ``layer.weight`` layout) is False;
    returns the mask in the weight parameter's own layout (transposed for GPT-2's ``Conv1D``,
    [E, out, in] for fused experts)."""
    w = layer.weight  # [out, in] view
    keep = keep.to(w.device)
    w.mul_(keep)  # exact zeros (signed like the weight); a tenth of masked_fill_'s time on CPU
    return layer.param_layout(keep)


def rows_in_place(
    layer: PrunableLayer,
    sparsity: float,
    granularity: str,
    nm: tuple[int, int] | None,
    scale: torch.Tensor | None = None,
) -> bool:
    """Whether ``prune_rows_`` prunes ``layer`` to ``sparsity`` as ``granularity`` and ``nm``
    ask: per row, no N:M pattern, a float32 or bfloat16 weight on the CPU whose ``[out, in]``
    view is contiguous (``kernels.usable``), rows up to ``SORT_ROWS`` long, some but not every
    entry of a row pruned; ``scale`` float32 [in]."""
    w = layer.weight
    n = w.shape[-1]
    fits = scale is None or (scale.dtype == torch.float32 and tuple(scale.shape) == (n,))
    return (
        granularity == "row"
        and nm is None
        and fits
        and w.dim() == 2
        and n <= SORT_ROWS
        and 0 < round(sparsity * n) < n
        and kernels.usable(w, *([] if scale is None else [scale]))
    )


@torch.no_grad()
def prune_rows_(
    layer: PrunableLayer, sparsity: float, scale: torch.Tensor | None, record: Record
) -> None:
    """``apply_keep(layer, row_mask(|W| * scale, sparsity))`` (``scale`` None: ``|W|``) in one
    pass over the weight (``kernels.prune_rows_``; ``rows_in_place`` layers): the same mask and
    the same weights, bit for bit. The mask, in the weight parameter's own layout, goes to
    ``record`` (none is made for ``drop_mask``)."""
    w = layer.weight
    keep = kernels.prune_rows_(w, round(sparsity * w.shape[-1]), scale, record is not drop_mask)
    if keep is not None:
        record(layer.param_name, layer.param_layout(keep))


def full_masks(model: nn.Module, prune_router: bool = False) -> dict[str, torch.Tensor]:
    """All-True keep-masks (nothing pruned) for every prunable weight, in its own layout."""
    return {
        layer.param_name: torch.ones_like(layer.parameter, dtype=torch.bool)
        for layer in prunable_layers(model, prune_router)
    }


# where a pruner hands each layer's keep-mask once applied: (weight parameter name, mask)
Record = Callable[[str, torch.Tensor], None]


def drop_mask(name: str, keep: torch.Tensor) -> None:
    """The ``Record`` of ``LayerMasks.prune_``: keeps no mask (a pruner that sees it need not
    make one)."""


class LayerMasks:
    """What the pruners here share: ``prune`` returns every prunable weight's keep-mask, and
    ``prune_`` prunes the same way keeping none, so that pruning holds one layer's mask at a
    time (a bool per prunable weight less at its peak: 1.3 GB for a 1.5B model, ~6.5 GB at
    7B), except with ``global`` granularity, whose ranking makes every mask first. A search
    prunes with it (``pruning.base.prune_in_place``). A subclass writes
    ``_prune(model, calib, sparsity, record)``: it checks its inputs, prunes, and hands each
    layer's mask to ``record`` once applied; it returns False when ``sparsity`` is 0 and it
    pruned nothing."""

    prune_router: bool = False

    def _prune(
        self, model: nn.Module, calib: Calibration | None, sparsity: float, record: Record
    ) -> bool:
        raise NotImplementedError

    def prune(self, model: nn.Module, calib: Calibration | None, sparsity: float) -> Masks:
        """Prune ``model`` in place to ``sparsity``; returns keep-masks by weight parameter name."""
        masks: Masks = {}
        if not self._prune(model, calib, sparsity, masks.__setitem__):
            return full_masks(model, self.prune_router)
        return masks

    def prune_(self, model: nn.Module, calib: Calibration | None, sparsity: float) -> None:
        """``prune`` without its result: each layer's keep-mask is dropped once applied."""
        self._prune(model, calib, sparsity, drop_mask)
