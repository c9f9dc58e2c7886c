"""Generalized task arithmetic (mergekit 0.1.5's ``GeneralizedTaskArithmeticMerge``) as one
class: task arithmetic, TIES, DARE, Model Breadcrumbs and DELLA are its settings
(``conf/merge/*.yaml``).

Per tensor: task vectors ``d_i = x_i - base``, each sparsified on its own (``sparsification``
with ``density``), scaled by its weight ``w_i``; optionally a sign consensus keeps, per
element, only the entries agreeing with the elected sign; the sum is optionally divided by the
sum of the weights that contributed (``normalize``), scaled by ``lambda_`` and added to the
base.

The merge streams (``merging.base``): what a sparsification needs from the whole tensor (the
top-k thresholds of ``|d_i|``, DELLA's per-row ranks, the L1 norms of ``rescale``) is found in
a first pass over its chunks, the random keep masks drawn in mergekit's order and kept as bits;
a second pass merges chunk by chunk into the output, with mergekit's arithmetic, bit for bit
(but for the L1 norms of a tensor past one chunk: float32 per chunk, added in float64, where
mergekit sums the whole tensor in float32; ``docs/merging.md``).
The selection and sorting run in numpy on integer views of the floats (SIMD sorts and
partitions, an order of magnitude faster than torch's on the CPU). For two models of one
dtype on the CPU, TIES, Model Breadcrumbs and DARE with counter draws (``draws="counter"``)
run both passes as fused numba loops (``merging.kernels``), with the same results.
"""

from __future__ import annotations

import bisect
import functools
import math
import struct
from collections.abc import Callable, Sequence
from types import MappingProxyType

import numpy as np
import torch
from torch import Tensor

from sparse_merge.errors import ConfigError, check_choice, check_finite, check_fraction
from sparse_merge.merging import kernels
from sparse_merge.merging.base import (
    CHUNK,
    COMPUTE_DTYPES,
    MergeMethod,
    chunk_len,
    chunks,
    compute_setting,
    work_dtype,
)

