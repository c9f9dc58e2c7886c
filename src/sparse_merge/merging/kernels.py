"""Fused CPU kernels for the merges, compiled with numba: passes that read every input element
once per pass and write the output once, with torch's arithmetic.

torch runs a merge as a chain of elementwise ops (multiply, fused multiply-add, divide...), and
every op after the first re-reads its chunk from cache: on one core of a 2-core EPYC each such
pass costs about as much as a pass over memory, so linear merging reached ~0.6 of its
bandwidth floor and task arithmetic ~0.4. These loops do every op of an element in registers
and reach ~0.9 (``make bench``). We write them ourselves because no library fuses torch's
exact rounding: each kernel performs the ops of its torch path in the same order, in the same
precision, rounding where torch rounds:

- float32 ops are IEEE float32 ops (numba keeps strict floating point: no reassociation, no
  contraction into fused multiply-adds); ``add(x, y, alpha=c)`` is torch's vectorised
  ``fmadd(y, c, x)``, one rounding, and is an explicit fused multiply-add here;
- bfloat16 is loaded as its float32 (the upper 16 bits) and rounded back to nearest-even
  wherever torch stores a bfloat16 result: after every op of an op chain in bfloat16, once at
  the end of a float32 accumulation. The loops that round take that dtype as their first
  argument (``work``, an empty array): the tensors' own for torch's arithmetic in bfloat16,
  float32 for bfloat16 tensors merged in float32 (``compute_dtype="float32"``: the ops of
  the float32 loop, one rounding where the output is stored).

TIES and Model Breadcrumbs (``magnitude_bands`` finds the top-k thresholds, ``magnitude_merge2_``
merges) and DARE with counter draws (``random_sums``, ``random_merge2_``) or with torch's draws
kept as bits (``bits_sums``, ``bits_merge2_``; the draws from ``bernoulli_bits``, torch's own
generator stream) run as two passes per tensor, the first one everything the second needs
from the whole tensor; see ``merging.task_arithmetic``. The selection pass appends the keys
near a threshold to a buffer with a vector compress (``_fused.compress_band``, AVX-512's
``vpcompressd``), which LLVM does not generate from a plain loop.

Per-row magnitude and Wanda pruning (``prune_rows_``) scores, ranks and masks a block of rows
at a time in cache.

Every kernel is checked against its torch path on random data with signed zeros, NaN,
infinities and subnormals (``tests/merging/test_kernels.py``, ``test_magnitude_kernels.py``,
``test_counter_draws.py``, ``test_torch_draws.py``): the same bits everywhere, except
NaN payloads (torch's own vectorised and scalar loops store different ones) and, for the
bfloat16 interpolation of ``lerp_chain_``, torch's scalar tails (see there). Other dtypes,
other devices, non-contiguous tensors, or numba missing: the torch path runs (``usable``).
Tensors of at least ``2 * PART_MIN`` entries run in parts on up to ``torch.get_num_threads()``
threads (``in_parts``; the same bits however cut); smaller ones, the samples of the selection
and DARE's norm pass on one. The loops use IEEE division (numba's ``error_model="numpy"``: its
Python model turns a division by a variable into a checked branch, and the loop stops
vectorising).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
BLOCK = 256  # entries per block of the selection loops (``_fused``)
PART_MIN = 1 << 20  # entries per thread at least: starting one costs ~60 us, 1/10 of a part
ALIGN = 64  # parts start at multiples of it: no cache line of an output is shared by two

DTYPES = (torch.float32, torch.bfloat16)


def usable(*tensors: Tensor) -> bool:
    """Whether the fused kernels take these tensors: contiguous float32 or bfloat16 on the
    CPU, numba installed."""
    return HAVE_NUMBA and all(
        t.device.type == "cpu" and t.dtype in DTYPES and t.is_contiguous() for t in tensors
    )


def _array(t: Tensor) -> np.ndarray:
    """A flat numpy view of a float32 or bfloat16 (as uint16 bits) tensor."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16).reshape(-1)
    return t.numpy().reshape(-1)


