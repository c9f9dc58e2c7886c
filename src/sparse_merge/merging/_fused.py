"""The numba code of ``merging.kernels`` (imported on first use): the fused loops and the
float32 / bfloat16 loads, stores and roundings they are built from, chosen per array dtype at
compile time."""

from __future__ import annotations

import numpy as np
from numba import float32, njit, types, uint32
from numba.extending import intrinsic, overload

jit = njit(cache=True, nogil=True, boundscheck=False)


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


@jit
def weighted_sum2(out, x0, x1, c0, c1, divisor):
    """``out = (x0 * c0 + x1 * c1) / divisor``, accumulated in float32 (the second term a
    fused multiply-add), rounded once into ``out``'s dtype. Dividing by 1 changes nothing, so
    the loop has no branch (a branch keeps LLVM from vectorising it)."""
    for i in range(out.size):
        store(out, i, fma(load(x1, i), c1, load(x0, i) * c0) / divisor)


@jit
def lerp_chain(out, x0, x1, c0, c1):
    """``out = x0 * c0``, then ``out = out + x1 * c1`` (a fused multiply-add), each op rounded
    to ``out``'s dtype: torch's ``mul(x0, c0, out=o).add_(x1, alpha=c1)``."""
    for i in range(out.size):
        first = rounded(out, load(x0, i) * c0)
        store(out, i, fma(load(x1, i), c1, first))


@jit
def task_arithmetic2(out, b, x0, x1, w0, w1, divisor, lam):
    """mergekit's task arithmetic of two models, every op rounded to the dtype as torch does
    in it: ``d_i = (x_i - b) * w_i``, ``m = d_0 + d_1``, ``m / divisor``, ``m * lam``,
    ``out = m + b``. A divisor or scale of 1 changes nothing (no branch in the loop)."""
    for i in range(out.size):
        bi = load(b, i)
        d0 = rounded(out, rounded(out, load(x0, i) - bi) * w0)
        d1 = rounded(out, rounded(out, load(x1, i) - bi) * w1)
        m = rounded(out, rounded(out, rounded(out, d0 + d1) / divisor) * lam)
        store(out, i, m + bi)
