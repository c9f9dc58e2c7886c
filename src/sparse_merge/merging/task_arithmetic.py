"""Generalized task arithmetic (mergekit 0.1.5's ``GeneralizedTaskArithmeticMerge``) as one
class: task arithmetic, TIES, DARE, Model Breadcrumbs and DELLA are its settings
(``conf/merge/*.yaml``).

Per tensor: task vectors ``d_i = x_i - base``, each sparsified on its own (``sparsification``
with ``density``), scaled by its weight ``w_i``; optionally a sign consensus keeps, per
element, only the entries agreeing with the elected sign; the sum is optionally divided by the
sum of the weights that contributed (``normalize``), scaled by ``lambda_`` and added to the
base.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import MappingProxyType

import torch
from torch import Tensor

from sparse_merge.errors import ConfigError, check_choice, check_fraction
from sparse_merge.merging.base import MergeMethod

SPARSIFICATIONS = ("none", "magnitude", "random", "magnitude_outliers", "rank_magnitude")
CONSENSUS = ("none", "sum", "count")
RANDOM_SPARSIFICATIONS = ("random", "rank_magnitude")
RESCALE_EPS = 1e-7  # mergekit: no rescaling when either L1 norm is below it
DIVISOR_EPS = 1e-8  # mergekit: a weight sum below it (no consensus) divides by 1 instead
SELECT_SAMPLE = 1 << 14  # sample size that brackets a top-k threshold
SAME_SIZE_INT = MappingProxyType(
    {
        torch.float64: torch.int64,
        torch.float32: torch.int32,
        torch.float16: torch.int16,
        torch.bfloat16: torch.int16,
    }
)

# (sparsification, consensus) -> mergekit's method name, for logs and reports
MERGEKIT_NAMES = MappingProxyType(
    {
        ("none", "none"): "task_arithmetic",
        ("magnitude", "sum"): "ties",
        ("random", "none"): "dare_linear",
        ("random", "sum"): "dare_ties",
        ("magnitude_outliers", "none"): "breadcrumbs",
        ("magnitude_outliers", "sum"): "breadcrumbs_ties",
        ("rank_magnitude", "sum"): "della",
        ("rank_magnitude", "none"): "della_linear",
    }
)


def _kth_smallest(v: Tensor, r: int) -> Tensor:
    """The ``r``-th smallest value of a flat ``v`` (``1 <= r <= v.numel()``): a strided sample
    brackets it, and the exact value is selected among the entries inside the bracket (a few
    percent of them); when the bracket misses, a full ``kthvalue``. Several times faster
    than ``topk``/``kthvalue`` on multi-million-element tensors."""
    n = v.numel()
    if n <= 4 * SELECT_SAMPLE:
        return torch.kthvalue(v, r).values
    sample = torch.sort(v[:: n // SELECT_SAMPLE]).values  # [m]
    m, q = sample.numel(), r / n
    margin = 6 * math.sqrt(q * (1 - q) / m) + 2 / m  # 6 standard errors of the quantile
    lo_i, hi_i = math.floor((q - margin) * m), math.ceil((q + margin) * m)
    below, inside = 0, None  # entries under the bracket; mask of those inside it
    if lo_i >= 0:
        below = int((v < sample[lo_i]).count_nonzero())
        inside = v >= sample[lo_i]
    if hi_i < m:
        le = v <= sample[hi_i]
        inside = le if inside is None else inside.logical_and_(le)
    band = v if inside is None else v[inside]  # [b]
    if below < r <= below + band.numel():
        return torch.kthvalue(band, r - below).values
    return torch.kthvalue(v, r).values


def _kth(v: Tensor, k: int, largest: bool) -> Tensor:
    """The ``k``-th largest (or smallest) value of a flat ``v``, ``1 <= k <= v.numel()``."""
    return _kth_smallest(v, v.numel() - k + 1 if largest else k)


def first_k_mask(v: Tensor, k: int, largest: bool) -> Tensor:
    """Bool mask [n] of the first ``k`` entries of a flat ``v`` [n] in a stable sort,
    descending when ``largest``: entries tied at the threshold go to the lowest indices."""
    n = v.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=v.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=v.device)
    thr = _kth(v, k, largest)
    keep = v >= thr if largest else v <= thr  # [n]
    extra = int(keep.count_nonzero()) - k
    if extra > 0:  # ties at the threshold: drop the last `extra` of them by index
        tied = (v == thr).nonzero().view(-1)  # [T]
        keep[tied[tied.numel() - extra :]] = False
    return keep


def _mask_(t: Tensor, mask: Tensor, rescale: bool) -> Tensor:
    """``t *= mask`` in place, with ``rescale`` scaled back to ``t``'s L1 norm before masking
    (mergekit's ``rescaled_masked_tensor`` with ``RescaleNorm.l1``, same arithmetic)."""
    before = t.abs().sum() if rescale else None
    t.mul_(mask)
    if before is None:
        return t
    after = t.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return t
    return t.mul_(before / after)


def _work_dtype(t: Tensor) -> torch.dtype:
    """mergekit's dtype for random masks: float32 on CPU except for bfloat16."""
    if t.device.type != "cpu" or t.dtype == torch.bfloat16:
        return t.dtype
    return torch.float32


class TaskArithmetic(MergeMethod):
    """mergekit 0.1.5's generalized task arithmetic; one class, the named methods are settings.

    Args:
        sparsification: how each task vector is thinned before merging, per tensor:
            ``none``; ``magnitude`` (TIES: keep the ``k = max(1, int(density * numel))``
            largest ``|d|``); ``random`` (DARE: keep each entry with probability ``density``);
            ``magnitude_outliers`` (Model Breadcrumbs: drop the ``int(gamma * numel)``
            largest ``|d|`` and the smallest, keeping ``int(density * numel)``);
            ``rank_magnitude`` (DELLA: keep with probability rising linearly with the rank of
            ``|d|`` in its row, from ``density - epsilon`` to ``density + epsilon``).
        consensus: ``none``; ``sum`` (TIES: per element, the sign of the weighted sum of the
            task vectors, ``>= 0`` counting as positive, and only entries of that sign are
            merged); ``count`` (the sign of the majority of the entries).
        density: the fraction of each task vector kept, in [0, 1]; 1 disables sparsification.
        normalize: divide the merged task vector by the sum of the weights (with consensus:
            per element, of the entries kept; a zero sum divides by 1).
        rescale: scale each sparsified task vector back to its L1 norm before sparsification
            (mergekit 0.1.5's rescaling; for DARE this replaces the paper's ``1 / density``).
        lambda_: scale of the merged task vector (mergekit's ``lambda``).
        gamma: Model Breadcrumbs's fraction of outliers removed, in [0, 1].
        epsilon: DELLA's half-width of the keep probabilities; ``density - epsilon`` and
            ``density + epsilon`` must lie in (0, 1) when ``0 < density < 1``.

    Deliberate differences from mergekit: random masks come from the ``torch.Generator``
    passed in (so a seeded merge is reproducible; with ``rng`` seeded like mergekit's global
    RNG the masks are the same); ties at the top-k threshold keep the lowest indices (mergekit's
    ``argsort`` breaks ties arbitrarily beyond 16 elements; on smaller tensors the two agree);
    DELLA on a tensor whose rows have one element keeps with probability ``density`` (mergekit
    divides 0 by 0 there); ``density`` is one float for all models.
    """

    needs_base = True

    def __init__(
        self,
        sparsification: str = "none",
        consensus: str = "none",
        density: float = 1.0,
        normalize: bool = False,
        rescale: bool = False,
        lambda_: float = 1.0,
        gamma: float = 0.01,
        epsilon: float = 0.15,
    ) -> None:
        self.sparsification = check_choice(
            "sparsification",
            "none" if sparsification is None else sparsification,
            SPARSIFICATIONS,
        )
        self.consensus = check_choice(
            "consensus", "none" if consensus is None else consensus, CONSENSUS
        )
        self.density = check_fraction("density", density, upper_open=False)
        self.normalize = bool(check_choice("normalize", normalize, (True, False)))
        self.rescale = bool(check_choice("rescale", rescale, (True, False)))
        if not isinstance(lambda_, (int, float)) or not math.isfinite(lambda_):
            raise ConfigError("lambda_", lambda_, "a finite number")
        self.lambda_ = float(lambda_)
        self.gamma = check_fraction("gamma", gamma, upper_open=False)
        self.epsilon = check_fraction("epsilon", epsilon)
        d, e = self.density, self.epsilon
        if self.sparsification == "rank_magnitude" and 0 < d < 1 and not (d - e > 0 and d + e < 1):
            raise ConfigError(
                "epsilon",
                epsilon,
                f"density - epsilon and density + epsilon inside (0, 1), "
                f"i.e. epsilon < {min(d, 1 - d):g} for density={d:g}",
            )

    @property
    def name(self) -> str:  # type: ignore[override]
        """mergekit's name for these settings (``task_arithmetic``, ``ties``, ``dare_ties``...)."""
        return MERGEKIT_NAMES.get((self.sparsification, self.consensus), "task_arithmetic")

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """Whether merging draws random masks (DARE, DELLA with ``density < 1``)."""
        return self.sparsification in RANDOM_SPARSIFICATIONS and self.density < 1

    def describe(self) -> dict[str, object]:
        """mergekit's name and every setting."""
        return {
            "name": self.name,
            "sparsification": self.sparsification,
            "consensus": self.consensus,
            "density": self.density,
            "normalize": self.normalize,
            "rescale": self.rescale,
            "lambda_": self.lambda_,
            "gamma": self.gamma,
            "epsilon": self.epsilon,
        }

    def sparsify_(self, delta: Tensor, rng: torch.Generator | None) -> Tensor:
        """Thin one task vector (any shape) in place by ``sparsification``; returns it."""
        kind, density = self.sparsification, self.density
        if kind == "none" or density >= 1:
            return delta
        if kind in RANDOM_SPARSIFICATIONS and rng is None:
            raise ValueError(f"{self.name}: random masks need a torch.Generator (rng)")
        n = delta.numel()
        if kind == "magnitude":
            if density <= 0 or n == 0:
                return delta.zero_()
            k = max(1, int(density * n))
            keep = first_k_mask(delta.abs().reshape(-1), k, largest=True)  # [n]
            return _mask_(delta, keep.view(delta.shape), self.rescale)
        if kind == "magnitude_outliers":
            target, top = int(density * n), int(self.gamma * n)
            bottom = max(0, n - target - top)
            mag = delta.abs().reshape(-1)  # [n]
            # ranks [bottom, bottom + target) of the stable ascending sort of |d|
            keep = first_k_mask(mag, bottom + target, largest=False)
            keep &= ~first_k_mask(mag, bottom, largest=False)
            del mag
            return _mask_(delta, keep.view(delta.shape), self.rescale)
        if kind == "rank_magnitude" and density <= 0:
            return delta.zero_()
        work = _work_dtype(delta)
        t = delta if delta.dtype == work else delta.to(work)
        if kind == "random":
            mask = torch.bernoulli(torch.full_like(t, density), generator=rng)
        else:  # rank_magnitude (DELLA)
            mask = self._della_mask(t, rng)
        _mask_(t, mask, self.rescale)
        return delta if t is delta else delta.copy_(t)

    def _della_mask(self, t: Tensor, rng: torch.Generator) -> Tensor:
        """DELLA's random keep mask (0/1 in ``t``'s dtype): probability
        ``density - epsilon + 2 epsilon * rank / (m - 1)`` for the entry of rank ``rank`` (0:
        smallest ``|t|``) among the ``m`` of its row (along dim 1; a vector is one row)."""
        rows = t if t.dim() >= 2 else t.reshape(1, -1)  # [R, m, ...]
        m = rows.shape[1]
        mag = rows.abs()  # [R, m, ...]; |x| >= 0 orders like its bits, and integers sort faster
        keys = mag.view(SAME_SIZE_INT[mag.dtype]) if mag.dtype in SAME_SIZE_INT else mag
        order = torch.sort(keys, dim=1, stable=True).indices  # [R, m, ...]
        del mag, keys
        arange = torch.arange(m, device=t.device).view(1, m, *([1] * (rows.dim() - 2)))
        ranks = torch.empty_like(order).scatter_(1, order, arange.expand_as(order))
        del order
        if m > 1:  # mergekit's arithmetic, step by step, so the probabilities are identical
            ranks = ranks.to(t.dtype) + 1
            lo, hi = ranks.amin(dim=1, keepdim=True), ranks.amax(dim=1, keepdim=True)
            rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
        else:
            rank_norm = torch.full(ranks.shape, 0.5, dtype=t.dtype, device=t.device)
        del ranks
        probs = (self.density - self.epsilon) + rank_norm * 2 * self.epsilon
        return torch.bernoulli(probs, generator=rng).view(t.shape)

    def merge_tensor(
        self,
        base: Tensor | None,
        tensors: Sequence[Tensor],
        weights: Sequence[float],
        rng: torch.Generator | None = None,
    ) -> Tensor:
        """``base + lambda_ * merge(sparsify(x_i - base) * w_i)`` for one tensor."""
        self.check_inputs(base, tensors, weights)
        assert base is not None
        dtype, n = base.dtype, len(tensors)
        deltas = torch.empty((n, *base.shape), dtype=dtype, device=base.device)  # [N, *S]
        for row, x in zip(deltas, tensors):
            self.sparsify_(torch.sub(x, base, out=row), rng)
        w = torch.tensor([float(x) for x in weights], dtype=dtype, device=base.device)
        w = w.view(n, *([1] * base.dim()))  # [N, 1, ...], rounded to the dtype as mergekit
        deltas.mul_(w)
        if self.consensus != "none":
            votes = deltas.sum(dim=0) if self.consensus == "sum" else deltas.sign().sum(dim=0)
            sign = (votes >= 0).to(dtype).mul_(2).sub_(1)  # [*S] elected sign, +1 on a tie
            del votes
            keep = torch.mul(deltas, sign).gt_(0)  # [N, *S] 1.0 where d_i has that sign
            del sign
            # sum_i w_i keep_i, as one small matmul (float masks: no slow bool kernels)
            divisor = torch.mm(w.view(1, n), keep.view(n, -1)).view(base.shape)  # [*S]
            divisor[divisor == 0] = 1
            mixed = deltas.mul_(keep).sum(dim=0)  # [*S]
        else:
            mixed = deltas.sum(dim=0)  # [*S]
            divisor = w.sum()
            if divisor.abs() < DIVISOR_EPS:
                divisor = torch.ones_like(divisor)
        del deltas
        if self.normalize:
            mixed /= divisor
        if self.lambda_ != 1:
            mixed *= self.lambda_
        return mixed.add_(base).to(dtype)