def _work(work: torch.dtype | None, like: Tensor) -> np.ndarray:
    """The dtype a fused loop rounds its intermediates to, as the empty array the loops take
    first (``_fused``'s ``work``): ``like``'s own dtype (``work`` None: torch's arithmetic in
    that dtype, rounded after every op) or ``work`` (float32 for bfloat16 tensors: every op
    in float32, rounded once where the output is stored)."""
    return _witness(like.dtype if work is None else work)


@functools.cache
def _witness(dtype: torch.dtype) -> np.ndarray:
    """An empty array of ``dtype`` as the loops see it (made once: the merges ask per tensor)."""
    return _array(torch.empty(0, dtype=dtype))


@functools.cache
def _ops():
    """The module of compiled kernels (numba compiles each signature on first use and caches
    it on disk)."""
    from sparse_merge.merging import _fused

    return _fused


def part_count(n: int) -> int:
    """Into how many parts ``in_parts`` cuts ``n`` entries: one per thread
    (``torch.get_num_threads()``), each of at least ``PART_MIN`` entries."""
    return max(1, min(torch.get_num_threads(), n // PART_MIN))


def part_cuts(n: int, parts: int, align: int = ALIGN) -> list[int]:
    """Where ``parts`` near-equal parts of ``[0, n)`` start, at multiples of ``align``, and
    ``n``."""
    return [min(n, (n * k // parts) // align * align) for k in range(parts)] + [n]


def in_parts(
    n: int, run: Callable[[int, int], object], parts: int | None = None, align: int = ALIGN
) -> None:
    """``run(lo, hi)`` over ``[0, n)`` cut into up to ``torch.get_num_threads()`` parts of at
    least ``PART_MIN`` entries: the first in this thread, each other one in a thread of its own
    (the kernels release the GIL): one thread reaches neither the memory bandwidth of most
    machines nor the compute of the bfloat16 loops (a loop runs ~1.8x faster on two cores).
    Elementwise loops give the same bits however they are cut. An error in any part is raised
    here, after every part has finished. ``parts``: that many instead (``part_count``);
    ``align``: the parts start at its multiples."""
    parts = part_count(n) if parts is None else parts
    if parts == 1:
        run(0, n)
        return
    cuts = part_cuts(n, parts, align)
    errors: list[BaseException] = []

    def part(lo: int, hi: int) -> None:
        try:
            run(lo, hi)
        except BaseException as error:  # re-raised in the calling thread
            errors.append(error)

    others = [
        threading.Thread(target=part, args=(cuts[k], cuts[k + 1]), daemon=True)
        for k in range(1, parts)
    ]
    for thread in others:
        thread.start()
    part(cuts[0], cuts[1])
    for thread in others:
        thread.join()
    if errors:
        raise errors[0]


def weighted_sum2_(
    out: Tensor, tensors: Sequence[Tensor], coeffs: Sequence[float], divisor: float | None
) -> Tensor:
    """``merging.base.weighted_sum_`` of two tensors in one pass (``usable`` tensors):
    ``x_0 * c_0 + x_1 * c_1`` in float32 (``add`` with ``alpha``: a fused multiply-add), divided
    by ``divisor``, rounded once into ``out``; ``out`` may be either input."""
    kernel = _ops().weighted_sum2
    o, x0, x1 = _array(out), *(_array(x) for x in tensors)
    c0, c1 = np.float32(coeffs[0]), np.float32(coeffs[1])
    d = np.float32(1.0 if divisor is None else divisor)
    in_parts(o.size, lambda lo, hi: kernel(o[lo:hi], x0[lo:hi], x1[lo:hi], c0, c1, d))
    return out


DOT_BLOCK = 4096  # entries per partial sum of ``dots3`` (a multiple of ``_fused.DOT_LANES``)


def dots3(a: Tensor, b: Tensor) -> tuple[float, float, float]:
    """``(a.b, |a|^2, |b|^2)`` of two flat float32 or bfloat16 tensors in one pass
    (``_fused.dots3``), the same bits on every CPU and however the pass is cut into threads:
    each block of ``DOT_BLOCK`` entries sums the float32 products of every 64th entry in
    float32 in index order (64 lanes), its lanes in float64 in a fixed order, and the blocks'
    sums are added in float64 in block order. For bfloat16 every product is exact; the sums
    are within float32 rounding of 64 terms."""
    n = a.numel()
    out = np.zeros((-(-n // DOT_BLOCK), 3), np.float64)
    kernel, x, y = _ops().dots3, _array(a), _array(b)
    block = np.int64(DOT_BLOCK)
    in_parts(
        n,
        lambda lo, hi: kernel(
            x[lo:hi], y[lo:hi], block, out[lo // DOT_BLOCK : -(-hi // DOT_BLOCK)]
        ),
        align=DOT_BLOCK,
    )
    ab, aa, bb = out.sum(axis=0).tolist()  # down the rows: numpy adds them in row order
    return ab, aa, bb


def lerp_chain_(
    out: Tensor, x0: Tensor, x1: Tensor, c0: float, c1: float, work: torch.dtype | None = None
) -> Tensor:
    """torch's ``torch.mul(x0, c0, out=out).add_(x1, alpha=c1)`` in one pass (all three of one
    dtype), rounding to the dtype after each op; ``out`` may be ``x0``, or ``x1`` (each element
    is read before it is written).

    bfloat16: as torch's vectorised loops compute it, ``alpha`` rounded to bfloat16 and the
    (exact) product added in float32 before rounding. torch's scalar loop, which handles the
    last ``len % 32`` elements of every call (and of every thread's share of a call), rounds
    the product to bfloat16 first, so torch's own bfloat16 result depends on how the op is cut
    into calls and threads; here every element is computed alike. ``work=torch.float32``:
    both ops in float32 on the (upcast) inputs, rounded once into ``out``."""
    work = None if work == out.dtype else work
    if out.dtype == torch.bfloat16 and work is None:
        c1 = float(torch.tensor(c1, dtype=torch.bfloat16))
    kernel, (o, a, b) = _ops().lerp_chain, (_array(t) for t in (out, x0, x1))
    c0, c1, w = np.float32(c0), np.float32(c1), _work(work, out)
    in_parts(o.size, lambda lo, hi: kernel(w, o[lo:hi], a[lo:hi], b[lo:hi], c0, c1))
    return out


def task_arithmetic2_(
    out: Tensor,
    base: Tensor,
    x0: Tensor,
    x1: Tensor,
    weights: tuple[float, float],
    divisor: float | None,
    lambda_: float,
    work: torch.dtype | None = None,
) -> Tensor:
    """Task arithmetic of two models (no sparsification, no sign consensus) in one pass, with
    the arithmetic of ``TaskArithmetic.merge_into_``: the weights and ``divisor`` already
    rounded to the work dtype (``work``, default the tensors'), ``lambda_`` a float32
    scalar as torch multiplies by it."""
    kernel, arrays = _ops().task_arithmetic2, [_array(t) for t in (out, base, x0, x1)]
    w = _work(work, out)
    settings = (
        np.float32(weights[0]),
        np.float32(weights[1]),
        np.float32(1.0 if divisor is None else divisor),
        np.float32(lambda_),
    )
    in_parts(arrays[0].size, lambda lo, hi: kernel(w, *(a[lo:hi] for a in arrays), *settings))
    return out


def bands_shape(n: int, cap: int) -> tuple[int, int]:
    """The shape of ``magnitude_bands``'s buffer for ``n`` entries and bands of up to ``cap``
    keys: a room for every part, of ``cap`` keys for one part and of twice its share of
    ``cap`` for several (never more than the part's entries; in all at most ``2 cap``, however
    many threads), plus ``BLOCK``; and one column more, so that a part's room is never the
    whole row: numba then compiles one loop for one part and for several (a view of whole rows
    is contiguous, of part of them not)."""
    parts = part_count(n)
    cuts = part_cuts(n, parts, BLOCK)
    longest = max(stop - start for start, stop in zip(cuts, cuts[1:]))
    room = min(longest, cap if parts == 1 else 2 * cap // parts)
    return 4, parts * (room + BLOCK) + 1


def magnitude_bands(
    base: Tensor,
    x0: Tensor,
    x1: Tensor,
    brackets: dict[tuple[int, int], tuple[int, int]],
    buffer: np.ndarray,
    work: torch.dtype | None = None,
) -> dict[tuple[int, int], tuple[int, np.ndarray, np.ndarray] | None]:
    """One pass over ``base`` and two models for top-k thresholds of ``|x_i - base|`` (keys:
    the bits of the magnitudes as int32, ``_fused.magnitude_key``). ``brackets``: (model,
    cut) -> (lo, hi), at most two cuts per model; for each, the count of keys below ``lo``,
    the keys in ``[lo, hi]`` in index order (a view of ``buffer``, int32 ``bands_shape(n,
    cap)``, the caller's to reuse) and the band's length at the start of every block of
    ``BLOCK`` entries (``tie_end_in``); or None when more fall inside a part than its room
    holds (``bands_shape``). A large tensor runs in parts (``in_parts``, cut at blocks), each
    into its own room in ``buffer``; the bands are then joined in index order. ``work``: the
    dtype the magnitudes are computed in (default the tensors')."""
    ops, n = _ops(), base.numel()
    lo, hi = np.full(4, -1, np.int64), np.full(4, -1, np.int64)
    for (model, cut), (low, high) in brackets.items():
        lo[2 * model + cut], hi[2 * model + cut] = low, high
    # float32 keys computed where compared, in registers: once per cut for one cut per model
    # (TIES), once for both bands for two (Model Breadcrumbs)
    w, arrays = _work(work, base), [_array(t) for t in (base, x0, x1)]
    kernel = functools.partial(ops.magnitude_bands, w)
    if base.dtype == torch.float32:
        kernel = ops.magnitude_bands_f32 if len(brackets) <= 2 else ops.magnitude_bands2_f32
    parts = part_count(n)
    cuts = part_cuts(n, parts, BLOCK)
    share = (buffer.shape[1] - 1) // parts  # each part's room: cap + BLOCK keys
    # each part's counts on cache lines of their own: the loops update them every block, and
    # two threads writing one line slow each other down
    below, kept = (np.zeros((parts, 16), np.int64)[:, :4] for _ in range(2))
    marks = [  # per part: at each of its blocks, and at its end
        np.empty((4, (stop - start) // BLOCK + 1), np.int64)
        for start, stop in zip(cuts[:-1], cuts[1:])
    ]

    def part(start: int, stop: int) -> None:
        k = cuts.index(start)
        room = buffer[:, k * share : (k + 1) * share]
        kernel(*(a[start:stop] for a in arrays), lo, hi, below[k], room, kept[k], marks[k])

    in_parts(n, part, parts, BLOCK)
    counts = kept.tolist()  # [parts][4]
    below = (below[0] if parts == 1 else below.sum(axis=0)).tolist()  # [4]
    found = {}
    for m, c in brackets:
        s = 2 * m + c
        kept_s = [row[s] for row in counts]
        if min(kept_s) < 0:
            found[m, c] = None
            continue
        if parts == 1:
            found[m, c] = (below[s], buffer[s, : kept_s[0]], marks[0][s])
            continue
        ahead = [sum(kept_s[:k]) for k in range(parts)]  # keys in the parts before each
        for k in range(1, parts):  # the bands joined, moved left in place
            at = k * share
            buffer[s, ahead[k] : ahead[k] + kept_s[k]] = buffer[s, at : at + kept_s[k]]
        # a part's last mark is where its tail began (the last part's) or its end, which is
        # where the next part begins
        joined = [mark[s, :-1] + before for mark, before in zip(marks[:-1], ahead[:-1])]
        joined = np.concatenate([*joined, marks[-1][s] + ahead[-1]])  # [n // BLOCK + 1]
        found[m, c] = (below[s], buffer[s, : sum(kept_s)], joined)
    return found


def tie_end_in(
    band: np.ndarray,
    marks: np.ndarray,
    key: int,
    budget: int,
    base: Tensor,
    x: Tensor,
    work: torch.dtype | None = None,
) -> int:
    """``tie_end`` from a selection's band (``magnitude_bands``), which holds every key equal
    to the threshold ``key`` in index order: the ``budget``-th of them lies in the block whose
    mark comes last at or before its place in the band, and only that block's keys of
    ``|x - base|`` (computed in ``work``) are read again, instead of the tensor up to it. One
    compiled call: the band scanned once up to that place, the block's keys never stored (a
    bfloat16 TIES merge of 16 M entries ends ~18 cuts among ties: 0.5 ms, against 1.6 ms as
    numpy scans and a torch block)."""
    w = _work(work, base)
    end = int(_ops().tie_end_in(w, _array(base), _array(x), band, marks, key, budget))
    if end < 0:  # the band holds every key equal to the threshold: only a broken band
        raise RuntimeError(f"tie {budget} of the threshold key {key} is not in its band")
    return end


def scatter_rows(order: Tensor, values: Tensor, out: Tensor) -> Tensor:
    """``out.scatter_(1, order, values.expand_as(order))`` for float32 ``values`` [m] and
    ``out`` [L, m] on the CPU, ``order`` [L, m] a permutation of each row's columns (int64):
    the value of rank ``j`` to the column ``order[r, j]`` of row ``r``. One compiled loop in
    cache, where torch's scatter checks and strides every index (~4x slower)."""
    _ops().scatter_rows(order.numpy(), values.numpy(), out.numpy())
    return out


def magnitude_sample(
    base: Tensor, x0: Tensor, x1: Tensor, step: int, work: torch.dtype | None = None
) -> np.ndarray:
    """The magnitude keys of every ``step``-th entry of both models, int32 [2, ceil(n / step)],
    computed in ``work`` (default the tensors' dtype)."""
    out = np.empty((2, -(-base.numel() // step)), np.int32)
    arrays = (_array(base), _array(x0), _array(x1))
    _ops().magnitude_sample(_work(work, base), *arrays, step, out)
    return out


def key_counts(keys: np.ndarray, key: int) -> tuple[int, int]:
    """How many of the integer ``keys`` lie below ``key`` and how many equal it: one pass
    with numba (numpy's two compares and counts cost 3x as much), numpy without it."""
    if HAVE_NUMBA and keys.dtype == np.int32:
        below, equal = _ops().key_counts(keys, np.int32(key))
        return int(below), int(equal)
    return int(np.count_nonzero(keys < key)), int(np.count_nonzero(keys == key))


def tie_end(
    base: Tensor, x: Tensor, value: float, budget: int, work: torch.dtype | None = None
) -> int:
    """One past the index of the ``budget``-th entry whose ``|x - base|`` (computed in
    ``work``, default the tensors' dtype) is ``value``."""
    w, value = _work(work, base), np.float32(value)
    return int(_ops().tie_end(w, _array(base), _array(x), value, budget))


class MergeSettings(NamedTuple):
    """What the two-model merge loops take besides the inputs and the masks: the weights,
    scales and ``divisor`` already rounded to the work dtype (scales 1: no rescaling; ``divisor``
    None: no normalisation), ``consensus`` 0 none, 1 sum, 2 count, and ``lambda_``."""

    weights: tuple[float, float]
    scales: tuple[float, float]
    consensus: int
    divisor: float | None
    lambda_: float
    work: torch.dtype | None = None  # the dtype of the arithmetic (default the tensors')

    def loop_args(self) -> tuple:
        """As the loops take them, in their types: w0, w1, s0, s1, consensus, normalize, the
        fixed divisor, lambda."""
        return (
            *(np.float32(v) for v in (*self.weights, *self.scales)),
            self.consensus,
            self.divisor is not None,
            np.float32(1.0 if self.divisor is None else self.divisor),
            np.float32(self.lambda_),
        )


def magnitude_merge2_(
    out: Tensor,
    base: Tensor,
    x0: Tensor,
    x1: Tensor,
    bands: Sequence[tuple],
    settings: MergeSettings,
) -> Tensor:
    """TIES / Model Breadcrumbs of two models in one pass (``_fused.magnitude_merge2``).
    ``bands``: per model ``(lo, hi, lo_ties, hi_ties)``, the entries kept those with ``lo <
    |x - base| < hi`` or equal to an end with their index in that end's ``(start, stop)``."""
    n = base.numel()
    ranges = [tie for band in bands for tie in band[2:]]  # [(start, stop)] x 4
    starts = sorted({0, *(i for r in ranges for i in r if 0 < i < n)})
    ties = np.array(  # [R, 2, 2]: whether range r keeps model m's ties at its lo / hi end
        [[start <= s < stop for start, stop in ranges] for s in starts], dtype=np.bool_
    ).reshape(-1, 2, 2)
    bounds = np.array([*starts, n], dtype=np.int64)  # [R + 1]
    kernel, arrays = _ops().magnitude_merge2, [_array(t) for t in (out, base, x0, x1)]
    cuts = np.array([band[:2] for band in bands], dtype=np.float32)
    w, args = _work(settings.work, out), settings.loop_args()

    def part(lo: int, hi: int) -> None:  # the ranges clipped to the part (some left empty)
        clipped = bounds if (lo, hi) == (0, n) else np.clip(bounds, lo, hi) - lo
        kernel(w, *(a[lo:hi] for a in arrays), cuts, ties, clipped, *args)

    in_parts(n, part)
    return out


def uniforms(seed: int, start: int, count: int) -> Tensor:
    """Draws ``start .. start + count - 1`` of the counter stream ``seed`` (float32 [count],
    ``_fused.uniform``), on the CPU."""
    out = np.empty(count, np.float32)
    _ops().uniforms(np.uint64(seed % (1 << 64)), np.uint64(start), out)
    return torch.from_numpy(out)


def _threshold(p: float) -> np.uint64:
    """The integer ``T`` with ``draw < T`` exactly when ``draw * 2^-24 < p`` (``p`` a float32
    value: ``p * 2^24`` is exact in float64)."""
    return np.uint64(min(max(math.ceil(p * (1 << 24)), 0), 1 << 24))


def random_sums(
    base: Tensor,
    x0: Tensor,
    x1: Tensor,
    seeds: Sequence[int],
    p: float,
    work: torch.dtype | None = None,
) -> list[float]:
    """DARE's L1 norms of both task vectors before and after their counter-drawn masks
    (``_fused.random_sums``): ``[before_0, after_0, before_1, after_1]``, summed in float64,
    the task vectors computed in ``work`` (default the tensors' dtype)."""
    sums = np.zeros(4, np.float64)
    s0, s1 = (np.uint64(s) for s in seeds)
    arrays = (_array(base), _array(x0), _array(x1))
    _ops().random_sums(_work(work, base), *arrays, s0, s1, _threshold(p), np.uint64(0), sums)
    return sums.tolist()


def random_merge2_(
    out: Tensor,
    base: Tensor,
    x0: Tensor,
    x1: Tensor,
    seeds: Sequence[int],
    p: float,
    settings: MergeSettings,
) -> Tensor:
    """DARE (random sparsification with counter draws) of two models in one pass
    (``_fused.random_merge2``), the keep masks drawn from the streams ``seeds`` with keep
    probability ``p``."""
    s0, s1 = (np.uint64(s) for s in seeds)
    kernel, arrays = _ops().random_merge2, [_array(t) for t in (out, base, x0, x1)]
    threshold, args, w = _threshold(p), settings.loop_args(), _work(settings.work, out)
    in_parts(
        arrays[0].size,
        lambda lo, hi: kernel(
            w, *(a[lo:hi] for a in arrays), s0, s1, threshold, np.uint64(lo), *args
        ),
    )
    return out


# torch's CPU generator state (``CPUGeneratorImplState``, 5056 bytes) as ``get_state`` writes
# it: MT19937's words left before its next twist, plus one (int32 at byte 8), its next word
# (uint64 at 16) and its 624 state words (each a uint64 at 24)
MT_STATE_BYTES, MT_LEFT, MT_NEXT, MT_WORDS, MT_N = 5056, 8, 16, 24, 624


def bernoulli_bits(rng: torch.Generator, p: float | Tensor, n: int) -> Tensor | None:
    """``torch.rand(n, generator=rng) < p`` packed as bits (uint8 [ceil(n / 8)], little bit
    order, as ``numpy.packbits``), ``rng`` left as ``torch.rand`` leaves it; ~10x faster
    (``_fused.mt_keep_bits``: the Mersenne twister of torch's CPU generator in numba, its
    state read and written back). ``p``: a float32 value, or a tensor of ``n`` in a dtype
    ``torch.bernoulli`` compares as float32 (float32, bfloat16, float16; then also its
    mask). None where numba is missing, ``rng`` is not a CPU generator, or its state is not
    laid out as read here (then draw with torch); ``test_torch_draws.py`` checks the draws
    against torch's."""
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if not HAVE_NUMBA or rng.device.type != "cpu":
        return None
    if isinstance(p, Tensor) and p.dtype not in floats:  # float64: another uniform
        return None
    raw = rng.get_state()  # uint8 [5056]
    if raw.numel() != MT_STATE_BYTES:
        return None
    fields = raw.numpy()
    left = int(fields[MT_LEFT : MT_LEFT + 4].view(np.int32)[0])
    at = int(fields[MT_NEXT : MT_NEXT + 8].view(np.uint64)[0])
    words = fields[MT_WORDS : MT_WORDS + 8 * MT_N].view(np.uint64)
    if not (1 <= left <= MT_N and (at == MT_N + 1 - left or left == 1)) or words.max() >> 32:
        return None
    state = words.astype(np.uint32)
    out = np.empty((n + 7) // 8, np.uint8)
    if isinstance(p, Tensor):
        probs = p.detach().to("cpu", torch.float32).contiguous().view(-1).numpy()  # [n]
    else:  # the float32 compare as an integer one (``_fused.keep_mask``); NaN keeps nothing
        p = float(np.float32(p))
        probs = np.uint32(0 if math.isnan(p) else _threshold(p))
    at = _ops().mt_keep_bits(state, MT_N + 1 - left, probs, out, n)
    if n > 0:
        fields[MT_LEFT : MT_LEFT + 4].view(np.int32)[0] = MT_N + 1 - at
        fields[MT_NEXT : MT_NEXT + 8].view(np.uint64)[0] = at
        words[:] = state
        rng.set_state(raw)
    return torch.from_numpy(out)


def bits_sums(
    base: Tensor,
    x0: Tensor,
    x1: Tensor,
    bits: Sequence[Tensor],
    work: torch.dtype | None = None,
) -> list[float]:
    """``random_sums`` with the keep masks given as bits (``bernoulli_bits``'s packing)."""
    sums = np.zeros(4, np.float64)
    arrays = [_array(t) for t in (base, x0, x1)]
    _ops().bits_sums(_work(work, base), *arrays, *(b.numpy() for b in bits), sums)
    return sums.tolist()


def bits_merge2_(
    out: Tensor,
    base: Tensor,
    x0: Tensor,
    x1: Tensor,
    bits: Sequence[Tensor],
    settings: MergeSettings,
) -> Tensor:
    """``random_merge2_`` with the keep masks given as bits (``bernoulli_bits``'s packing)."""
    kernel, arrays = _ops().bits_merge2, [_array(t) for t in (out, base, x0, x1)]
    bits0, bits1 = (b.numpy() for b in bits)
    args, w = settings.loop_args(), _work(settings.work, out)
    in_parts(  # the parts start at multiples of ALIGN: at whole bytes of the bits
        arrays[0].size,
        lambda lo, hi: kernel(
            w, *(a[lo:hi] for a in arrays), bits0[lo // 8 :], bits1[lo // 8 :], *args
        ),
    )
    return out


ROW_BLOCK = 1 << 16  # scores ranked at a time by ``prune_rows_`` (256 KB: they stay in cache)


def prune_rows_(weight: Tensor, k: int, scale: Tensor | None, masks: bool) -> Tensor | None:
    """Zero the ``k`` lowest ``|W| * scale`` (``scale``: float32 [in], e.g. Wanda's input
    norms; None: ``|W|``) of every row of ``weight`` [out, in] (``usable``; ``0 < k < in``)
    in place, ties to the lower index: the mask of ``pruning.base.keep_smallest_out`` on the
    float32 scores, applied as ``mul_`` applies it, bit for bit. Returns the keep-mask
    (``masks``) or None.

    In-loop pruning scored a layer into memory, sorted a copy, compared and multiplied, each a
    pass of its own over the layer: 13.5-16.5 s for a Qwen2-1.5B model in bfloat16 on a
    2-core EPYC with AVX2, where this takes 3.0-3.3 s (``make bench ARGS=pruning``). Here
    a block of rows (``ROW_BLOCK`` scores) is scored into a buffer that stays in cache
    (``_fused.row_scores``), each row partitioned at its ``k``-th smallest score there
    (NumPy's selection, ~2x faster than its sort on distinct scores; an entry already zero
    is ranked below the others by index, ``_fused.rank_score``, so that a pruned genome's
    zeros are distinct too), and the rows are masked from it (``_fused.prune_rows``): one
    pass over the weights. The blocks run in parts on up to ``torch.get_num_threads()``
    threads (numba's loops and NumPy's selection release the GIL)."""
    rows, n = weight.shape
    ops = _ops()
    w = _array(weight)
    norms = np.ones(n, np.float32) if scale is None else scale.numpy()
    zeros = np.arange(-n, 0, dtype=np.float32)  # ``_fused.rank_score``'s zeros: ``j - n``
    keep = torch.empty(weight.shape if masks else (0,), dtype=torch.bool)
    kept = keep.numpy().reshape(-1)
    per_block = max(1, ROW_BLOCK // n)

    def part(lo: int, hi: int) -> None:
        buffer = np.empty(min(per_block, hi - lo) * n, np.float32)
        for r0 in range(lo, hi, per_block):
            r1 = min(hi, r0 + per_block)
            ranked = buffer[: (r1 - r0) * n]
            ops.row_scores(w, norms, zeros, r0, r1, ranked)
            ranked.reshape(r1 - r0, n).partition(k - 1, axis=-1)
            ops.prune_rows(
                w, norms, zeros, r0, r1, k, ranked, kept[r0 * n : r1 * n] if masks else kept
            )

    in_parts(rows, part, parts=part_count(weight.numel()), align=1)
    return keep if masks else None


UNPACK = 1 << 16  # bits unpacked at a time by ``mul_packed_`` (a multiple of 8; in cache)


def mul_packed_(out: Tensor, packed: np.ndarray) -> Tensor:
    """``out.mul_(keep)`` for the bool mask ``keep`` packed in ``packed`` (``numpy.packbits``
    order, uint8 [ceil(n / 8)]), in place on a ``usable`` tensor: the same bits, one pass.
    Unpacking a chunk of 16 M bools into memory and multiplying it in with torch took
    2.6-4.8 s for a Qwen2-1.5B model in bfloat16 on a 2-core EPYC with AVX2, this
    0.53-0.58 s (``make bench ARGS=pruning``); here a piece of ``UNPACK`` bits is unpacked
    into cache (NumPy) and multiplied
    in by a numba loop (``_fused.mul_bits``), in parts on up to ``torch.get_num_threads()``
    threads."""
    w, mul_bits = _array(out), _ops().mul_bits

    def part(lo: int, hi: int) -> None:
        for s in range(lo, hi, UNPACK):
            e = min(hi, s + UNPACK)
            mul_bits(w, s, np.unpackbits(packed[s // 8 : -(-e // 8)], count=e - s))

    in_parts(w.size, part)  # parts start at multiples of ALIGN, a multiple of 8
    return out
