"""SparseGPT (Frantar & Alistarh, 2023): prune with a second-order (OBS) update of the kept
weights, column block by column block, from the Hessian ``H = X^T X`` of each layer's inputs.

Layer by layer like Wanda: inputs propagate through the already-pruned blocks. Within a layer,
the mask of each block of ``block_size`` columns is chosen by ``w^2 / [H^-1]_jj^2`` (adaptive
mask selection), then every pruned weight's error is spread over the not-yet-processed columns
through the Cholesky factor of ``H^-1`` (dampened by ``dampening * mean(diag H)``).

Deviation from the reference code, on purpose: the number of weights pruned per block is set
by cumulative rounding so the layer (or each row) ends with exactly ``round(sparsity * n)``
zeros; and input features never seen in calibration (``H_jj = 0``) are not zeroed, so no
weight beyond the mask becomes zero. Their weights are ranked first for pruning (smallest
``|w|`` first), where the reference's zeroed weights rank, and their diagonal is set to the live
features' mean (the reference: 1 on ``2/n X^T X``), so that neither the mask nor the dampening
depends on the scale of the activations.

Fused MoE experts: every expert has its own Hessian ``X_e^T X_e`` of the inputs it receives
(the calibration tokens routed to it, ``layerwise``), and each expert's gate, up and down
projection is pruned and reconstructed as a linear of that shape would be (gate and up share
their expert's Hessian, as ``gate_proj`` and ``up_proj`` share theirs in a dense MLP). Memory:
one ``[in, in]`` float32 Hessian per expert and expert parameter of the block being pruned. An
expert that no calibration token reaches has ``H = 0``; with the dead-feature rules above its
dampened Hessian is a multiple of the identity and its weights rank by ``|W|``, which makes the
selection magnitude pruning and the update a no-op (with a warning). The router stays dense
unless ``prune_router=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from sparse_merge.errors import check_choice, check_positive
from sparse_merge.models.blocks import PrunableLayer
from sparse_merge.pruning.base import Calibration, keep_smallest_out
from sparse_merge.pruning.layerwise import CalibratedPruner, prune_layerwise, warn_unrouted
from sparse_merge.pruning.masking import Record, check_nm_width, parse_nm


class Hessian:
    """Running ``sum_t x_t x_t^T`` [in, in] of a layer's inputs (float32); with ``experts`` one
    per expert ([E, in, in], each over the tokens routed to that expert)."""

    def __init__(self, n_in: int, device: torch.device, experts: int | None = None) -> None:
        shape = (n_in, n_in) if experts is None else (experts, n_in, n_in)
        self.h = torch.zeros(shape, dtype=torch.float32, device=device)  # [in, in] / [E, in, in]
        self.tokens: int | torch.Tensor = (
            0 if experts is None else torch.zeros(experts, dtype=torch.long)
        )

    def add(self, x: torch.Tensor, expert: int | None = None) -> None:
        """Add the inputs ``x`` [n, in] (of the tokens routed to ``expert``)."""
        x = x.float()
        (self.h if expert is None else self.h[expert]).addmm_(x.t(), x)
        if isinstance(self.tokens, torch.Tensor):
            self.tokens[0 if expert is None else expert] += x.shape[0]
        else:
            self.tokens += x.shape[0]

    def of(self, expert: int | None) -> torch.Tensor:
        """The Hessian [in, in] of the layer, or of one expert."""
        return self.h if expert is None else self.h[expert]


def _cumulative_counts(total: int, n_cols: int, starts: range, block: int) -> list[int]:
    """Per-block counts that sum exactly to ``total``, proportional to each block's width."""
    counts = []
    for i1 in starts:
        i2 = min(i1 + block, n_cols)
        counts.append(round(total * i2 / n_cols) - round(total * i1 / n_cols))
    return counts


