"""SLERP of two models: one angle per tensor (mergekit's ``slerp``) or one angle over the whole
genome (the M2N2 reference's crossover)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from sparse_merge.errors import check_choice, check_fraction, check_positive
from sparse_merge.evolution.crossover import angle_dots, slerp_
from sparse_merge.merging.base import (
    COMPUTE_DTYPES,
    MergeMethod,
    Segment,
    chunk_len,
    compute_setting,
    weighted_sum_,
    work_dtype,
)

GRANULARITIES = ("tensor", "genome")


class Slerp(MergeMethod):
    """Spherical interpolation of exactly two models, ``t = w_1 / (w_0 + w_1)`` (weights
    ``[1 - t, t]``; ``t = 0`` gives the first model, ``t = 1`` the second).

    Args:
        granularity: ``tensor``: one angle per tensor, as mergekit 0.1.5's ``slerp`` (the
            vectors are normalised for the angle; linear interpolation when
            ``|cos| > dot_threshold``); ``genome``: one angle over the whole genome, the M2N2
            reference's variant (``sparse_merge.evolution.crossover.slerp_``, which falls back
            to linear interpolation only when ``sin`` of the angle is at most 1e-6, as the
            reference does, and ignores ``dot_threshold`` and ``eps``). Segments only matter for ``tensor``.
        dot_threshold: ``|cos|`` above which a tensor is interpolated linearly, in [0, 1).
        eps: norms at or below it count as 1 (zero tensors), > 0.
        compute_dtype: for bfloat16 and float16 models, ``input`` (the default) or
            ``float32``. ``genome``'s interpolation runs in the genomes' dtype, each op
            rounded, as the M2N2 reference does, or with ``float32`` both ops in float32,
            rounded once; ``tensor`` accumulates in float32 and rounds once either way, as
            mergekit computes SLERP in float32.

    The angle's dot products are float32 over chunks summed in float64 (mergekit: float32
    sums); for bfloat16 models on the CPU one fused pass (``kernels.dots3``: exact products,
    float32 sums of 64 per lane added in float64 in a fixed order, the same bits on every CPU,
    closer to the exact dots than the BLAS sums). The interpolation runs in float32 (float64
    for float64 inputs) like mergekit's.
    """

    name = "slerp"

    def __init__(
        self,
        granularity: str = "tensor",
        dot_threshold: float = 0.9995,
        eps: float = 1e-8,
        compute_dtype: str = "input",
    ) -> None:
        self.granularity = check_choice("granularity", granularity, GRANULARITIES)
        self.dot_threshold = check_fraction("dot_threshold", dot_threshold)
        self.eps = float(check_positive("eps", eps))
        self.compute_dtype = check_choice("compute_dtype", compute_dtype, COMPUTE_DTYPES)

    def describe(self) -> dict[str, object]:
        """``slerp`` and its settings."""
        return {
            "name": self.name,
            "granularity": self.granularity,
            "dot_threshold": self.dot_threshold,
            "eps": self.eps,
            **compute_setting(self.compute_dtype),
        }

    def interpolation(self, weights: Sequence[float]) -> float:
        """``t = w_1 / (w_0 + w_1)`` of the two weights."""
        if len(weights) != 2:
            raise ValueError(f"slerp merges exactly two models, got {len(weights)} weights")
        total = float(weights[0]) + float(weights[1])
        if total == 0.0:
            raise ValueError(f"slerp: weights {list(weights)} sum to 0")
        return float(weights[1]) / total

    def traffic_floor(self, n_models: int) -> int:
        """5 genomes: the angle needs ``a.b``, ``|a|^2`` and ``|b|^2`` before anything is
        written (one pass reading both models), then one pass reading both and writing ``out``.
        Reaches ~0.6 on one core of a 2-core EPYC in float32 (make bench): the three BLAS dots
        per chunk cost ~1.5 passes (kept as the published results were computed), and the
        interpolation is one fused pass (``merging.kernels``); bfloat16 ~0.75 (the dots are
        one fused pass, ``kernels.dots3``)."""
        return n_models + n_models + 1

    def merge_into_(
        self,
        out: Tensor,
        base: Tensor | None,
        tensors: Sequence[Tensor],
        weights: Sequence[float],
        rng: torch.Generator | None = None,
    ) -> Tensor:
        """SLERP of the two ``tensors`` with one angle for this tensor (base ignored), written
        into ``out``: the dot products in one pass, then ``weighted_sum_`` in another."""
        t = self.interpolation(weights)
        x, y = (v.view(-1) for v in tensors)  # [n]
        if self.granularity == "genome":
            slerp_(out.view(-1), x, y, t, work=work_dtype(self.compute_dtype, x.dtype))
            return out
        ca, cb = 1.0 - t, t
        if x.numel() > 0:
            ab, aa, bb = angle_dots(x, y)
            na, nb = math.sqrt(aa), math.sqrt(bb)
            na, nb = (na if na > self.eps else 1.0), (nb if nb > self.eps else 1.0)
            cos = min(max(ab / (na * nb), -1.0), 1.0)
            if math.isnan(cos):  # a NaN or infinity in either tensor: NaN, as mergekit gives
                ca = cb = math.nan
            elif abs(cos) <= self.dot_threshold:
                theta = math.acos(cos)
                ca = math.sin((1.0 - t) * theta) / math.sin(theta)
                cb = math.sin(t * theta) / math.sin(theta)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        acc = self.scratch("acc", (chunk_len(x.numel()),), dtype, x.device)
        weighted_sum_(out.view(-1), [x, y], [ca, cb], scratch=acc)
        return out

    @torch.no_grad()
    def merge_(
        self,
        out: Tensor,
        base: Tensor | None,
        genomes: Sequence[Tensor],
        weights: Sequence[float],
        *,
        segments: Sequence[Segment] | None = None,
        split: int | None = None,
        rng: torch.Generator | None = None,
    ) -> Tensor:
        """Per tensor: the shared driver; per genome: ``slerp_`` with ``t`` on ``[:split]``
        and ``1 - t`` after it."""
        if self.granularity == "tensor":
            return super().merge_(
                out, base, genomes, weights, segments=segments, split=split, rng=rng
            )
        self.check_inputs(None, genomes, weights)
        t = self.interpolation(weights)
        a, b = genomes
        if out.shape != a.shape or a.dim() != 1:
            raise ValueError(f"slerp: out {tuple(out.shape)} and genomes {tuple(a.shape)}: not [P]")
        return slerp_(out, a, b, t, split, work_dtype(self.compute_dtype, a.dtype))