SPARSIFICATIONS = ("none", "magnitude", "random", "magnitude_outliers", "rank_magnitude")
CONSENSUS = ("none", "sum", "count")
DRAWS = ("torch", "counter")
RANDOM_SPARSIFICATIONS = ("random", "rank_magnitude")
MAGNITUDE_SPARSIFICATIONS = ("magnitude", "magnitude_outliers")
RESCALE_EPS = 1e-7  # mergekit: no rescaling when either L1 norm is below it
DIVISOR_EPS = 1e-8  # mergekit: a weight sum below it (no consensus) divides by 1 instead
SELECT_SAMPLE = 1 << 14  # sample size that brackets a top-k threshold
FUSED_SAMPLE = 1 << 16  # the most the fused selection pass samples (8 sqrt(n) below that)
INT32_MAX = (1 << 31) - 1
SAME_SIZE_INT = MappingProxyType(
    {
        torch.float64: torch.int64,
        torch.float32: torch.int32,
        torch.float16: torch.int16,
        torch.bfloat16: torch.int16,
    }
)
STRUCT_FORMATS = MappingProxyType(  # struct's (int, float) formats of a dtype's bits
    {torch.float64: ("q", "d"), torch.float32: ("i", "f"), torch.float16: ("h", "e")}
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


def _sum(v: Tensor, dtype: torch.dtype | None = None) -> float:
    """``v.sum()`` accumulated in ``dtype`` (default float32, float64 for float64), as a
    Python float."""
    if dtype is None:
        dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    return float(v.sum(dtype=dtype))


def _keys(v: Tensor, signed: bool = False) -> np.ndarray:
    """Floats ``v`` as integers that order like them, on the host (a numpy view on the CPU):
    the bits of a non-negative float order like its value; ``signed`` also maps negative
    values (and -0.0 to +0.0). Selection on these runs in numpy's vectorised sorts and
    partitions, an order of magnitude faster than torch's on the CPU."""
    if not v.is_floating_point():
        return v.cpu().numpy()
    int_dtype = SAME_SIZE_INT[v.dtype]
    if not signed:
        return v.view(int_dtype).cpu().numpy()
    keys = (v + 0.0).view(int_dtype).cpu().numpy()  # -0.0 + 0.0 = +0.0
    magnitude_bits = np.iinfo(keys.dtype).max
    return keys ^ ((keys >> (keys.itemsize * 8 - 1)) & magnitude_bits)  # negatives reversed


def _value(key: int, dtype: torch.dtype, signed: bool = False) -> float:
    """The float whose ``_keys`` is ``key``."""
    if not dtype.is_floating_point:
        return key
    int_dtype = SAME_SIZE_INT[dtype]
    if signed and key < 0:
        key ^= torch.iinfo(int_dtype).max
    if dtype == torch.bfloat16:  # the upper half of a float32
        return struct.unpack("f", struct.pack("I", (key & 0xFFFF) << 16))[0]
    int_format, float_format = STRUCT_FORMATS[dtype]  # struct: 10x faster than a torch tensor
    return struct.unpack(float_format, struct.pack(int_format, key))[0]


def _sample(
    keys: Callable[[int], np.ndarray], n: int, size: int | None = None
) -> np.ndarray | None:
    """The sorted strided sample of about ``size`` keys (``keys(step)``: every ``step``-th
    key; default ``SELECT_SAMPLE``) that brackets the quantiles of ``n`` keys; None when they
    are few enough to select from directly."""
    size = SELECT_SAMPLE if size is None else size
    return np.sort(keys(n // size)) if n > 4 * size else None


def _settle(
    r: int, below: int, band: np.ndarray, work: np.ndarray | None = None
) -> tuple[int, int, int] | None:
    """The ``r``-th smallest key (1-based) of a set of which ``below`` keys lie below the
    ``band`` of keys around it, as (key, keys below it, keys equal to it); None when it is
    not in the band. ``band`` is left as it is: the selection runs on a copy, in ``work``
    (at least as long, of its dtype) when given (reused, it spares the page faults of a
    fresh copy, about a third of the time on large bands)."""
    r -= below
    if not 0 < r <= band.size:
        return None
    if work is None:
        work = np.empty_like(band)
    part = work[: band.size]
    np.copyto(part, band)
    part.partition(r - 1)
    key = int(part[r - 1])
    smaller, equal = kernels.key_counts(part, key)
    return key, below + smaller, equal


class _Select:
    """The ``r``-th smallest (1-based) of ``n`` integer keys fed chunk by chunk, in index
    order, keeping a few percent of them: a sorted strided ``sample`` brackets it, every chunk
    adds its count below the bracket and its keys inside, and the exact key is selected among
    those (``numpy.partition``). Without a sample every key is kept."""

    def __init__(self, n: int, r: int, sample: np.ndarray | None = None) -> None:
        self.n, self.r = n, r
        self.below = self.equal = self.kept = 0
        self.band: list[np.ndarray] = []
        self.lo: int | None = None
        self.hi: int | None = None
        self.overflow = False
        if sample is not None:
            m, q = sample.size, r / n
            margin = 6 * math.sqrt(q * (1 - q) / m) + 2 / m  # 6 standard errors of the quantile
            lo_i, hi_i = math.floor((q - margin) * m), math.ceil((q + margin) * m)
            self.lo = int(sample[lo_i]) if lo_i >= 0 else None
            self.hi = int(sample[hi_i]) if hi_i < m else None

    def feed(self, keys: np.ndarray) -> None:
        """Take the keys [c] of the next chunk."""
        lo, hi = self.lo, self.hi
        if self.overflow:
            return
        if lo is None and hi is None:
            self.band.append(keys.copy())
            return
        if lo is not None and lo == hi:  # one value (ties) brackets it: counts suffice
            self.below += int(np.count_nonzero(keys < lo))
            self.equal += int(np.count_nonzero(keys == lo))
            return
        if lo is None:
            inside = keys <= hi
        else:
            below = keys < lo
            self.below += int(np.count_nonzero(below))
            inside = ~below if hi is None else np.not_equal(below, keys <= hi)  # lo <= k <= hi
        band = keys[inside]  # [b]
        self.kept += band.size
        if self.kept > max(self.n // 8, 4 * SELECT_SAMPLE):  # ties, a bad sample: give up
            self.overflow, self.band = True, []
        else:
            self.band.append(band)

    def result(self) -> tuple[int, int, int] | None:
        """(the key, keys below it, keys equal to it), or None when the bracket missed it
        (then select again without a sample)."""
        if self.overflow:
            return None
        if self.lo is not None and self.lo == self.hi:
            found = self.below < self.r <= self.below + self.equal
            return (self.lo, self.below, self.equal) if found else None
        band = np.concatenate(self.band) if len(self.band) != 1 else self.band[0]  # [b]
        return _settle(self.r, self.below, band)


def _select(
    keys_of: Callable[[int, int], np.ndarray], n: int, r: int, sample: np.ndarray | None
) -> tuple[int, int, int]:
    """``_Select.result()`` for the keys ``keys_of(s, e)`` of chunks ``[s, e)``; when the
    bracket misses, again keeping every key (temporaries of ``n`` keys)."""
    select = _Select(n, r, sample)
    for s, e in chunks(n):
        select.feed(keys_of(s, e))
    found = select.result()
    return found if found is not None else _select(keys_of, n, r, None)


class _Cut:
    """The ``k`` entries of a flat ``v`` [n] that come first in a stable sort (descending
    when ``largest``): those beyond the ``k``-th value ``at[0]`` and, of the ``at[2]`` entries
    equal to it, the first ones by index; ``at[1]`` entries are below it."""

    def __init__(
        self, k: int, n: int, largest: bool, at: tuple[float, int, int] | None = None
    ) -> None:
        self.k, self.n, self.largest = k, n, largest
        self.value, self.ties, self.budget, self.seen = 0.0, 0, 0, 0
        self.end: int | None = None  # one past the last tied entry kept, where known
        if 0 < k < n:
            assert at is not None
            self.value, below, self.ties = at
            ahead = n - below - self.ties if largest else below
            self.budget = k - ahead  # tied entries kept, in 1..ties
            if math.isnan(self.value) and not largest:  # NaN sorts last (as in argsort): the
                self.value, self.budget = math.inf, self.ties  # first k hold every number

    def mask(self, v: Tensor, start: int, out: Tensor) -> Tensor:
        """1.0 where the chunk ``v`` [c] starting at ``start`` is kept, else 0.0, into
        ``out`` [c]; chunks come in index order (``start == 0`` begins a new pass)."""
        if self.k <= 0:
            return out.zero_()
        if self.k >= self.n:
            return out.fill_(1)
        all_ties = self.budget == self.ties
        if self.largest:
            (torch.ge if all_ties else torch.gt)(v, self.value, out=out)
        else:
            (torch.le if all_ties else torch.lt)(v, self.value, out=out)
        if not all_ties:
            self.seen = 0 if start == 0 else self.seen
            left = self.budget - self.seen
            if left > 0:
                tied = (v == self.value).nonzero().view(-1)  # [T], in index order
                self.seen += tied.numel()
                out[tied[:left]] = 1
        return out


def _rank(k: int, n: int, largest: bool) -> int:
    """The ascending 1-based rank of the ``k``-th entry of a sort (descending when
    ``largest``)."""
    return n - k + 1 if largest else k


def first_k_mask(v: Tensor, k: int, largest: bool) -> Tensor:
    """Bool mask [n] of the first ``k`` entries of a flat ``v`` [n] in a stable sort,
    descending when ``largest``: entries tied at the threshold go to the lowest indices."""
    n = v.numel()
    at = None
    if 0 < k < n:
        sample = _sample(lambda step: _keys(v[::step], signed=True), n)
        key, below, equal = _select(
            lambda s, e: _keys(v[s:e], signed=True), n, _rank(k, n, largest), sample
        )
        at = (_value(key, v.dtype, signed=True), below, equal)
    out = torch.empty(n, dtype=v.dtype if v.is_floating_point() else torch.float32)
    cut = _Cut(k, n, largest, at)
    for s, e in chunks(n):
        cut.mask(v[s:e], s, out[s:e])
    return out.bool()


def _band(plan: _KeepAll | _KeepCuts, base: Tensor, x: Tensor, work: torch.dtype) -> tuple:
    """A plan's keep rule as a band of magnitudes, as ``kernels.magnitude_merge2_`` takes it:
    ``(lo, hi, lo_ties, hi_ties)``, an entry kept when ``lo < |d| < hi``, or equal to an end
    with its index in that end's range ``[start, stop)``. TIES keeps above its cut; Model
    Breadcrumbs keeps what its first cut keeps and its second does not (the entries tied at
    the second cut's value beyond the ones it takes). The index of the last tie kept is found
    by a scan (of ``|d|`` computed in ``work``) when only some are kept."""
    n = base.numel()
    everything = (-math.inf, math.inf, (0, n), (0, n))
    if isinstance(plan, _KeepAll):
        return everything

    def ties_taken(cut: _Cut) -> int:  # the tied entries cut takes lie before this index
        if cut.budget == cut.ties:
            return n
        if cut.end is not None:
            return cut.end
        return kernels.tie_end(base, x, cut.value, cut.budget, work)

    nothing = (math.inf, math.inf, (0, 0), (0, 0))
    first = plan.cuts[0]
    if first.k <= 0:
        return nothing
    if first.largest:  # TIES: the k largest
        if first.k >= n:
            return everything
        return (first.value, math.inf, (0, ties_taken(first)), (0, n))
    hi, hi_ties = (math.inf, (0, n)) if first.k >= n else (first.value, (0, ties_taken(first)))
    second = plan.cuts[1]
    if second.k >= n:
        return nothing
    if second.k <= 0:
        return (-math.inf, hi, (0, n), hi_ties)
    return (second.value, hi, (ties_taken(second), n), hi_ties)


def _pack(mask: Tensor) -> Tensor:
    """A 0/1 mask [c] (bool or float) as bits, uint8 [ceil(c / 8)] on the CPU
    (``numpy.packbits``, little bit order): one eighth of a byte per entry."""
    if mask.dtype in SAME_SIZE_INT:  # +0.0 is the only float with no bits set
        mask = mask.view(SAME_SIZE_INT[mask.dtype])
    return torch.from_numpy(np.packbits(mask.cpu().numpy() != 0, bitorder="little"))


def _unpack(bits: Tensor, start: int, out: Tensor) -> Tensor:
    """Entries ``[start, start + c)`` (``start`` a multiple of 8) of a mask packed by
    ``_pack`` into ``out`` [c] as 0.0/1.0."""
    c = out.numel()
    part = bits[start // 8 : (start + c + 7) // 8].numpy()
    keep = np.unpackbits(part, count=c, bitorder="little")  # uint8 0/1 [c]
    if out.device.type == "cpu" and out.dtype in (torch.float32, torch.float64):
        np.copyto(out.numpy(), keep)  # numpy converts uint8 to float several times faster
        return out
    return out.copy_(torch.from_numpy(keep))


def _bernoulli(p: Tensor | float, shape: tuple[int, ...], rng: torch.Generator) -> Tensor:
    """``torch.bernoulli(p)`` as float32 0/1 (``p``: a tensor of ``shape``, or one float in the
    dtype of the masked tensor), the same draws from ``rng``: on the CPU Bernoulli compares
    one float32 uniform per entry with ``p``, and so does this, five times faster."""
    if rng.device.type == "cpu":
        draws = torch.rand(shape, generator=rng)
        if isinstance(p, Tensor):
            return torch.lt(draws, p.cpu(), out=draws).to(p.device)
        return torch.lt(draws, p, out=draws)
    probs = p if isinstance(p, Tensor) else torch.full(shape, p, device=rng.device)
    return torch.bernoulli(probs, generator=rng).float()


def _bernoulli_bits(p: float | Tensor, n: int, rng: torch.Generator) -> Tensor:
    """``torch.bernoulli`` of ``n`` entries with probability ``p`` (one float, or a tensor of
    ``n``) from ``rng``, packed as bits (``_pack``): ``kernels.bernoulli_bits`` where it can;
    else with torch, a tensor of probabilities whole (DELLA's blocks of rows), one float
    chunk by chunk."""
    bits = kernels.bernoulli_bits(rng, p, n)
    if bits is not None:
        return bits
    if isinstance(p, Tensor):
        return _pack(_bernoulli(p, tuple(p.shape), rng))
    return torch.cat([_pack(_bernoulli(p, (e - s,), rng)) for s, e in chunks(n)])


def _int64(c: int) -> int:
    """A 64-bit constant as the signed int64 with its bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shift_right(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 ``z`` (torch's ``>>`` is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def counter_uniform(
    seed: int, start: int, count: int, device: torch.device | str = "cpu"
) -> Tensor:
    """Draws ``start .. start + count - 1`` of the counter-based stream ``seed`` as float32 in
    [0, 1) [count]: draw ``i`` is the ``i + 1``-th output of SplitMix64 (Steele, Lea & Flood
    2014; Java's ``SplittableRandom``) seeded with ``seed``, its top 24 bits scaled by
    ``2^-24`` (the resolution of ``torch.rand``). Every draw depends on its index only, so a
    fused loop computes the same numbers in any order (``merging._fused.uniform``, the same
    arithmetic in uint64). On the CPU with numba the numba loop fills them (~30x faster);
    the torch form below runs anywhere (int64 products wrap)."""
    if torch.device(device).type == "cpu" and kernels.HAVE_NUMBA:
        return kernels.uniforms(seed, start, count)
    return _counter_uniform_torch(seed, start, count, device)


def _counter_uniform_torch(seed: int, start: int, count: int, device: torch.device | str) -> Tensor:
    """``counter_uniform`` in torch int64 ops."""
    z = torch.arange(start + 1, start + count + 1, dtype=torch.int64, device=device)
    z = z * _int64(0x9E3779B97F4A7C15) + _int64(seed % (1 << 64))
    z = (z ^ _shift_right(z, 30)) * _int64(0xBF58476D1CE4E5B9)
    z = (z ^ _shift_right(z, 27)) * _int64(0x94D049BB133111EB)
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 40).to(torch.float32) * (1.0 / (1 << 24))


def _seeds(rng: torch.Generator, n: int) -> list[int]:
    """``n`` stream seeds (uint64 as Python ints) drawn from ``rng``."""
    drawn = torch.randint(-(1 << 63), (1 << 63) - 1, (n,), dtype=torch.int64, generator=rng)
    return [int(v) % (1 << 64) for v in drawn.tolist()]


def _delta(x: Tensor, b: Tensor, work: torch.dtype) -> Tensor:
    """``x - b`` computed in ``work`` (a new tensor; ``_sub_into``)."""
    return _sub_into(torch.empty(x.shape, dtype=work, device=x.device), x, b)


def _sub_into(out: Tensor, x: Tensor, b: Tensor) -> Tensor:
    """``x - b`` computed in ``out``'s dtype, into ``out``: the inputs upcast (exactly) when
    ``out`` is wider, then one float subtraction, as on upcast copies."""
    if x.dtype == out.dtype:
        return torch.sub(x, b, out=out)
    return out.copy_(x).sub_(b)


def _work_dtype(t: Tensor) -> torch.dtype:
    """mergekit's dtype for random masks: float32 on CPU except for bfloat16."""
    if t.device.type != "cpu" or t.dtype == torch.bfloat16:
        return t.dtype
    return torch.float32


def _rescale(before: float, after: float, dtype: torch.dtype) -> Tensor | None:
    """mergekit's L1 rescaling factor ``before / after`` of a sparsified task vector (sums
    rounded to ``dtype``), or None when either sum is below ``RESCALE_EPS``."""
    b, a = torch.tensor(before, dtype=dtype), torch.tensor(after, dtype=dtype)
    if b < RESCALE_EPS or a < RESCALE_EPS:
        return None
    return b / a


class _KeepAll:
    """A task vector merged whole (no sparsification)."""

    needs_abs = False
    scale = None

    def apply_(self, d: Tensor, a: Tensor, start: int, k: Tensor, k2: Tensor) -> None:
        """Leave the chunk ``d`` as it is."""


class _DropAll:
    """A task vector dropped whole (density 0)."""

    needs_abs = False

    def apply_(self, d: Tensor, a: Tensor, start: int, k: Tensor, k2: Tensor) -> None:
        """Zero the chunk ``d``."""
        d.zero_()


class _KeepCuts:
    """Magnitude sparsification: keep the entries whose ``|d|`` lies in ``cuts[0]`` and not in
    ``cuts[1]`` (TIES: the top k; Model Breadcrumbs: a band of ranks), then rescale."""

    needs_abs = True

    def __init__(self, cuts: list[_Cut], scale: Tensor | None = None) -> None:
        self.cuts, self.scale = cuts, scale

    def keep(self, a: Tensor, start: int, k: Tensor, k2: Tensor) -> Tensor:
        """The 0/1 keep mask of the chunk whose ``|d|`` is ``a``, into ``k``."""
        keep = self.cuts[0].mask(a, start, k)
        if len(self.cuts) > 1:
            keep.sub_(self.cuts[1].mask(a, start, k2))  # the second set is inside the first
        return keep

    def apply_(self, d: Tensor, a: Tensor, start: int, k: Tensor, k2: Tensor) -> None:
        """Mask and rescale the chunk ``d`` in place (``a = |d|``)."""
        d.mul_(self.keep(a, start, k, k2))
        if self.scale is not None:
            d.mul_(self.scale)


class _KeepBits:
    """Random sparsification (DARE, DELLA): keep masks drawn in the first pass, stored as
    bits per block of entries, applied (and rescaled) in the work dtype as mergekit does."""

    needs_abs = False

    def __init__(self, blocks: dict[int, Tensor], work: torch.dtype) -> None:
        self.blocks, self.work, self.scale = blocks, work, None
        self.starts = sorted(blocks)

    def whole(self) -> Tensor | None:
        """The bits of the whole tensor (uint8, on the CPU), the blocks joined; None when a
        block starts inside a byte."""
        if any(start % 8 for start in self.starts):
            return None
        if len(self.starts) == 1:
            return self.blocks[self.starts[0]]
        return torch.cat([self.blocks[start] for start in self.starts])

    def mask(self, start: int, out: Tensor) -> Tensor:
        """The 0/1 mask of the chunk at ``start`` into ``out``; a chunk lies in one block and
        starts at a multiple of 8 from it."""
        block = self.starts[bisect.bisect_right(self.starts, start) - 1]
        return _unpack(self.blocks[block], start - block, out)

    def apply_(self, d: Tensor, a: Tensor, start: int, k: Tensor, k2: Tensor) -> None:
        """Mask and rescale the chunk ``d`` in place."""
        t = d if d.dtype == self.work else d.to(self.work)
        t.mul_(self.mask(start, k if k.dtype == self.work else k.to(self.work)))
        if self.scale is not None:
            t.mul_(self.scale)
        if t is not d:
            d.copy_(t)


class _KeepDraws(_KeepBits):
    """DARE with counter draws: entry ``i`` kept when draw ``i`` of the stream ``seed`` is
    below ``p``; nothing stored, any chunk's mask computed on demand."""

    def __init__(self, seed: int, p: float, work: torch.dtype) -> None:
        super().__init__({}, work)
        self.seed, self.p = seed, p

    def mask(self, start: int, out: Tensor) -> Tensor:
        """The 0/1 mask of the chunk at ``start`` into ``out``."""
        draws = counter_uniform(self.seed, start, out.numel(), out.device)
        return out.copy_(torch.lt(draws, self.p))


class TaskArithmetic(MergeMethod):
    """mergekit 0.1.5's generalized task arithmetic; one class, the named methods are settings.

    Args:
        sparsification: how each task vector is thinned before merging, per tensor:
            ``none``; ``magnitude`` (TIES: keep the ``k = max(1, int(density * numel))``
            largest ``|d|``); ``random`` (DARE: keep each entry with probability ``density``);
            ``magnitude_outliers`` (Model Breadcrumbs: keep the ``int(density * numel)``
            ``|d|`` just below the ``int(gamma * numel)`` largest, fewer of those dropped
            where both do not fit: ranks ``[b, b + int(density * numel))``,
            ``b = max(0, numel - int(density * numel) - int(gamma * numel))``);
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
        draws: where DARE's and DELLA's random draws come from: ``torch`` (mergekit's: one
            ``torch.rand`` uniform per entry from ``rng``'s Mersenne twister, in order; on
            the CPU drawn in numba, ~0.16 ns each, the same stream: ``_bernoulli_bits``) or
            ``counter`` (``counter_uniform``: a SplitMix64 stream per task vector, its seed
            drawn from ``rng``, draw ``i`` a function of ``i`` alone, so the fused kernels
            compute the masks inside the merge loop). The same distribution (Bernoulli from
            a 24-bit uniform); different masks.
        compute_dtype: the dtype of the arithmetic for bfloat16 and float16 tensors:
            ``input`` (mergekit's default: every op in the tensors' dtype, rounded after each
            op as torch does) or ``float32`` (mergekit's ``dtype: float32`` with the model's
            ``out_dtype``: every op in float32 on the upcast tensors, the result rounded once
            into the output's dtype; more accurate, and on the CPU 1.4-1.8x faster for
            bfloat16, where the roundings bound the fused loops). float32 and float64 tensors are
            computed in their own dtype either way.

    Deliberate differences from mergekit: random masks come from the ``torch.Generator``
    passed in (so a seeded merge is reproducible; with ``rng`` seeded like mergekit's global
    RNG the masks are the same); ties at the top-k threshold keep the lowest indices (mergekit's
    ``argsort`` breaks ties arbitrarily beyond 16 elements; on smaller tensors the two agree);
    DELLA on a tensor whose rows have one element keeps with probability ``density`` (mergekit
    divides 0 by 0 there); ``density`` is one float for all models.

    Speed (``traffic_floor``; one core of a 2-core EPYC, float32, 16 M-element genomes,
    ``benchmarks/bench_merge.py``): for two models of one dtype on the CPU, fused numba loops
    (``merging.kernels``), the same bits as the torch path: task arithmetic ~0.9 of its floor
    (4 genomes), TIES ~0.6 and Model Breadcrumbs ~0.5 of 7 genomes (a sampled bracket, one
    pass compressing the keys inside it, an exact order statistic of those, then one merge
    pass), DARE with ``draws="counter"`` ~0.65 of 7 (the masks computed in both loops) and
    with torch's draws ~0.47 (torch's serial stream drawn first, ~0.16 ns per draw, the masks
    kept as bits for both loops); tensors of 2 M entries and more in parts on every thread.
    With more models, or off the CPU, torch ops per chunk: task arithmetic ~0.4, TIES and
    Breadcrumbs ~0.12 (numpy selection, ``_Select``), DARE with torch's draws ~0.1 (torch's
    own sampler, ~2.5 ns per draw). DELLA ~0.04 (a sort of every row of ``|d|``; a 1-D
    tensor, or one cut by the split point, is one row, sorted whole). In bfloat16 the fused
    loops round after every op as torch does, compute-bound at half the bytes: ~0.2 for TIES
    and DARE, ~0.4 for task arithmetic; with ``compute_dtype="float32"`` (one rounding) ~0.3
    for TIES and DARE with counter draws and ~0.7 for task arithmetic.
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
        draws: str = "torch",
        compute_dtype: str = "input",
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
        self.lambda_ = check_finite("lambda_", lambda_)
        self.gamma = check_fraction("gamma", gamma, upper_open=False)
        self.epsilon = check_fraction("epsilon", epsilon)
        self.draws = check_choice("draws", draws, DRAWS)
        self.compute_dtype = check_choice("compute_dtype", compute_dtype, COMPUTE_DTYPES)
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
            "draws": self.draws,
            **compute_setting(self.compute_dtype),
        }

    def traffic_floor(self, n_models: int) -> int:
        """Task arithmetic: one pass reading the base and the models and writing the output
        (``N + 2`` genomes). TIES and Model Breadcrumbs need their top-k thresholds of
        ``|x_i - base|`` per tensor, and ``rescale`` (DARE, DELLA) the L1 norms of the
        sparsified task vectors, before anything is written: one more pass reading the base
        and the models (``2N + 3``)."""
        one_pass = n_models + 2
        if self.density >= 1 or self.sparsification == "none":
            return one_pass
        if self.sparsification in MAGNITUDE_SPARSIFICATIONS or self.rescale:
            return one_pass + n_models + 1
        return one_pass

    @torch.no_grad()
    def merge_into_(
        self,
        out: Tensor,
        base: Tensor | None,
        tensors: Sequence[Tensor],
        weights: Sequence[float],
        rng: torch.Generator | None = None,
    ) -> Tensor:
        """``base + lambda_ * merge(sparsify(x_i - base) * w_i)`` for one tensor, into ``out``.

        A first pass over the tensor finds what the sparsification needs (``_plans``); a
        second merges it chunk by chunk, with every temporary a chunk, the same arithmetic as
        mergekit's on the whole tensor."""
        assert base is not None
        dtype, n_models, n = base.dtype, len(tensors), base.numel()
        work = self._work(dtype)  # the arithmetic's dtype
        b, o = base.view(-1), out.view(-1)  # [n]
        xs = [x.view(-1) for x in tensors]  # [n] each
        inputs_fused = _fusable(tensors, base)  # the plans' pass reads only these
        plans, bounds = self._plans(base, tensors, rng, inputs_fused)
        fused = inputs_fused and out.dtype == dtype and kernels.usable(out)
        w, fixed_divisor, w_floats, fixed_float = self._weights(weights, work, base.device)
        w_col = w.view(n_models, 1)  # [N, 1], rounded to the dtype as mergekit
        plain = self.consensus == "none" and all(isinstance(p, _KeepAll) for p in plans)
        if plain and fused:
            divisor = fixed_float if self.normalize else None  # one fused pass
            kernels.task_arithmetic2_(o, b, *xs, w_floats, divisor, self.lambda_, work)
            return out
        draws = all(isinstance(p, _KeepDraws) for p in plans)
        cuts = all(isinstance(p, (_KeepAll, _KeepCuts)) for p in plans)
        bits = None  # stored masks (torch's draws) as bits of the whole tensor, when fused
        if fused and all(type(p) is _KeepBits and p.work == work for p in plans):
            bits = [p.whole() for p in plans]
            bits = bits if all(v is not None for v in bits) else None
        if (draws or cuts or bits) and fused:
            settings = kernels.MergeSettings(
                w_floats,
                tuple(1.0 if p.scale is None else float(p.scale) for p in plans),
                CONSENSUS.index(self.consensus),
                fixed_float if self.normalize else None,
                self.lambda_,
                work,
            )
            if draws:
                seeds = [p.seed for p in plans]
                kernels.random_merge2_(o, b, *xs, seeds, plans[0].p, settings)
            elif bits:
                kernels.bits_merge2_(o, b, *xs, bits, settings)
            else:
                bands = [_band(p, b, x, work) for p, x in zip(plans, xs)]
                kernels.magnitude_merge2_(o, b, *xs, bands, settings)
            return out
        size = chunk_len(n)
        d = self.scratch("deltas", (n_models, size), work, base.device)  # [N, C]
        a = self.scratch("abs", (n_models, size), work, base.device)  # [N, C] |d|, keep mask
        k, k2, votes, divisor = self.scratch("rows", (4, size), work, base.device)  # [C] each
        if self.consensus != "none" and self.normalize:  # [N, C] w_i keep_i
            weighted = self.scratch("weighted_keep", (n_models, size), work, base.device)
        abs_needed = any(p.needs_abs for p in plans)
        for s, e in bounds:
            c = e - s
            dc, ac = d[:, :c], a[:, :c]
            for i, x in enumerate(xs):
                _sub_into(dc[i], x[s:e], b[s:e])
            if abs_needed:
                torch.abs(dc, out=ac)
            for i, plan in enumerate(plans):
                plan.apply_(dc[i], ac[i], s, k[:c], k2[:c])
            dc.mul_(w_col)
            mixed = votes[:c]
            if self.consensus != "none":
                if self.consensus == "sum":
                    _sum_rows(dc, mixed)
                else:
                    _sum_rows(torch.sign(dc, out=ac), mixed)
                sign = mixed.ge_(0).mul_(2).sub_(1)  # [c] elected sign, +1 on a tie
                keep = torch.mul(dc, sign, out=ac).gt_(0)  # [N, c] 1.0 where d_i has that sign
                if self.normalize:  # sum_i w_i keep_i, summed as mergekit sums it (a matmul
                    # adds in another order: the last bit differs from five models on)
                    wk = torch.mul(keep, w_col, out=weighted[:, :c])
                    div = _sum_rows(wk, divisor[:c])
                    div.add_(torch.eq(div, 0, out=k[:c]))  # a zero sum divides by 1
                _sum_rows(dc.mul_(keep), mixed)
            else:
                _sum_rows(dc, mixed)
                div = fixed_divisor
            if self.normalize:
                mixed.div_(div)
            if self.lambda_ != 1:
                mixed.mul_(self.lambda_)
            torch.add(mixed, b[s:e], out=o[s:e])  # in work, rounded once into out
        return out

    def _work(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype of the arithmetic on tensors of ``dtype`` (``compute_dtype``)."""
        return work_dtype(self.compute_dtype, dtype)

    def _mask_work(self, t: Tensor) -> torch.dtype:
        """The dtype random masks are applied in on tensors like ``t``: float32 when the
        arithmetic is upcast (``compute_dtype="float32"``), else mergekit's (``_work_dtype``)."""
        work = self._work(t.dtype)
        return _work_dtype(t) if work == t.dtype else work

    def _mask_delta_(self, out: Tensor, x: Tensor, b: Tensor) -> Tensor:
        """The task vector ``x - b`` into ``out``, whose dtype is the masks' (``_mask_work``):
        computed in it where that is the arithmetic's dtype; else, as mergekit does, in the
        models' dtype and then cast (a float32 copy of a float16 task vector on the CPU)."""
        if out.dtype in (x.dtype, self._work(x.dtype)):
            return _sub_into(out, x, b)
        return out.copy_(x - b)

    def _weights(
        self, weights: Sequence[float], dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor, Tensor, tuple[float, ...], float]:
        """The weights as a tensor [N] rounded to ``dtype`` (as mergekit), their sum as the
        fixed divisor (1 below ``DIVISOR_EPS``), and both as Python floats. Kept for the
        last few weights: a genome's tensors all take the same two orders of the weights,
        and building them costs more than a fused merge of a small tensor."""
        cache = self.__dict__.setdefault("_scratch", {})
        key = ("weights", tuple(float(x) for x in weights), dtype, torch.device(device))
        found = cache.get(key)
        if found is None:
            if sum(k[0] == "weights" for k in cache) >= 4:  # bounded: weights change per child
                for k in [k for k in cache if k[0] == "weights"]:
                    del cache[k]
            w = torch.tensor(key[1], dtype=dtype, device=device)
            divisor = w.sum()
            if divisor.abs() < DIVISOR_EPS:
                divisor = torch.ones_like(divisor)
            found = cache[key] = (w, divisor, tuple(w.tolist()), float(divisor))
        return found

    def _plans(
        self, base: Tensor, tensors: Sequence[Tensor], rng: torch.Generator | None, fused: bool
    ) -> tuple[list, list[tuple[int, int]]]:
        """How each task vector is sparsified (``_KeepAll``, ``_DropAll``, ``_KeepCuts``,
        ``_KeepBits``), found in a first pass over the tensor (fused when ``fused``: two
        models on the CPU, ``_fusable``); and the chunks of the merge."""
        kind, density, n = self.sparsification, self.density, base.numel()
        n_models = len(tensors)
        regular = list(chunks(n))
        if kind == "none" or density >= 1:
            return [_KeepAll()] * n_models, regular
        if kind in RANDOM_SPARSIFICATIONS and rng is None:
            raise ValueError(f"{self.name}: random masks need a torch.Generator (rng)")
        if density <= 0 and kind in ("magnitude", "rank_magnitude") or n == 0:
            return [_DropAll()] * n_models, regular
        b, xs = base.view(-1), [x.view(-1) for x in tensors]
        if kind in MAGNITUDE_SPARSIFICATIONS:
            return self._magnitude_plans(b, xs, fused), regular
        if kind == "random":
            return self._random_plans(b, xs, rng, fused), regular
        return self._della_plans(base, tensors, rng)

    def _magnitude_plans(self, b: Tensor, xs: list[Tensor], fused: bool) -> list[_KeepCuts]:
        """TIES and Model Breadcrumbs: the rank thresholds of every ``|x_i - b|``, selected in
        one pass reading ``b`` and every ``x_i`` (plus one for the L1 norms of ``rescale``).

        Not memory-bound in numpy: exact selection touches every entry with three compares and
        gathers the few percent inside the sample's bracket (``_Select``, ~1.5 ns per entry and
        task vector on one core, against a floor of ~0.1 ns per genome pass); two models on the
        CPU take the fused pass (``_fused_magnitude_plans``), near memory speed."""
        n, n_models = b.numel(), len(xs)
        if self.sparsification == "magnitude":  # the k largest |d|
            wanted = [(max(1, int(self.density * n)), True)]
        else:  # ranks [bottom, bottom + target) of the ascending sort: two cuts, the second inside
            target, top = int(self.density * n), int(self.gamma * n)
            bottom = max(0, n - target - top)
            wanted = [(bottom + target, False), (bottom, False)]
        if not self.rescale and fused:
            return self._fused_magnitude_plans(b, xs, wanted, self._work(b.dtype))
        work = self._work(b.dtype)
        samples = [
            _sample(lambda step, x=x: _keys(_delta(x[::step], b[::step], work).abs_()), n)
            for x in xs
        ]
        selects = [  # per model: a _Select per cut inside (0, n), else None
            [_Select(n, _rank(k, n, big), sample) if 0 < k < n else None for k, big in wanted]
            for sample in samples
        ]
        size = chunk_len(n)
        a = self.scratch("abs", (n_models, size), work, b.device)  # [N, C] |d|
        before = [0.0] * n_models
        for s, e in chunks(n):
            ac = a[:, : e - s]
            for i, x in enumerate(xs):
                _sub_into(ac[i], x[s:e], b[s:e])
            ac.abs_()
            for i in range(n_models):
                keys = _keys(ac[i])
                for select in selects[i]:
                    if select is not None:
                        select.feed(keys)
                if self.rescale:
                    before[i] += _sum(ac[i])
        plans = []
        for x, model_selects in zip(xs, selects):
            cuts = []
            for (k, big), select in zip(wanted, model_selects):
                at = None
                if select is not None:
                    found = select.result() or _select(
                        lambda s, e, x=x: _keys(_delta(x[s:e], b[s:e], work).abs_()),
                        n,
                        select.r,
                        None,
                    )
                    at = (_value(found[0], work), *found[1:])
                cuts.append(_Cut(k, n, big, at))
            plans.append(_KeepCuts(cuts))
        if self.rescale:  # the L1 norms after masking: one more pass
            after = [0.0] * n_models
            k, k2 = self.scratch("rows", (2, size), work, b.device)
            for s, e in chunks(n):
                ac = a[:, : e - s]
                for i, (x, plan) in enumerate(zip(xs, plans)):
                    _sub_into(ac[i], x[s:e], b[s:e]).abs_()
                    after[i] += _sum(ac[i].mul_(plan.keep(ac[i], s, k[: e - s], k2[: e - s])))
            for plan, bf, af in zip(plans, before, after):
                plan.scale = _rescale(bf, af, work)
        return plans

    def _fused_magnitude_plans(
        self, b: Tensor, xs: list[Tensor], wanted: list[tuple[int, bool]], work: torch.dtype
    ) -> list[_KeepCuts]:
        """``_magnitude_plans`` for two models on the CPU: one fused pass reading ``b`` and
        both models feeds every selection (``kernels.magnitude_bands``: vector compares and
        compress-stores, ~0.2 ns per entry and task vector where the numpy path costs ~1.5
        ns), bracketed by a sample of 8 sqrt(n) keys per model (at most ``FUSED_SAMPLE``: more
        costs more to gather and sort than it saves in the band). The same thresholds: each is
        the exact order statistic of the same keys. The magnitudes are computed in ``work``
        (float32 for bfloat16 tensors with ``compute_dtype="float32"``)."""
        n = b.numel()
        samples: list[np.ndarray | None] = [None, None]
        size = min(FUSED_SAMPLE, max(1024, 8 * math.isqrt(n)))  # sorting it vs the band
        if n > 4 * size:
            keys = kernels.magnitude_sample(b, *xs, n // size, work)  # [2, ~size]
            samples = [np.sort(k) for k in keys]
        brackets = []  # (model, cut, _Select)
        for i, sample in enumerate(samples):
            for c, (k, big) in enumerate(wanted):
                if 0 < k < n:
                    brackets.append((i, c, _Select(n, _rank(k, n, big), sample)))
        cap = max([n // 8, 4 * size] + [n for *_, sel in brackets if sel.lo == sel.hi])
        found: dict[tuple[int, int], tuple[int, int, int] | None] = {}
        if brackets:
            bands = kernels.magnitude_bands(
                b,
                *xs,
                {
                    (i, c): (
                        0 if sel.lo is None else sel.lo,
                        INT32_MAX if sel.hi is None else sel.hi,
                    )
                    for i, c, sel in brackets
                },
                self.scratch(
                    "bands", kernels.bands_shape(n, min(cap, n)), torch.int32, b.device
                ).numpy(),
                work,
            )
            longest = max((len(band[1]) for band in bands.values() if band), default=0)
            room = self.scratch("settle", (longest,), torch.int32, b.device).numpy()
            for i, c, sel in brackets:
                band = bands[i, c]
                found[i, c] = None if band is None else _settle(sel.r, *band[:2], room)
        plans = []
        for i, x in enumerate(xs):
            cuts = []
            keys_of = lambda s, e, x=x: _keys(_delta(x[s:e], b[s:e], work).abs_())  # noqa: E731
            for c, (k, big) in enumerate(wanted):
                at = None
                if 0 < k < n:
                    key = found[i, c] or _select(keys_of, n, _rank(k, n, big), None)
                    at = (_value(key[0], work), *key[1:])
                cut = _Cut(k, n, big, at)
                if found.get((i, c)) and 0 < cut.budget < cut.ties and not math.isnan(cut.value):
                    _, band, marks = bands[i, c]  # the ties' places, from the selection pass
                    cut.end = kernels.tie_end_in(band, marks, key[0], cut.budget, b, x, work)
                cuts.append(cut)
            plans.append(_KeepCuts(cuts))
        return plans

    def _random_plans(
        self, b: Tensor, xs: list[Tensor], rng: torch.Generator, fused: bool
    ) -> list[_KeepBits]:
        """DARE: every task vector's keep mask, drawn in mergekit's order (all of ``x_0``'s,
        then ``x_1``'s...) and kept as bits; with ``rescale``, the L1 norms before and after
        masking in one pass reading ``b`` and every ``x_i``.

        Not memory-bound: torch's Bernoulli sampler is a serial Mersenne twister, one float32
        uniform per entry. On the CPU with numba its stream is reproduced here
        (``kernels.bernoulli_bits``, ~0.16 ns per entry and task vector on one core, against
        ~2.5 ns for torch's); elsewhere drawn as ``torch.rand`` (``_bernoulli``: the same
        numbers, 5x faster than ``torch.bernoulli``). ``draws="counter"``: one stream seed
        per task vector (``_KeepDraws``), drawn from ``rng``."""
        work = self._mask_work(b)
        p = float(torch.tensor(self.density, dtype=work))  # Bernoulli's p, in the work dtype
        if self.draws == "counter":
            plans = [_KeepDraws(seed, p, work) for seed in _seeds(rng, len(xs))]
        else:
            plans = [_KeepBits({0: _bernoulli_bits(p, b.numel(), rng)}, work) for _ in xs]
        if self.rescale:
            self._rescale_plans(b, xs, plans, fused)
        return plans

    def _rescale_plans(
        self, b: Tensor, xs: list[Tensor], plans: list[_KeepBits], fused: bool
    ) -> None:
        """Set each random plan's L1 rescaling factor: one pass reading ``b`` and every
        ``x_i``. mergekit sums in float32 in torch's order, and so does this for torch's
        draws on a tensor of one chunk (the same bits as mergekit). Counter draws (which
        mergekit has not) and larger tensors, whose float32 sums chunk by chunk would not be
        mergekit's either, sum in float64: fused for two models on the CPU when ``fused``
        (``kernels.random_sums`` for counter draws, ``kernels.bits_sums`` for stored bits)."""
        work, n = plans[0].work, b.numel()
        total = torch.float64 if isinstance(plans[0], _KeepDraws) or n > CHUNK else None
        if total is not None and work == self._work(b.dtype) and fused:
            if isinstance(plans[0], _KeepDraws):
                seeds = [plan.seed for plan in plans]
                sums = kernels.random_sums(b, *xs, seeds, plans[0].p, work)
            else:
                sums = kernels.bits_sums(b, *xs, [plan.whole() for plan in plans], work)
            for plan, before, after in zip(plans, sums[0::2], sums[1::2]):
                plan.scale = _rescale(before, after, work)
            return
        before, after = [0.0] * len(xs), [0.0] * len(xs)
        size = chunk_len(n)
        t, mask = self.scratch("rows", (2, size), work, b.device)
        for s, e in chunks(n):
            tc, mc = t[: e - s], mask[: e - s]
            for i, (x, plan) in enumerate(zip(xs, plans)):
                self._mask_delta_(tc, x[s:e], b[s:e]).abs_()
                before[i] += _sum(tc, total)
                after[i] += _sum(tc.mul_(plan.mask(s, mc)), total)
        for plan, bf, af in zip(plans, before, after):
            plan.scale = _rescale(bf, af, work)

    def _della_plans(
        self, base: Tensor, tensors: Sequence[Tensor], rng: torch.Generator
    ) -> tuple[list[_KeepBits], list[tuple[int, int]]]:
        """DELLA: every task vector's keep mask, block of rows by block of rows, in mergekit's
        order (all of ``x_0``'s rows, then ``x_1``'s...), kept as bits; the L1 norms of
        ``rescale`` on the way. The merge's chunks lie inside the blocks.

        Not memory-bound: the ranks sort every row of ``|d|`` (``_stable_order``, ~4 ns per
        entry on one core); torch's draws cost ~0.16 ns per entry with ``_bernoulli_bits``.
        A 1-D tensor (or one cut by the split point) is one row: its temporaries are the size
        of the tensor."""
        n = base.numel()
        rows = base.shape[0] if base.dim() >= 2 else 1
        per_row = n // rows
        step = max(1, chunk_len(n) // per_row)  # rows per block
        blocks = [(r * per_row, min(r + step, rows) * per_row) for r in range(0, rows, step)]
        work = self._mask_work(base)
        b = base.view(-1)
        seeds = _seeds(rng, len(tensors)) if self.draws == "counter" else [None] * len(tensors)
        plans = []
        for x, seed in zip(tensors, seeds):
            x = x.view(-1)
            bits, before, after = {}, 0.0, 0.0
            for s, e in blocks:
                t = torch.empty(e - s, dtype=work, device=base.device)
                t = self._mask_delta_(t, x[s:e], b[s:e]).view(-1, *base.shape[1:])  # [rows, ...]
                bits[s] = self._della_mask(t, rng, None if seed is None else (seed, s))
                if self.rescale:
                    keep = torch.empty_like(t)
                    _unpack(bits[s], 0, keep.view(-1))
                    t.abs_()
                    before += _sum(t)
                    after += _sum(t.mul_(keep))
            plan = _KeepBits(bits, work)
            plan.scale = _rescale(before, after, work) if self.rescale else None
            plans.append(plan)
        bounds = [chunk for s, e in blocks for chunk in chunks(e, s)]
        return plans, bounds

    def _della_mask(
        self, t: Tensor, rng: torch.Generator, stream: tuple[int, int] | None = None
    ) -> Tensor:
        """DELLA's random keep mask of ``t``, packed as bits (``_pack``): probability
        ``density - epsilon + 2 epsilon * rank / (m - 1)`` for the entry of rank ``rank`` (0:
        smallest ``|t|``) among the ``m`` of its row (along dim 1; a vector is one row).
        ``stream``: (seed, index of ``t``'s first entry) of counter draws, else ``rng``'s."""
        rows = t if t.dim() >= 2 else t.reshape(1, -1)  # [R, m, ...]
        m = rows.shape[1]
        # blocks of rows are chunk-sized (``_della_plans``): their buffers are kept; a longer
        # row (a 1-D tensor, or a piece cut by the split point) gets its own
        reuse = t.numel() <= CHUNK and t.device.type == "cpu"
        lines = rows.movedim(1, -1).reshape(-1, m)  # [L, m]: every row along dim 1
        shape = tuple(lines.shape)
        into = self.scratch("della_lines", shape, t.dtype, t.device) if reuse else None
        lines = torch.abs(lines, out=into)
        order = _stable_order(  # [L, m]
            lines, self.scratch("della_order", shape, torch.int64, t.device) if reuse else None
        )
        # every row's ranks are 0..m-1: mergekit's arithmetic on them, step by step, once (in
        # place: on a row of millions each temporary costs its page faults)
        if m > 1:
            rank_norm = torch.arange(m, device=t.device).to(t.dtype).add_(1)  # [m] ranks
            lo, hi = rank_norm.amin(), rank_norm.amax()
            rank_norm.sub_(lo).div_(hi - lo).clamp_(0, 1)
        else:
            rank_norm = torch.full((m,), 0.5, dtype=t.dtype, device=t.device)
        # (d - e) + rank_norm * 2 * e, the sum's operands swapped (addition commutes)
        by_rank = rank_norm.mul_(2).mul_(self.epsilon).add_(self.density - self.epsilon)
        compiled = t.device.type == "cpu" and kernels.HAVE_NUMBA
        if compiled and t.dtype in (torch.float32, torch.bfloat16, torch.float16):
            # what the draws compare with: float32 (``kernels.bernoulli_bits``)
            if reuse:
                probs = self.scratch("della_probs", shape, torch.float32, t.device)
            else:
                probs = torch.empty(shape, dtype=torch.float32)
            kernels.scatter_rows(order, by_rank.float(), probs)  # [L, m]
        else:
            probs = torch.empty_like(lines).scatter_(1, order, by_rank.expand_as(order))
        probs = probs.view(*rows.movedim(1, -1).shape).movedim(-1, 1)  # [R, m, ...]
        if stream is not None:
            draws = counter_uniform(stream[0], stream[1], t.numel(), t.device)
            return _pack(torch.lt(draws.view(probs.shape), probs))
        return _bernoulli_bits(probs, t.numel(), rng)


def _stable_order(mag: Tensor, out: Tensor | None = None) -> Tensor:
    """``torch.argsort(mag, dim=1, stable=True)`` of non-negative ``mag`` [L, m] (int64): the
    float bits shifted left and or-ed with the column index are distinct keys whose plain
    sort is that order; numpy sorts them with SIMD, ~25x faster than torch's stable sort.
    The keys are 32-bit where they fit (16-bit floats, rows up to 64 K; their sort is ~2x
    faster), else 64-bit. ``out``: an int64 CPU buffer [L, m] for the order (and the 64-bit
    keys)."""
    keys = _keys(mag)  # [L, m]
    m = mag.shape[1]
    bits = max(1, (m - 1).bit_length())
    width = keys.itemsize * 8 - 1 + bits  # the bits of a key with its column
    if width > 63:  # no room for the index: a stable sort
        return torch.from_numpy(np.argsort(keys, axis=1, kind="stable")).to(mag.device)
    order = np.empty(keys.shape, np.int64) if out is None else out.numpy()  # [L, m]
    unique = keys.astype(np.int32) if width <= 31 else order  # [L, m]
    if unique is order:
        np.copyto(unique, keys)
    unique <<= bits
    unique |= _columns(m, unique.dtype) if m <= CHUNK else np.arange(m, dtype=unique.dtype)
    unique.sort(axis=1)
    unique &= (1 << bits) - 1
    if unique is not order:  # the order out in int64, as the scatter takes it
        np.copyto(order, unique)
    return out if out is not None else torch.from_numpy(order).to(mag.device)


@functools.lru_cache(maxsize=8)
def _columns(m: int, dtype: np.dtype) -> np.ndarray:
    """``0 .. m - 1`` in ``dtype`` (read-only), kept for the few row lengths of a genome's
    tensors (up to ``CHUNK``: a longer row, a 1-D piece, would keep its size in memory)."""
    columns = np.arange(m, dtype=dtype)
    columns.flags.writeable = False
    return columns


def _fusable(xs: Sequence[Tensor], *others: Tensor) -> bool:
    """Whether the fused two-model loops (``merging.kernels``) take models ``xs`` with
    ``others`` (the base, an output): two models, one dtype for all, ``kernels.usable``."""
    return (
        len(xs) == 2
        and len({t.dtype for t in (*xs, *others)}) == 1
        and kernels.usable(*xs, *others)
    )


def _sum_rows(rows: Tensor, out: Tensor) -> Tensor:
    """``rows.sum(dim=0)`` [c] of ``rows`` [N, c] into ``out``: for two rows one addition,
    the same result, without the reduction kernel's overhead."""
    if rows.shape[0] == 2:
        return torch.add(rows[0], rows[1], out=out)
    return torch.sum(rows, dim=0, out=out)
