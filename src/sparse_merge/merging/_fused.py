"""The numba code of ``merging.kernels`` (imported on first use): the fused loops and the
float32 / bfloat16 loads, stores and roundings they are built from, chosen per array dtype at
compile time. A loop that rounds its intermediates takes ``work`` first: an empty array of the
dtype they round to (float32, or bfloat16 as uint16), which may differ from the arrays'."""

from __future__ import annotations

import numpy as np
from llvmlite import binding, ir
from numba import float32, njit, types, uint32
from numba.core import cgutils, config
from numba.extending import intrinsic, overload

from sparse_merge.merging.kernels import (
    BLOCK,  # keys computed per block (a multiple of LANES)
    MT_N,  # MT19937's state words
)

jit = njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")  # IEEE division
# inlined where it is called (in numba's IR), so that constant arguments fold away
inline = njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", inline="always")


@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` with one rounding (LLVM's ``llvm.fma``)."""

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return a(a, b, c), codegen


@intrinsic
def bits_to_float(typingctx, u):
    """The float32 whose bits are the integer ``u`` (taken as a uint32)."""

    def codegen(context, builder, signature, args):
        bits = context.cast(builder, args[0], signature.args[0], uint32)
        return builder.bitcast(bits, context.get_value_type(float32))

    return float32(u), codegen


@intrinsic
def float_to_bits(typingctx, f):
    """The bits of the float32 ``f`` as a uint32."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(uint32))

    return uint32(f), codegen


@jit
def to_bf16(v):
    """The bfloat16 bits (uint16) nearest the float32 ``v``, as c10::BFloat16 rounds: to
    nearest, ties to even; NaN to 0x7FC0 (branch-free, so that the loops vectorise)."""
    u = float_to_bits(v)
    nearest = (u + (((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF))) >> np.uint32(16)
    return np.uint16(nearest) if v == v else np.uint16(0x7FC0)


def load(x, i):
    """Element ``i`` of a float32 array, or of a bfloat16 one (its uint16 bits), as float32."""


def store(x, i, v):
    """Write the float32 ``v`` into element ``i`` of a float32 or bfloat16 (uint16) array."""


def rounded(x, v):
    """The float32 ``v`` rounded as ``x``'s dtype stores it, back as float32."""


def rounded_keep_nan(x, v):
    """``rounded``, except that a NaN keeps its payload instead of becoming torch's one
    stored NaN: two instructions fewer per rounding in bfloat16, for the intermediates of a
    loop, whose NaNs reach the output only through ``store`` (which stores torch's NaN) and
    change no other result. Exact for NaNs whose low 16 bits are zero, which are all the
    NaNs of these loops: bfloat16 inputs have none, and float32 ops pass on an input's
    payload or make 0xFFC00000 (a NaN with low bits set could round to infinity)."""


def _is_bf16(x) -> bool:
    return x.dtype == types.uint16


@overload(load, jit_options={"cache": True})
def _load(x, i):
    if _is_bf16(x):
        return lambda x, i: bits_to_float(np.uint32(x[i]) << np.uint32(16))
    return lambda x, i: x[i]


@overload(store, jit_options={"cache": True})
def _store(x, i, v):
    if _is_bf16(x):

        def impl(x, i, v):
            x[i] = to_bf16(v)

        return impl

    def impl(x, i, v):
        x[i] = v

    return impl


@overload(rounded, jit_options={"cache": True})
def _rounded(x, v):
    if _is_bf16(x):
        return lambda x, v: bits_to_float(np.uint32(to_bf16(v)) << np.uint32(16))
    return lambda x, v: v


HIGH_HALF = np.uint32(0xFFFF0000)


@overload(rounded_keep_nan, jit_options={"cache": True})
def _rounded_keep_nan(x, v):
    if _is_bf16(x):

        def impl(x, v):
            u = float_to_bits(v)
            nearest = u + (((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF))
            return bits_to_float(nearest & HIGH_HALF)

        return impl
    return lambda x, v: v


@jit
def weighted_sum2(out, x0, x1, c0, c1, divisor):
    """``out = (x0 * c0 + x1 * c1) / divisor``, accumulated in float32 (the second term a
    fused multiply-add), rounded once into ``out``'s dtype. Dividing by 1 changes nothing: a
    divisor of 1 (weights that sum to 1, or no normalisation) runs a loop without the division
    (``weighted_sum_loop``)."""
    if divisor == 1:
        weighted_sum_loop(out, x0, x1, c0, c1, divisor, False)
    else:
        weighted_sum_loop(out, x0, x1, c0, c1, divisor, True)


@inline
def weighted_sum_loop(out, x0, x1, c0, c1, divisor, divides):
    """The loop of ``weighted_sum2``, with the division where ``divides`` (a constant: numba
    drops the untaken branch, so the loop has none, which would keep LLVM from vectorising
    it)."""
    for i in range(out.size):
        total = fma(load(x1, i), c1, load(x0, i) * c0)
        if divides:
            total = total / divisor
        store(out, i, total)


@jit
def lerp_chain(work, out, x0, x1, c0, c1):
    """``out = x0 * c0``, then ``out = out + x1 * c1`` (a fused multiply-add), each op rounded
    to ``out``'s dtype: torch's ``mul(x0, c0, out=o).add_(x1, alpha=c1)``."""
    for i in range(out.size):
        first = rounded_keep_nan(work, load(x0, i) * c0)
        store(out, i, fma(load(x1, i), c1, first))


@jit
def task_arithmetic2(work, out, b, x0, x1, w0, w1, divisor, lam):
    """mergekit's task arithmetic of two models, every op rounded to the dtype as torch does
    in it: ``d_i = (x_i - b) * w_i``, ``m = d_0 + d_1``, ``m / divisor``, ``m * lam``,
    ``out = m + b``. Dividing and scaling by 1 change nothing (``m`` is already rounded to the
    dtype): with the usual settings (no normalisation, ``lambda_`` 1) the loop skips both ops
    and their roundings (``task_arithmetic_loop``; in bfloat16 6.7 -> 4.7 ms per 16 M
    entries, the same bits)."""
    if divisor == 1 and lam == 1:
        task_arithmetic_loop(work, out, b, x0, x1, w0, w1, divisor, lam, False)
    else:
        task_arithmetic_loop(work, out, b, x0, x1, w0, w1, divisor, lam, True)


@inline
def task_arithmetic_loop(work, out, b, x0, x1, w0, w1, divisor, lam, scales):
    """The loop of ``task_arithmetic2``, dividing by ``divisor`` and scaling by ``lam`` where
    ``scales`` (a constant: numba drops the untaken branch)."""
    for i in range(out.size):
        bi = load(b, i)
        d0 = rounded_keep_nan(work, rounded_keep_nan(work, load(x0, i) - bi) * w0)
        d1 = rounded_keep_nan(work, rounded_keep_nan(work, load(x1, i) - bi) * w1)
        m = rounded_keep_nan(work, d0 + d1)
        if scales:
            m = rounded_keep_nan(work, rounded_keep_nan(work, m / divisor) * lam)
        store(out, i, m + bi)


# ---- TIES and Model Breadcrumbs: top-k selection and the masked merge ----------------------

LANES = 16  # keys compared and compressed per vector
COUNT = 0xFFFF  # one of the four counts compress_bands_f32 returns


def _append_band(context, builder, values, lo, hi, out, m):
    """The code of ``compress_band`` once its 16 int32 keys ``values`` are loaded; ``lo``,
    ``hi``, ``out``, ``m``: (value, numba type) pairs. Returns the counts appended and below
    ``lo`` (int64 values)."""
    low = _splat(context, builder, *lo)
    inside = builder.and_(
        builder.icmp_signed(">=", values, low),
        builder.icmp_signed("<=", values, _splat(context, builder, *hi)),
    )
    dst = context.make_array(out[1])(context, builder, out[0])
    if _BY_TABLE:
        _compress_by_table(builder, values, inside, dst.data, m[0])
    else:
        vec = ir.VectorType(ir.IntType(32), LANES)
        compress = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(vec, [vec, inside.type, vec]),
            f"llvm.experimental.vector.compress.v{LANES}i32",
        )
        packed = builder.call(compress, [values, inside, ir.Constant(vec, ir.Undefined)])
        at = builder.gep(dst.data, [m[0]])
        builder.store(packed, builder.bitcast(at, vec.as_pointer()), align=4)
    return _popcount(builder, inside), _popcount(builder, builder.icmp_signed("<", values, low))


def _popcount(builder, mask):
    """The count of true lanes of the ``LANES``-lane ``mask``, as an int64."""
    popcount = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(ir.IntType(LANES), [ir.IntType(LANES)]),
        f"llvm.ctpop.i{LANES}",
    )
    bits = builder.call(popcount, [builder.bitcast(mask, ir.IntType(LANES))])
    return builder.zext(bits, ir.IntType(64))


def _compiled_features() -> set[str]:
    """The x86 features numba compiles for, as ``+name`` entries: those it hands LLVM
    (``NUMBA_CPU_FEATURES``, else the host's)."""
    features = config.CPU_FEATURES
    if features is None:
        features = binding.get_host_cpu_features().flatten()
    return set(features.split(","))


# AVX2 without AVX-512: the compress by a table of permutations (below) instead of LLVM's
# expansion of ``vector.compress``, which moves the lanes one by one: on a Zen 3, 0.36-0.44
# against 0.82-0.93 ns per key compressed from memory, and the float32 TIES selection pass of
# ``make bench ARGS=merge`` 32 -> 20-22 ms
_FEATURES = _compiled_features()
_BY_TABLE = "+avx2" in _FEATURES and "+avx512f" not in _FEATURES
# row r: the lanes of the set bits of r, in order (the rest 0): vpermd's indices
_PERMUTATIONS = [
    [i for i in range(8) if r >> i & 1] + [0] * (8 - r.bit_count()) for r in range(256)
]


def _compress_by_table(builder, values, inside, data, m):
    """Store the lanes of ``values`` (16 int32) where ``inside``, in order, at ``data[m]``:
    each half of 8 lanes permuted by the row of its 8 mask bits in ``_PERMUTATIONS`` (one
    ``vpermd``) and stored whole, the second half after the first's kept lanes. Writes 16
    lanes from ``m`` at most, as ``vector.compress`` does."""
    i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
    half = ir.VectorType(i32, 8)
    module = builder.module
    table = module.globals.get("sparse_merge_compress_table")
    if table is None:
        rows = ir.Constant(ir.ArrayType(half, 256), [ir.Constant(half, r) for r in _PERMUTATIONS])
        table = cgutils.global_constant(module, "sparse_merge_compress_table", rows)
        table.align = 32
    permd = cgutils.get_or_insert_function(
        module, ir.FunctionType(half, [half, half]), "llvm.x86.avx2.permd"
    )
    popcount = cgutils.get_or_insert_function(module, ir.FunctionType(i8, [i8]), "llvm.ctpop.i8")
    bits = builder.bitcast(inside, ir.IntType(LANES))
    for k in range(2):
        lanes = builder.shuffle_vector(
            values, values, ir.Constant(half, list(range(8 * k, 8 * k + 8)))
        )
        mask = builder.trunc(builder.lshr(bits, ir.Constant(bits.type, 8 * k)), i8)
        row = builder.gep(table, [ir.Constant(i64, 0), builder.zext(mask, i64)])
        packed = builder.call(permd, [lanes, builder.load(row, align=32)])
        builder.store(packed, builder.bitcast(builder.gep(data, [m]), half.as_pointer()), align=4)
        m = builder.add(m, builder.zext(builder.call(popcount, [mask]), m.type))


def _splat(context, builder, value, numba_type):
    """The scalar ``value`` (of ``numba_type``) as int32 in all ``LANES`` lanes of a vector."""
    i32 = ir.IntType(32)
    vec = ir.VectorType(i32, LANES)
    value = context.cast(builder, value, numba_type, types.int32)
    one = builder.insert_element(ir.Constant(vec, ir.Undefined), value, ir.Constant(i32, 0))
    return builder.shuffle_vector(one, one, ir.Constant(vec, [0] * LANES))


def _packed(builder, counts, width):
    """The int64 counts (each below 2^width) packed into one int64, the first lowest."""
    packed = counts[0]
    for k, count in enumerate(counts[1:], start=1):
        packed = builder.or_(packed, builder.shl(count, ir.Constant(ir.IntType(64), k * width)))
    return packed


def _magnitudes_f32(context, builder, signature, args):
    """The 16 int32 keys of ``|x[j:j + 16] - b[j:j + 16]|`` (the first three ``args``: float32
    arrays ``b``, ``x`` and ``j``), computed in registers: the float32 subtraction, its
    absolute value, its bits."""
    fvec = ir.VectorType(ir.FloatType(), LANES)

    def load(k):
        arr = context.make_array(signature.args[k])(context, builder, args[k])
        return _float_vector(context, builder, signature.args[k], arr.data, args[2])

    fabs = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(fvec, [fvec]), f"llvm.fabs.v{LANES}f32"
    )
    magnitude = builder.call(fabs, [builder.fsub(load(1), load(0))])
    return builder.bitcast(magnitude, ir.VectorType(ir.IntType(32), LANES))


@intrinsic
def compress_band(typingctx, keys, j, lo, hi, out, m):
    """Append the keys ``keys[j:j + 16]`` (int32) with ``lo <= key <= hi`` to ``out`` at ``m``,
    in order: vector compares, one ``llvm.experimental.vector.compress`` (AVX-512's
    ``vpcompressd`` into a register; other targets get LLVM's expansion) and one store of all
    16 lanes, so ``out`` needs room for 16 keys from ``m``. Returns how many were appended,
    plus the count of keys below ``lo`` times 2^32.

    Written as an intrinsic because LLVM does not vectorise a loop that appends conditionally:
    the plain loop costs ~6 cycles per key, this ~0.3."""

    def codegen(context, builder, signature, args):
        vec = ir.VectorType(ir.IntType(32), LANES)
        src = context.make_array(signature.args[0])(context, builder, args[0])
        values = builder.load(builder.gep(src.data, [args[1]]), align=4, typ=vec)
        pairs = list(zip(args, signature.args))
        return _packed(builder, _append_band(context, builder, values, *pairs[2:]), 32)

    return types.int64(keys, j, lo, hi, out, m), codegen


@intrinsic
def compress_band_f32(typingctx, b, x, j, lo, hi, out, m):
    """``compress_band`` of the keys of ``|x[j:j + 16] - b[j:j + 16]|`` (float32 arrays),
    computed in registers (``_magnitudes_f32``)."""

    def codegen(context, builder, signature, args):
        values = _magnitudes_f32(context, builder, signature, args)
        pairs = list(zip(args, signature.args))
        return _packed(builder, _append_band(context, builder, values, *pairs[3:]), 32)

    return types.int64(b, x, j, lo, hi, out, m), codegen


@intrinsic
def compress_bands_f32(typingctx, b, x, j, lo0, hi0, out0, m0, lo1, hi1, out1, m1):
    """``compress_band_f32`` into two bands at once, ``(lo0, hi0)`` into ``out0`` at ``m0``
    and ``(lo1, hi1)`` into ``out1`` at ``m1``, from one computation of the keys. Returns the
    four counts, 16 bits each: appended to band 0, below ``lo0``, appended to band 1, below
    ``lo1``."""

    def codegen(context, builder, signature, args):
        values = _magnitudes_f32(context, builder, signature, args)
        pairs = list(zip(args, signature.args))
        first = _append_band(context, builder, values, *pairs[3:7])
        second = _append_band(context, builder, values, *pairs[7:11])
        return _packed(builder, [*first, *second], 16)

    return types.int64(b, x, j, lo0, hi0, out0, m0, lo1, hi1, out1, m1), codegen


@jit
def magnitude_key(work, b, x, i):
    """The order key of ``|x[i] - b[i]|`` computed in the arrays' dtype: the bits of the
    non-negative float as an int32 (a bfloat16's own 16 bits)."""
    a = np.abs(rounded(work, load(x, i) - load(b, i)))
    return np.int32(float_to_bits(a) >> key_shift(work))


def key_shift(x):
    """How far a float32's bits shift right to give the bits of ``x``'s dtype (16 for
    bfloat16)."""


@overload(key_shift, jit_options={"cache": True})
def _key_shift(x):
    shift = np.uint32(16 if _is_bf16(x) else 0)
    return lambda x: shift


@jit
def magnitude_sample(work, b, x0, x1, step, out):
    """The keys (``magnitude_key``) of every ``step``-th entry of both models, into ``out``
    [2, ceil(n / step)]: one strided pass that reads ``b`` once for both."""
    for j in range(out.shape[1]):
        i = np.uint64(j) * np.uint64(step)
        out[0, j] = magnitude_key(work, b, x0, i)
        out[1, j] = magnitude_key(work, b, x1, i)


@jit
def magnitude_bands(work, b, x0, x1, lo, hi, below, bands, kept, marks):
    """One pass over ``b``, ``x0``, ``x1`` for the top-k thresholds of ``|x_i - b|``: up to
    two selections per model, selection ``s`` on model ``s // 2``. For each, the count of keys
    below ``lo[s]`` into ``below[s]`` and the keys in ``[lo[s], hi[s]]``, in index order,
    into ``bands[s]`` (their count in ``kept[s]``; -1 once they would not fit, the bracket
    given up). A selection with ``hi[s] < 0`` is unused (keys are not negative).
    ``marks[s, k]``: the count in ``bands[s]`` when block ``k`` (``BLOCK`` entries from
    ``k * BLOCK``; the last one, the rest) began, so a band entry's block can be found."""
    select_blocks(work, b, x0, x1, lo, hi, below, bands, kept, marks, False)


@jit
def magnitude_bands_f32(b, x0, x1, lo, hi, below, bands, kept, marks):
    """``magnitude_bands`` for float32, each key computed where it is compared
    (``compress_band_f32``), without a block of keys in memory between."""
    select_blocks(b, b, x0, x1, lo, hi, below, bands, kept, marks, True)


@inline
def select_blocks(work, b, x0, x1, lo, hi, below, bands, kept, marks, direct):
    """The loop of ``magnitude_bands``: each block's keys of both models computed into a
    buffer and compressed from there, or (``direct``, float32) computed in registers where
    each band compares them."""
    k0 = np.empty(0 if direct else BLOCK, np.int32)
    k1 = np.empty(0 if direct else BLOCK, np.int32)
    cap, whole = bands_begin(b, hi, below, bands, kept)
    for start in range(0, whole, BLOCK):
        block_begin(start, cap, kept, marks)
        if not direct:
            at = np.uint64(start)  # unsigned: numba skips its wrap-around of negative indices
            for j in range(BLOCK):
                k0[j] = magnitude_key(work, b, x0, at + np.uint64(j))
                k1[j] = magnitude_key(work, b, x1, at + np.uint64(j))
        for s in range(4):
            m = kept[s]
            if m < 0:
                continue
            x, keys = (x0, k0) if s < 2 else (x1, k1)
            band, low, high = bands[s], lo[s], hi[s]
            count = 0
            for j in range(0, BLOCK, LANES):
                if direct:
                    found = compress_band_f32(b, x, start + j, low, high, band, m)
                else:
                    found = compress_band(keys, j, low, high, band, m)
                m += found & 0xFFFFFFFF
                count += found >> 32
            kept[s] = m
            below[s] += count
    bands_end(work, b, x0, x1, lo, hi, below, bands, kept, marks, whole)


@jit
def bands_begin(b, hi, below, bands, kept):
    """The counts of a selection pass zeroed (a selection with ``hi < 0`` unused: -1); returns
    how many keys a band holds before it is given up, and where the whole blocks end."""
    for s in range(4):
        below[s] = 0
        kept[s] = 0 if hi[s] >= 0 else -1
    return bands.shape[1] - BLOCK, b.size - b.size % BLOCK


@jit
def block_begin(start, cap, kept, marks):
    """At the block from ``start``: each band's mark, and a band holding more than ``cap``
    keys given up (-1)."""
    for s in range(4):
        marks[s, start // BLOCK] = kept[s]
        if kept[s] > cap:
            kept[s] = -1


@jit
def bands_end(work, b, x0, x1, lo, hi, below, bands, kept, marks, whole):
    """The last mark of a selection pass, then its entries from ``whole`` on
    (``band_tail``)."""
    for s in range(4):
        marks[s, whole // BLOCK] = kept[s]
    band_tail(work, b, x0, x1, lo, hi, below, bands, kept, whole)


@jit
def band_tail(work, b, x0, x1, lo, hi, below, bands, kept, start):
    """The entries from ``start`` on of ``magnitude_bands``, one by one."""
    for i in range(start, b.size):
        key0 = magnitude_key(work, b, x0, i)
        key1 = magnitude_key(work, b, x1, i)
        for s in range(4):
            key = key0 if s < 2 else key1
            if key < lo[s]:
                below[s] += 1
            elif key <= hi[s] and kept[s] >= 0:
                if kept[s] >= bands.shape[1]:
                    kept[s] = -1
                else:
                    bands[s, kept[s]] = key
                    kept[s] += 1


@jit
def tie_end_in(work, b, x, band, marks, key, budget):
    """``kernels.tie_end_in``: the ``budget``-th key equal to ``key`` in ``band``, the block
    whose mark (``magnitude_bands``) comes last at or before it, the ties in the band before
    that block, then ``tie_end`` in that block for the rest of the budget; -1 if the band
    holds fewer."""
    seen, at = 0, -1
    for j in range(band.size):
        seen += band[j] == key
        if seen == budget:
            at = j
            break
    if at < 0:
        return -1
    block = np.searchsorted(marks, at, side="right") - 1
    seen = 0
    for j in range(marks[block]):
        seen += band[j] == key
    start, stop = block * BLOCK, min((block + 1) * BLOCK, b.size)
    value = bits_to_float(np.uint32(key) << key_shift(work))  # the magnitude of the key
    return start + tie_end(work, b[start:stop], x[start:stop], value, budget - seen)


@jit
def scatter_rows(order, values, out):
    """``kernels.scatter_rows``: ``out[r, order[r, j]] = values[j]``."""
    for r in range(out.shape[0]):
        row, columns = out[r], order[r]
        for j in range(values.size):
            row[columns[j]] = values[j]


@jit
def key_counts(keys, key):
    """The count of ``keys`` below ``key`` and the count equal to it."""
    below = equal = 0
    for i in range(keys.size):
        below += keys[i] < key
        equal += keys[i] == key
    return below, equal


@jit
def magnitude_bands2_f32(b, x0, x1, lo, hi, below, bands, kept, marks):
    """``magnitude_bands`` for float32 with two cuts per model (Model Breadcrumbs): each
    vector of keys computed once, in registers, and compressed into both of its model's bands
    (``compress_bands_f32``; 1.2x faster than the keys stored per block and compressed from
    there). A band given up (or unused) takes its keys at its start, where they are ignored."""
    cap, whole = bands_begin(b, hi, below, bands, kept)
    for start in range(0, whole, BLOCK):
        block_begin(start, cap, kept, marks)
        for first in range(0, 4, 2):
            x = x0 if first == 0 else x1
            second = first + 1
            m0, m1 = max(kept[first], 0), max(kept[second], 0)
            band0, band1 = bands[first], bands[second]
            lo0, hi0, lo1, hi1 = lo[first], hi[first], lo[second], hi[second]
            count0 = count1 = 0
            for j in range(start, start + BLOCK, LANES):
                found = compress_bands_f32(b, x, j, lo0, hi0, band0, m0, lo1, hi1, band1, m1)
                m0 += found & COUNT
                count0 += (found >> 16) & COUNT
                m1 += (found >> 32) & COUNT
                count1 += (found >> 48) & COUNT
            if kept[first] >= 0:
                kept[first] = m0
                below[first] += count0
            if kept[second] >= 0:
                kept[second] = m1
                below[second] += count1
    bands_end(b, b, x0, x1, lo, hi, below, bands, kept, marks, whole)


@jit
def tie_end(work, b, x, value, budget):
    """One past the index of the ``budget``-th entry (``budget >= 1``) whose ``|x - b|`` equals
    ``value``: the entries tied at a top-k threshold that are kept lie before it. Counted a
    block at a time (a loop that vectorises), then entry by entry in the block that holds
    it."""
    n, seen, start = b.size, 0, 0
    while start < n:
        stop = min(start + BLOCK, n)
        count = 0
        for i in range(start, stop):
            count += np.abs(rounded_keep_nan(work, load(x, i) - load(b, i))) == value
        if seen + count >= budget:
            for i in range(start, stop):
                seen += np.abs(rounded_keep_nan(work, load(x, i) - load(b, i))) == value
                if seen == budget:
                    return i + 1
        seen += count
        start = stop
    return n


@jit
def kept(a, above, upto):
    """Whether a magnitude ``a`` lies in a band given as ``band_ends``: ``above < a <= upto``
    (NaN never); two compares, no branch."""
    return (a > above) & (a <= upto)


@jit
def band_ends(lo, hi, tied_lo, tied_hi):
    """``(above, upto)`` with ``above < a <= upto`` exactly where ``lo < a < hi`` or ``a``
    equals an end whose ties are kept (``tied_lo`` / ``tied_hi``), for every magnitude ``a``
    (a float32 that is not below zero, or NaN; ``lo`` and ``hi`` any float32):
    a kept end moves the open side one float out, a dropped one moves the closed side one float
    in. One compare per end in the loops instead of a compare, an equality and their logic:
    without AVX-512's mask registers, LLVM packs and unpacks each boolean vector between them
    (the TIES merge loop took ~1.4 ns per entry in cache on a Zen 3)."""
    above = float_before(lo) if tied_lo else lo
    upto = hi if tied_hi else float_before(hi)
    return above, upto


@jit
def float_before(x):
    """The float32 just below ``x`` (-inf for -inf, NaN for NaN; below either zero, the
    smallest negative subnormal)."""
    x = np.float32(x)
    if x != x or x == -np.inf:
        return x
    if x == 0:
        return bits_to_float(np.uint32(0x80000001))
    bits = float_to_bits(x)
    return bits_to_float(bits - np.uint32(1) if x > 0 else bits + np.uint32(1))


@jit
def masked(v, keep):
    """``v * keep`` for a 0 / 1 mask, as torch multiplies by a float mask (a dropped entry
    becomes ``v * 0``: a zero of ``v``'s sign, NaN from NaN or ±inf), as one select of a
    product instead of a conversion of the mask and a product."""
    return v if keep else v * np.float32(0.0)


@jit
def magnitude_merge2(
    work, out, b, x0, x1, bands, ties, bounds, w0, w1, s0, s1, consensus, normalize, fixed, lam
):
    """``TaskArithmetic.merge_into_`` of two models with magnitude sparsification (TIES,
    Model Breadcrumbs), every op rounded to the dtype where torch rounds it. Model ``m`` keeps
    the entries whose ``|x_m - b|`` lies in ``bands[m]`` = (lo, hi); those equal to an end
    only within the index ranges ``[bounds[r], bounds[r + 1])`` where ``ties[r, m, end]``;
    then it is scaled by ``s_m`` (1: no rescaling) and by its weight ``w_m``. ``consensus``:
    0 none, 1 sum, 2 count; ``normalize``: divide by the kept weights (with consensus) or by
    ``fixed``. The ranges make the tie rules loop-invariant, so that each range's loop
    vectorises."""
    lo0, hi0, lo1, hi1 = bands[0, 0], bands[0, 1], bands[1, 0], bands[1, 1]
    unscaled = (s0 == 1) & (s1 == 1) & (lam == 1)
    none = np.uint64(0)
    draws = (none, none, none, none)  # the counter draws' arguments, unused
    rest = (w0, w1, s0, s1, normalize, fixed, lam)
    for r in range(bounds.size - 1):
        start, stop = bounds[r], bounds[r + 1]
        t0lo, t0hi, t1lo, t1hi = ties[r, 0, 0], ties[r, 0, 1], ties[r, 1, 0], ties[r, 1, 1]
        open_top = (hi0 == np.inf) & (hi1 == np.inf) & t0hi & t1hi  # TIES: nothing above
        o, bb, y0, y1 = out[start:stop], b[start:stop], x0[start:stop], x1[start:stop]
        cuts = (lo0, hi0, t0lo, t0hi, lo1, hi1, t1lo, t1hi)
        # one loop per consensus, and for the usual settings (no scales; TIES: open above),
        # each with its settings as constants: a loop that branches on them is up to 4x slower
        if consensus == 0 and unscaled and open_top:
            merge_range(work, o, bb, y0, y1, cuts, draws, rest, 0, True, OPEN)
        elif consensus == 0 and unscaled:
            merge_range(work, o, bb, y0, y1, cuts, draws, rest, 0, True, BAND)
        elif consensus == 0:
            merge_range(work, o, bb, y0, y1, cuts, draws, rest, 0, False, BAND)
        elif consensus == 1 and unscaled and open_top:
            merge_range(work, o, bb, y0, y1, cuts, draws, rest, 1, True, OPEN)
        elif consensus == 1 and unscaled:
            merge_range(work, o, bb, y0, y1, cuts, draws, rest, 1, True, BAND)
        elif consensus == 1:
            merge_range(work, o, bb, y0, y1, cuts, draws, rest, 1, False, BAND)
        else:
            merge_range(work, o, bb, y0, y1, cuts, draws, rest, 2, False, BAND)


OPEN, BAND, DRAWS, FLAGS = 0, 1, 2, 3  # how merge_range keeps entries (its ``keep``)


@inline
def merge_range(work, out, b, x0, x1, cuts, draws, rest, consensus, unscaled, keep):
    """A range of ``magnitude_merge2`` or ``random_merge2`` (views of their arrays) whose tie
    rules are fixed. ``cuts``: (lo, hi, ties at lo, ties at hi) of model 0, then of model 1;
    ``draws``: see ``drawn``; ``rest``: (w0, w1, s0, s1, normalize, fixed, lam). ``keep``:
    ``BAND``, model ``m`` keeps the entries in its band; ``OPEN``, the same for bands open
    above (the upper test skipped); ``DRAWS`` and ``FLAGS``, as ``drawn`` says. ``unscaled``:
    ``s_m`` and ``lam`` are 1 (their products skipped). The loop runs from 0: numba cannot
    tell an index from a runtime start is not negative, and its wrap-around of negative
    indices keeps the loop from vectorising (5x slower)."""
    lo0, hi0, t0lo, t0hi, lo1, hi1, t1lo, t1hi = cuts
    above0, upto0 = band_ends(lo0, hi0, t0lo, t0hi)
    above1, upto1 = band_ends(lo1, hi1, t1lo, t1hi)
    w0, w1, s0, s1, normalize, fixed, lam = rest
    one = np.float32(1.0)
    for i in range(out.size):
        bi = load(b, i)
        d0 = rounded_keep_nan(work, load(x0, i) - bi)
        d1 = rounded_keep_nan(work, load(x1, i) - bi)
        # numba drops the untaken branches (which would not type) for == tests, not for `in`
        if keep == DRAWS or keep == FLAGS:  # noqa: SIM109
            k0, k1 = drawn(draws, i, keep)
        elif keep == OPEN:
            k0, k1 = np.abs(d0) > above0, np.abs(d1) > above1
        else:
            k0, k1 = kept(np.abs(d0), above0, upto0), kept(np.abs(d1), above1, upto1)
        if unscaled:
            d0 = rounded_keep_nan(work, masked(d0, k0) * w0)
            d1 = rounded_keep_nan(work, masked(d1, k1) * w1)
        else:
            d0 = rounded_keep_nan(work, rounded_keep_nan(work, masked(d0, k0) * s0) * w0)
            d1 = rounded_keep_nan(work, rounded_keep_nan(work, masked(d1, k1) * s1) * w1)
        if consensus == 0:
            mixed = rounded_keep_nan(work, d0 + d1)
            divisor = fixed
        else:
            if consensus == 1:
                votes = rounded_keep_nan(work, d0 + d1)
            else:  # torch.sign: 0 for NaN and both zeros
                votes = (np.float32(d0 > 0) - np.float32(d0 < 0)) + (
                    np.float32(d1 > 0) - np.float32(d1 < 0)
                )
            sign = one if votes >= 0 else -one
            c0 = d0 * sign > 0
            c1 = d1 * sign > 0
            divisor = rounded_keep_nan(work, masked(w0, c0) + masked(w1, c1))
            divisor = divisor + np.float32(divisor == 0)
            mixed = rounded_keep_nan(work, masked(d0, c0) + masked(d1, c1))
        if normalize:
            mixed = rounded_keep_nan(work, mixed / divisor)
        if not unscaled:
            mixed = rounded_keep_nan(work, mixed * lam)
        store(out, i, mixed + bi)


@inline
def drawn(draws, i, keep):
    """Whether models 0 and 1 keep entry ``i`` of a range of a random sparsification.
    ``DRAWS``: ``draws`` is (seed 0, seed 1, p, offset: the range's first entry), an entry
    kept when its counter draw (``draw(seed_m, offset + i)``) is below ``p`` (an integer).
    ``FLAGS``: ``draws`` is (flags 0, flags 1, -, -), 0/1 bytes from the range's first entry
    (``flag_block``)."""
    first, second, p, offset = draws
    if keep == DRAWS:
        at = offset + np.uint64(i)
        return draw(first, at) < p, draw(second, at) < p
    return first[i] != 0, second[i] != 0


# ---- DARE with counter-based draws ---------------------------------------------------------

GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment (2^64 / golden ratio)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)


@jit
def draw(seed, i):
    """Draw ``i`` (uint64, from 0) of the counter-based stream ``seed`` as a 24-bit integer:
    the top bits of the ``i + 1``-th output of SplitMix64 (Steele, Lea & Flood 2014; Java's
    ``SplittableRandom``) seeded with ``seed``. Any draw costs a few integer ops, independent
    of the others: the loops vectorise."""
    z = seed + (i + np.uint64(1)) * GOLDEN
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    z = z ^ (z >> np.uint64(31))
    return z >> np.uint64(40)


@jit
def uniform(seed, i):
    """``draw(seed, i)`` as a float32 in [0, 1), ``2^-24`` apart (the resolution of
    ``torch.rand``). ``uniform < p`` is ``draw < ceil(p 2^24)``, the integer compare the loops
    use (2x faster than converting)."""
    return np.float32(draw(seed, i)) * np.float32(1.0 / (1 << 24))


@jit
def uniforms(seed, start, out):
    """``uniform(seed, start + j)`` into ``out[j]`` (float32)."""
    for j in range(out.size):
        out[j] = uniform(seed, start + np.uint64(j))


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath={"reassoc"})
def random_sums(work, b, x0, x1, seed0, seed1, p, offset, sums):
    """DARE's L1 norms before and after masking, added to ``sums`` [4] (float64: model 0
    before, after, model 1 before, after) for the entries of ``b``, ``x0``, ``x1`` (views
    starting at entry ``offset``), an entry kept when ``draw(seed_m, index) < p`` (``p``: the
    keep probability times 2^24, rounded up). float64 sums in any order (``reassoc``: the loop
    vectorises); mergekit sums float32 in torch's order."""
    sums_range(work, b, x0, x1, (seed0, seed1, p, offset), DRAWS, sums)


@inline
def sums_range(work, b, x0, x1, draws, keep, sums):
    """``random_sums`` of a range, its masks as ``drawn`` takes them."""
    before0 = after0 = before1 = after1 = 0.0
    for i in range(b.size):
        bi = load(b, i)
        a0 = np.float64(np.abs(rounded_keep_nan(work, load(x0, i) - bi)))
        a1 = np.float64(np.abs(rounded_keep_nan(work, load(x1, i) - bi)))
        k0, k1 = drawn(draws, i, keep)
        before0 += a0
        before1 += a1
        after0 += masked(a0, k0)
        after1 += masked(a1, k1)
    sums[0] += before0
    sums[1] += after0
    sums[2] += before1
    sums[3] += after1


@jit
def random_merge2(
    work, out, b, x0, x1, seed0, seed1, p, offset, w0, w1, s0, s1, consensus, normalize, fixed, lam
):
    """``TaskArithmetic.merge_into_`` of two models with DARE's random sparsification, its
    keep masks from counter draws: model ``m`` keeps entry ``i`` when ``draw(seed_m, i) < p``
    (``p``: the keep probability times 2^24, rounded up), the arrays views starting at entry
    ``offset`` of the tensor; otherwise as ``magnitude_merge2``."""
    rest = (w0, w1, s0, s1, normalize, fixed, lam)
    random_range(work, out, b, x0, x1, (seed0, seed1, p, offset), rest, consensus, DRAWS)


@inline
def random_range(work, out, b, x0, x1, draws, rest, consensus, keep):
    """``merge_range`` of a random sparsification (no bands, masks as ``drawn`` takes them),
    one loop per consensus."""
    inf, no = np.float32(np.inf), False
    cuts = (inf, inf, no, no, inf, inf, no, no)  # no bands
    if consensus == 0:
        merge_range(work, out, b, x0, x1, cuts, draws, rest, 0, False, keep)
    elif consensus == 1:
        merge_range(work, out, b, x0, x1, cuts, draws, rest, 1, False, keep)
    else:
        merge_range(work, out, b, x0, x1, cuts, draws, rest, 2, False, keep)


# ---- DARE and DELLA with torch's draws -----------------------------------------------------

MT_M = 397  # MT19937's shift (Matsumoto & Nishimura 1998)
MT_UPPER, MT_LOWER = np.uint32(0x80000000), np.uint32(0x7FFFFFFF)
MT_MATRIX = np.uint32(0x9908B0DF)


@inline
def mt_mix(u, v):
    """One word of MT19937's twist from the words ``u`` and ``v`` after it."""
    y = (u & MT_UPPER) | (v & MT_LOWER)
    return (y >> np.uint32(1)) ^ ((np.uint32(0) - (v & np.uint32(1))) & MT_MATRIX)


@inline
def mt_twist(s):
    """The next 624 words of MT19937's state ``s`` (uint32 [624]), in place, as
    ``at::mt19937::next_state`` makes them. Both loops read only words at least 227 apart
    from the one they write: they vectorise."""
    for i in range(MT_N - MT_M):
        s[i] = s[i + MT_M] ^ mt_mix(s[i], s[i + 1])
    for i in range(MT_N - MT_M, MT_N - 1):
        s[i] = s[i + MT_M - MT_N] ^ mt_mix(s[i], s[i + 1])
    s[MT_N - 1] = s[MT_M - 1] ^ mt_mix(s[MT_N - 1], s[0])


@inline
def mt_temper(y):
    """MT19937's output from the state word ``y``."""
    y ^= y >> np.uint32(11)
    y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
    y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
    return y ^ (y >> np.uint32(18))


MT_BLOCK = 4096  # entries compared per block, in cache (a multiple of 8)
# entries unpacked per block by the loops that read masks as bits: their 0/1 bytes stay in L1
# next to the streamed inputs (the merge loop ran ~10 % faster than with blocks of 4096)
FLAG_BLOCK = 1024
PACK = np.uint64(0x0102040810204080)  # byte t of a word of 0/1 bytes to bit 56 + t
SPREAD = np.uint64(0x0002040810204081)  # bit t (< 7) of a byte to bit 8t
LOW_BITS = np.uint64(0x0101010101010101)


@jit
def mt_keep_bits(state, at, p, out, n):
    """Keep bits of the next ``n`` words ``w`` of the MT19937 with state ``state`` (uint32
    [624], twisted in place) and next word ``at`` (624: twist first): bit ``j`` of ``out``
    (uint8, little bit order) is ``(w_j & 0xFFFFFF) * 2^-24 < p_j``, torch's ``rand() < p``
    (its float32 uniform), ``p`` float32 [n], or one probability as the integer
    ``ceil(p 2^24)``. Returns the next word. Per block of ``MT_BLOCK`` draws: their 24-bit
    words in a buffer (``mt_words``), then the compares packed into ``out``
    (``keep_block``)."""
    words = np.empty(MT_BLOCK + LANES, np.uint32)  # room for a last vector of 16
    flags = np.empty(MT_BLOCK, np.uint8)
    for start in range(0, n, MT_BLOCK):
        count = min(MT_BLOCK, n - start)
        at = mt_words(state, at, words, count)
        keep_block(words, count, p, start, flags, out)
    return at


@jit
def mt_words(state, at, words, count):
    """The next ``count`` outputs of the MT19937 ``state`` at word ``at``, their low 24 bits
    (``torch.rand``'s float32 uniform times 2^24), into ``words``; returns the next word."""
    done = 0
    while done < count:
        if at == MT_N:
            mt_twist(state)
            at = 0
        take = min(MT_N - at, count - done)
        # views, so that the loop runs from 0 and vectorises
        src, dst = state[at : at + take], words[done : done + take]
        for j in range(take):
            dst[j] = mt_temper(src[j]) & np.uint32(0xFFFFFF)
        done += take
        at += take
    return at


TWO_M24 = np.float32(1.0 / (1 << 24))


def keep_block(words, count, p, start, flags, out):
    """Bits ``start`` to ``start + count`` (``start`` a multiple of ``MT_BLOCK``) of
    ``mt_keep_bits``'s ``out`` from the block's 24-bit ``words``: for one probability, the
    integer compares 16 at a time into 16 bits (``keep_mask``); for one per entry, the float
    compares as 0/1 bytes in ``flags``, then eight bytes to one by a multiply."""


@overload(keep_block, jit_options={"cache": True})
def _keep_block(words, count, p, start, flags, out):
    if isinstance(p, types.Array):

        def impl(words, count, p, start, flags, out):
            limit = p[start : start + count]
            for j in range(count):
                flags[j] = np.float32(words[j]) * TWO_M24 < limit[j]
            flags[count : (count + 7) // 8 * 8] = 0
            packed, eights = out[start // 8 : (start + count + 7) // 8], flags.view(np.uint64)
            for j in range(packed.size):
                packed[j] = np.uint8((eights[j] * PACK) >> np.uint64(56))

        return impl

    def impl(words, count, p, start, flags, out):
        whole = count // LANES
        halves = out[start // 8 : start // 8 + 2 * whole].view(np.uint16)
        for k in range(whole):
            halves[k] = keep_mask(words, k * LANES, p)
        rest = count - whole * LANES
        if rest:  # the last vector's words past ``count`` are left from earlier: cut off
            cut = (np.uint32(1) << np.uint32(rest)) - np.uint32(1)
            bits = np.uint32(keep_mask(words, whole * LANES, p)) & cut
            byte = start // 8 + 2 * whole
            out[byte] = np.uint8(bits & np.uint32(0xFF))
            if rest > 8:
                out[byte + 1] = np.uint8(bits >> np.uint32(8))

    return impl


@intrinsic
def keep_mask(typingctx, words, j, limit):
    """Bit ``k`` set where ``words[j + k] < limit`` (uint32), for ``k`` < 16: one vector
    compare whose mask is stored as it is. Written as an intrinsic because numba's loops
    store compares as bytes, to be packed again (the draws went 3.4 -> 2.6 ms per 16 M)."""

    def codegen(context, builder, signature, args):
        vec = ir.VectorType(ir.IntType(32), LANES)
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        values = builder.load(builder.gep(arr.data, [args[1]]), align=4, typ=vec)
        limit = _splat(context, builder, args[2], signature.args[2])  # the same 32 bits
        return builder.bitcast(builder.icmp_unsigned("<", values, limit), ir.IntType(LANES))

    return types.uint16(words, j, limit), codegen


@inline
def flag_block(bits0, bits1, start, stop, flags):
    """Entries ``[start, stop)`` (``start`` a multiple of 8) of two masks packed as bits
    (little bit order) as 0/1 bytes in ``flags`` [2, >= stop - start + 7]: ``drawn``'s
    ``FLAGS`` arguments."""
    first, last = start // 8, (stop + 7) // 8
    spread(bits0[first:last], flags[0, : (last - first) * 8].view(np.uint64))
    spread(bits1[first:last], flags[1, : (last - first) * 8].view(np.uint64))
    none = np.uint64(0)
    return (flags[0], flags[1], none, none)


@inline
def spread(packed, words):
    """Each byte of ``packed`` as a word of eight 0/1 bytes (little bit order): bits 0-6
    spread by a multiply, bit 7 shifted."""
    for j in range(words.size):
        x = np.uint64(packed[j])
        low = ((x & np.uint64(0x7F)) * SPREAD) & LOW_BITS
        words[j] = low | ((x >> np.uint64(7)) << np.uint64(56))


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath={"reassoc"})
def bits_sums(work, b, x0, x1, bits0, bits1, sums):
    """``random_sums`` with the keep masks as bits (``uint8``, little bit order, from entry
    0 of the arrays), block by block."""
    flags = np.empty((2, FLAG_BLOCK), np.uint8)
    for start in range(0, b.size, FLAG_BLOCK):
        stop = min(start + FLAG_BLOCK, b.size)
        draws = flag_block(bits0, bits1, start, stop, flags)
        sums_range(work, b[start:stop], x0[start:stop], x1[start:stop], draws, FLAGS, sums)


@jit
def bits_merge2(
    work, out, b, x0, x1, bits0, bits1, w0, w1, s0, s1, consensus, normalize, fixed, lam
):
    """``random_merge2`` with the keep masks as bits (``uint8``, little bit order, from entry
    0 of the arrays), block by block."""
    rest = (w0, w1, s0, s1, normalize, fixed, lam)
    flags = np.empty((2, FLAG_BLOCK), np.uint8)
    for start in range(0, out.size, FLAG_BLOCK):
        stop = min(start + FLAG_BLOCK, out.size)
        draws = flag_block(bits0, bits1, start, stop, flags)
        o, bb, y0, y1 = out[start:stop], b[start:stop], x0[start:stop], x1[start:stop]
        random_range(work, o, bb, y0, y1, draws, rest, consensus, FLAGS)


# ---- SLERP's angle ----------------------------------------------------------------------------


DOT_VECTORS = 4  # vectors of LANES float32 lanes per dot product: DOT_LANES partial sums
DOT_LANES = DOT_VECTORS * LANES


def _float_vector(context, builder, array_type, data, index):
    """``LANES`` entries of a float32 or bfloat16 (uint16 bits) array from ``index``, as a
    vector of float32 (a bfloat16 is the upper half of its float32)."""
    fvec = ir.VectorType(ir.FloatType(), LANES)
    at = builder.gep(data, [index])
    if array_type.dtype != types.uint16:
        return builder.load(at, align=4, typ=fvec)
    i32 = ir.VectorType(ir.IntType(32), LANES)
    raw = builder.load(at, align=2, typ=ir.VectorType(ir.IntType(16), LANES))
    high = builder.shl(builder.zext(raw, i32), ir.Constant(i32, [16] * LANES))
    return builder.bitcast(high, fvec)


def _lanes_sum(builder, vectors):
    """The float32 lanes of ``vectors`` (``DOT_VECTORS`` of them) summed in float64 in one
    fixed order: the vectors pairwise, then the lower and upper halves of the sum, down to
    one lane."""
    wide = [builder.fpext(v, ir.VectorType(ir.DoubleType(), LANES)) for v in vectors]
    while len(wide) > 1:
        wide = [builder.fadd(wide[k], wide[k + 1]) for k in range(0, len(wide), 2)]
    total, width = wide[0], LANES
    while width > 1:
        width //= 2
        low, high = (
            builder.shuffle_vector(
                total, total, ir.Constant(ir.VectorType(ir.IntType(32), width), list(lanes))
            )
            for lanes in (range(width), range(width, 2 * width))
        )
        total = builder.fadd(low, high)
    return builder.extract_element(total, ir.Constant(ir.IntType(32), 0))


@intrinsic
def lane_dots(typingctx, x, y, start, count):
    """``(x.y, x.x, y.y)`` over entries ``[start, start + count)`` (``count`` a multiple of
    ``DOT_LANES``) of two float32 or bfloat16 (uint16) arrays, in one order on every CPU:
    lane ``j`` of ``DOT_LANES`` adds, in float32 and in index order, the float32 products of
    the entries ``start + j + DOT_LANES r``; then the lanes are summed in float64
    (``_lanes_sum``). Written as a vector loop whose sums stay in vector registers because a
    reduction numba vectorises needs ``reassoc``, and then its order follows the CPU's vector
    width: an SSE2 build (four lanes, as ARM's NEON) summed |a|^2 of 16 M bfloat16 entries
    1e-6 away from an AVX-512 build. The arrays must be contiguous."""
    if x.layout != "C" or y.layout != "C":
        return None  # its loads step one entry at a time

    def codegen(context, builder, signature, args):
        i64, fvec = ir.IntType(64), ir.VectorType(ir.FloatType(), LANES)
        data = [
            context.make_array(t)(context, builder, a).data
            for t, a in zip(signature.args, args[:2])
        ]
        first = context.cast(builder, args[2], signature.args[2], types.int64)
        stop = builder.add(first, context.cast(builder, args[3], signature.args[3], types.int64))
        head = builder.basic_block
        body, done = builder.append_basic_block("dots.body"), builder.append_basic_block("dots")
        builder.cbranch(builder.icmp_signed("<", first, stop), body, done)
        builder.position_at_end(body)
        i = builder.phi(i64)
        sums = [[builder.phi(fvec) for _ in range(DOT_VECTORS)] for _ in range(3)]
        added = [[], [], []]  # x.y, x.x, y.y: DOT_VECTORS vectors of lanes each
        for v in range(DOT_VECTORS):
            at = builder.add(i, ir.Constant(i64, v * LANES))
            u, w = (_float_vector(context, builder, signature.args[k], data[k], at) for k in (0, 1))
            for d, (p, q) in enumerate(((u, w), (u, u), (w, w))):
                added[d].append(builder.fadd(sums[d][v], builder.fmul(p, q)))
        step = builder.add(i, ir.Constant(i64, DOT_LANES))
        builder.cbranch(builder.icmp_signed("<", step, stop), body, done)
        i.add_incoming(first, head)
        i.add_incoming(step, body)
        builder.position_at_end(done)
        zero, totals = ir.Constant(fvec, None), [[], [], []]
        for phis, news, out in zip(sums, added, totals):  # every phi first, then the sums
            for phi, new in zip(phis, news):
                out.append(builder.phi(fvec))
                for node in (phi, out[-1]):
                    node.add_incoming(zero, head)
                    node.add_incoming(new, body)
        dots = [_lanes_sum(builder, vectors) for vectors in totals]
        return context.make_tuple(builder, signature.return_type, dots)

    return types.UniTuple(types.float64, 3)(x, y, start, count), codegen


@jit
def dots3(a, b, block, out):
    """``a.b``, ``a.a`` and ``b.b`` of every block of ``block`` entries (a multiple of
    ``DOT_LANES``; the last block, the rest) into ``out[k]`` (float64 [blocks, 3]), one pass
    reading both: ``lane_dots`` over the block's whole multiple of ``DOT_LANES``, then the
    float32 products of its last entries added in float64 in index order. float32 products
    are exact for bfloat16 inputs."""
    for k in range(out.shape[0]):
        start = k * block
        count = min(block, a.size - start)
        whole = count // DOT_LANES * DOT_LANES
        ab, aa, bb = lane_dots(a, b, start, whole)
        for i in range(start + whole, start + count):
            u, v = load(a, i), load(b, i)
            ab += np.float64(u * v)
            aa += np.float64(u * u)
            bb += np.float64(v * v)
        out[k, 0], out[k, 1], out[k, 2] = ab, aa, bb


@jit
def rank_score(w, scale, zeros, src, j):
    """The score of entry ``j`` of the row of ``w`` from ``src`` (both unsigned: numba then
    skips its wrap-around of negative indices, which stops a loop vectorising),
    ``|w| * scale[j]`` in float32; a score of zero (an entry already pruned) as ``zeros[j]``
    instead, ``j - n`` (``kernels.prune_rows_``): below every other score, and the zeros in
    index order, as a stable sort ranks them. NumPy's selection slows down 3x on a row whose
    zeros are half of it (an already pruned genome); on distinct values it does not, and it
    is ~2x faster than its sort. ``jit``, not ``inline``: numba's own inlining of it stopped
    the loops that call it vectorising (5-7x slower)."""
    s = np.abs(load(w, src + j)) * scale[j]
    return s if s != 0 else zeros[j]


@jit
def row_scores(w, scale, zeros, r0, r1, out):
    """The scores (``rank_score``) of rows ``r0 <= r < r1`` of ``w`` (float32, or bfloat16 as
    uint16; rows of ``n = scale.size`` entries) into ``out`` (float32, those rows one after
    the other): Wanda's score, ``scale`` its input norms, or the magnitude (``scale`` all
    ones, a multiply that changes nothing)."""
    n = np.uint64(scale.size)
    for r in range(r0, r1):
        src, dst = np.uint64(r) * n, np.uint64(r - r0) * n
        for j in range(n):
            out[dst + j] = rank_score(w, scale, zeros, src, j)


@jit
def prune_rows(w, scale, zeros, r0, r1, k, ranked, keep):
    """Zero the ``k`` lowest-scoring entries (``rank_score``) of each row ``r0 <= r < r1`` of
    ``w`` in place, of equal scores the lower-index ones first (a stable sort's mask), as
    torch's ``mul_`` by the bool keep-mask zeroes: a multiply by 1.0 or 0.0, stored.
    ``ranked``: those rows' scores (``row_scores``'s ``out``), each row's ``k``-th smallest at
    its place ``k - 1`` with every smaller one before it (sorted, or partitioned at
    ``k - 1``); ``0 < k < n``. ``keep``: the rows' keep-mask is written there (bool, rows
    one after the other), or nowhere when it is empty."""
    n, k = np.uint64(scale.size), np.uint64(k)
    masks = keep.size > 0
    for r in range(r0, r1):
        row, src = np.uint64(r - r0) * n, np.uint64(r) * n
        cut = ranked[row + k - np.uint64(1)]
        straddle = False  # another entry equal to the cut comes after it: some ties stay
        for j in range(k, n):
            straddle |= ranked[row + j] == cut
        head = n  # up to here the entries equal to the cut go, after it they stay
        if straddle:
            room = np.int64(k)  # the first ``k`` less the count below the cut go
            for j in range(k - np.uint64(1)):
                room -= ranked[row + j] < cut
            head = row_tie_end(w, scale, zeros, src, cut, room) + np.uint64(1)
        for j in range(head):  # two loops without a branch on the data: they vectorise
            kept = rank_score(w, scale, zeros, src, j) > cut
            mask_store(w, src + j, kept)
            if masks:
                keep[row + j] = kept
        for j in range(head, n):
            kept = rank_score(w, scale, zeros, src, j) >= cut
            mask_store(w, src + j, kept)
            if masks:
                keep[row + j] = kept


@jit
def mask_store(w, i, kept):
    """``w[i] *= kept`` as torch multiplies by a bool: by 1.0 or 0.0, the product stored."""
    store(w, i, load(w, i) * (np.float32(1.0) if kept else np.float32(0.0)))


TIE_BLOCK = 64  # entries whose ties ``row_tie_end`` counts at a time


@jit
def row_tie_end(w, scale, zeros, src, cut, room):
    """The index of the ``room``-th entry (from 1) scoring exactly ``cut`` in the row of ``w``
    from ``src``, in index order (there are more than ``room``): the ties are counted a block
    at a time (a loop that vectorises), and only the block where the count reaches ``room``
    is walked entry by entry. Walking every entry of a tied row, with a branch on each, had
    made pruning a dense bfloat16 model (whose rows mostly tie at the cut) per row 1.6x
    slower (``make bench ARGS=pruning``'s Qwen2-1.5B: 14.0 s against 8.8 s)."""
    n, block = np.uint64(scale.size), np.uint64(TIE_BLOCK)
    seen = np.int64(0)
    for start in range(np.uint64(0), n, block):
        stop = min(n, start + block)
        ties = np.int64(0)
        for j in range(start, stop):
            ties += rank_score(w, scale, zeros, src, j) == cut
        if seen + ties >= room:
            for j in range(start, stop):
                seen += rank_score(w, scale, zeros, src, j) == cut
                if seen == room:
                    return j
        seen += ties
    return n  # not reached: more entries than ``room`` equal the cut


@jit
def mul_bits(w, start, bits):
    """``w[start + i] *= bits[i]`` for every entry of ``bits`` (0 or 1, uint8), as torch's
    ``mul_`` by a bool mask (``mask_store``)."""
    s = np.uint64(start)
    for i in range(np.uint64(bits.size)):
        mask_store(w, s + i, bits[i] != 0)