def _saliency(w: torch.Tensor, hinv: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """The OBS saliency ``w^2 / [H^-1]_jj^2`` of the weights ``w`` [out, B] of a column block
    (``hinv`` its [B, B] block), ranked with the columns of ``dead`` features first: their
    saliency is 0 in the limit ``H_jj -> 0`` (pruning them changes no calibration output), as
    in the reference, which zeroes them. Among dead weights the smaller ``|w|`` goes first
    (``-1 / (1 + w^2)``, below every live saliency; in float64, which keeps weights down to
    ~1e-8 apart), so a layer that no token reaches (an unrouted expert) is pruned by ``|W|``."""
    score = w.pow(2) / torch.diag(hinv)[None, :].pow(2)
    if not dead.any():
        return score
    score = score.double()
    dead_score = -torch.reciprocal(1.0 + w.double().pow(2))
    return torch.where(dead[None, :], dead_score, score)


@torch.no_grad()
def sparsegpt_prune_(
    w: torch.Tensor,
    h: torch.Tensor,
    sparsity: float,
    *,
    granularity: str = "layer",
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
) -> torch.Tensor:
    """Prune ``w`` [out, in] in place with the OBS update from ``h`` [in, in]; returns the
    keep-mask [out, in]. ``granularity``: ``layer`` (blocks compared over all rows) or ``row``
    (the same number pruned in every row)."""
    out, n_in = w.shape
    if nm is not None:
        check_nm_width(n_in, *nm)
    work = w.float().clone()  # [out, in]
    h = h.clone()
    diag = torch.diag(h)
    dead = diag == 0  # [in]: features no calibration token reached
    # A dead feature is decoupled from the others; its diagonal takes the live features' mean,
    # so the dampening (a multiple of the mean diagonal) does not depend on the activations'
    # scale, as it would with a constant (the reference sets 1 on its 2/n-scaled Hessian).
    h[dead, dead] = diag[~dead].mean() if not dead.all() else 1.0
    h += dampening * torch.mean(torch.diag(h)) * torch.eye(n_in, device=h.device)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as exc:
        raise RuntimeError(
            f"SparseGPT: the dampened Hessian is not positive definite (dampening={dampening}); "
            "raise pruner.dampening or use more calibration data"
        ) from exc
    prune = torch.zeros_like(work, dtype=torch.bool)  # [out, in], True = pruned
    starts = range(0, n_in, block_size)
    if nm is None:
        per = round(sparsity * n_in) if granularity == "row" else round(sparsity * out * n_in)
        counts = _cumulative_counts(per, n_in, starts, block_size)
    for b, i1 in enumerate(starts):
        i2 = min(i1 + block_size, n_in)
        w1 = work[:, i1:i2].clone()  # [out, B]
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]  # [B, B]
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:
            score = _saliency(w1, hinv1, dead[i1:i2])  # [out, B]
            if granularity == "row":
                mask1 = ~keep_smallest_out(score, counts[b])
            else:
                mask1 = ~keep_smallest_out(score.flatten(), counts[b]).view_as(score)
        for i in range(i2 - i1):
            col = w1[:, i]  # [out]
            d = hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                group = slice(i, i + nm[1])
                score = _saliency(w1[:, group], hinv1[group, group], dead[i1:i2][group])
                mask1[:, i : i + nm[1]] = ~keep_smallest_out(score, nm[1] - nm[0])
            q = col.masked_fill(mask1[:, i], 0.0)
            q1[:, i] = q
            e = (col - q) / d  # [out]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        work[:, i1:i2] = q1
        work[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        prune[:, i1:i2] = mask1
    work.masked_fill_(prune, 0.0)
    w.copy_(work.to(w.dtype))
    return ~prune


class SparseGPTPruner(CalibratedPruner):
    """Second-order pruning with weight reconstruction, block by block through the pruned
    blocks: exactly ``round(sparsity * n)`` zeros per layer (``granularity='layer'``, as in the
    paper) or per output row (``'row'``), or an N:M pattern (``nm='2:4'``)."""

    updates_weights = True  # the kept weights change too: pruning is not just a mask

    def __init__(
        self,
        n_calibration: int = 128,
        batch_size: int = 8,
        granularity: str = "layer",
        nm: str | None = None,
        block_size: int = 128,
        dampening: float = 0.01,
        prune_router: bool = False,
    ) -> None:
        self.n_calibration = int(check_positive("n_calibration", n_calibration))
        self.batch_size = int(check_positive("batch_size", batch_size))
        self.granularity = check_choice("granularity", granularity, ("layer", "row"))
        self.nm = parse_nm("nm", nm)
        self.block_size = int(check_positive("block_size", block_size))
        if self.nm is not None and self.block_size % self.nm[1]:
            raise ValueError(f"block_size={block_size} must be a multiple of M={self.nm[1]}")
        self.dampening = float(check_positive("dampening", dampening))
        self.prune_router = bool(prune_router)

    def describe(self) -> dict[str, str]:
        """Method, importance and granularity (metadata of saved masks)."""
        return {"method": "sparsegpt", "importance": "obs", "granularity": self.pattern()}

    @torch.no_grad()
    def _prune(
        self, model: nn.Module, calib: Calibration | None, sparsity: float, record: Record
    ) -> bool:
        """Prune and update the kept weights in place, block by block, handing each layer's
        keep-mask to ``record`` (``LayerMasks``)."""
        calib = self.calibration(model, calib, sparsity)
        if sparsity == 0:
            return False

        def new_stat(layer: PrunableLayer) -> Hessian:
            return Hessian(layer.weight.shape[1], layer.weight.device, layer.num_experts)

        def prune_layer(layer: PrunableLayer, stat: Hessian) -> None:
            warn_unrouted(layer, stat.tokens, "their weights are pruned by |W|, not updated")
            w = layer.weight  # [rows, in] view
            keep = torch.empty(w.shape, dtype=torch.bool, device=w.device)
            for unit in layer.units:  # the whole weight, or each expert's projections
                keep[unit.rows] = sparsegpt_prune_(
                    w[unit.rows],
                    stat.of(unit.expert),
                    sparsity,
                    granularity=self.granularity,
                    nm=self.nm,
                    block_size=self.block_size,
                    dampening=self.dampening,
                )
            record(layer.param_name, layer.param_layout(keep))

        prune_layerwise(
            model, calib, self.batch_size, new_stat, prune_layer, "sparsegpt", self.prune_router
        )
        return True
