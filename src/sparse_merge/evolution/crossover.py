"""Crossover: a merge method applied to two archive members, written straight into an output
buffer; and ``slerp_``, the M2N2 reference's SLERP on flat genomes (one angle over the whole
genome, interpolation weight ``w`` before a split point and ``1 - w`` after it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from sparse_merge.errors import check_choice
from sparse_merge.hardware import pinned_threads
from sparse_merge.merging import kernels
from sparse_merge.merging.base import chunk_len, chunks

if TYPE_CHECKING:
    from sparse_merge.merging.base import MergeMethod, Segment

DOT_CHUNK = 1 << 20  # elements per BLAS dot: short float32 sums, accumulated in float64
EPS = 1e-7  # the smallest norm product the angle divides by
PARALLEL = 1e-6  # sin(angle) at or below it: linear interpolation, as the reference's `> 1e-6`


def _dots(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(a.b, |a|^2, |b|^2): float32 dots over chunks of ``DOT_CHUNK``, summed in float64
    (half-precision genomes are upcast chunk by chunk); on the CPU on one thread.

    Kept exactly as the published float32 results were computed (torch's BLAS, these chunks;
    one thread, as every published run but the SmolLM2 merge, which reruns to the same table):
    NumPy's BLAS on smaller chunks is a third faster here but moves the SLERP coefficients in
    their last bits, and with them every published table. MKL splits a dot between its
    threads, so the same dot on 1 and 2 threads differs in its last bits (from ~10 K entries
    on): on one thread the angle, and with it every child, does not depend on
    ``hardware.num_threads``."""
    ab = aa = bb = 0.0
    upcast = a.dtype not in (torch.float32, torch.float64)
    if upcast:  # two float32 buffers for all chunks (a fresh pair per chunk page-faults)
        bufs = torch.empty((2, min(a.numel(), DOT_CHUNK)), dtype=torch.float32, device=a.device)
    with pinned_threads(1):  # torch's CPU threads: no other device's dots change
        for s in range(0, a.numel(), DOT_CHUNK):
            x, y = a[s : s + DOT_CHUNK], b[s : s + DOT_CHUNK]
            if upcast:
                x, y = bufs[0, : x.numel()].copy_(x), bufs[1, : y.numel()].copy_(y)
            ab += float(torch.dot(x, y))
            aa += float(torch.dot(x, x))
            bb += float(torch.dot(y, y))
    return ab, aa, bb


def angle_dots(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """SLERP's (a.b, |a|^2, |b|^2): ``_dots``; for bfloat16 genomes on the CPU one fused pass
    instead (``merging.kernels.dots3``: exact products, float32 sums of 64 per lane added in
    float64 in a fixed order, the same bits on every CPU; 4x faster than upcasting every chunk
    for the BLAS dots, and ~100x closer to the exact dots). Whatever the interpolation's
    ``compute_dtype``: the angle is a float64 scalar either way, and no published result was
    computed from bfloat16 dots."""
    if a.dtype == b.dtype == torch.bfloat16 and kernels.usable(a, b):
        return kernels.dots3(a, b)
    return _dots(a, b)


@torch.no_grad()
def slerp_(
    out: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    w: float,
    split: int | None = None,
    work: torch.dtype | None = None,
) -> torch.Tensor:
    """``out = slerp(a, b, t)`` with ``t = w`` on ``[:split]`` and ``1 - w`` on ``[split:]``
    (``split=None``: ``t = w`` everywhere). ``t = 0`` gives ``a``, ``t = 1`` gives ``b``.

    ``out`` may be ``a`` or ``b``: the angle is computed first, and every element is read only
    at its own position before it is written. Falls back to linear interpolation when the
    genomes are (nearly) parallel.

    Traffic floor: 5 genomes. The angle needs ``a.b``, ``|a|^2`` and ``|b|^2`` before anything
    is written: one pass reading ``a`` and ``b`` (``angle_dots``); then one pass reading both and
    writing ``out``, in cache-sized chunks (``CHUNK``) so that ``out`` is written to memory
    once; on the CPU in float32 or bfloat16, one fused kernel with the same two ops
    (``merging.kernels.lerp_chain_``).

    ``work``: the dtype of the interpolation's two ops (default the genomes'; ``float32`` for
    bfloat16 genomes: both ops in float32, rounded once into ``out``).
    """
    n = a.numel()
    split = n if split is None else int(split)
    if not 0 <= split <= n:
        raise ValueError(f"split={split} outside [0, {n}]")
    into_b = out.data_ptr() == b.data_ptr()  # then scale b in place first, never read it after
    fused = kernels.usable(out, a, b) and a.dtype == b.dtype == out.dtype
    upcast = work is not None and work != out.dtype
    ab, aa, bb = angle_dots(a, b)
    cos = ab / max((aa * bb) ** 0.5, EPS)
    omega = torch.tensor(min(max(cos, -1.0), 1.0), dtype=torch.float64).acos().item()
    sin = torch.tensor(omega, dtype=torch.float64).sin().item()

    def coeffs(t: float) -> tuple[float, float]:
        if sin <= PARALLEL:  # parallel: slerp degenerates to lerp
            return 1.0 - t, t
        ca = torch.tensor((1.0 - t) * omega, dtype=torch.float64).sin().item() / sin
        cb = torch.tensor(t * omega, dtype=torch.float64).sin().item() / sin
        return ca, cb

    if upcast and not fused:  # two chunk-sized float32 buffers for the torch path
        bufs = torch.empty((2, chunk_len(n)), dtype=work, device=out.device)
    for lo, hi, t in ((0, split, w), (split, n, 1.0 - w)):
        ca, cb = coeffs(t)
        if fused:  # the same two ops, fused into one pass
            if into_b:
                kernels.lerp_chain_(out[lo:hi], b[lo:hi], a[lo:hi], cb, ca, work)
            else:
                kernels.lerp_chain_(out[lo:hi], a[lo:hi], b[lo:hi], ca, cb, work)
            continue
        for s, e in chunks(hi, lo):
            o = out[s:e]
            if upcast:  # the same two ops on float32 copies, rounded once into out
                (x, cx), (y, cy) = ((b, cb), (a, ca)) if into_b else ((a, ca), (b, cb))
                acc, other = bufs[0, : e - s].copy_(x[s:e]), bufs[1, : e - s].copy_(y[s:e])
                o.copy_(acc.mul_(cx).add_(other, alpha=cy))
            elif into_b:
                o.mul_(cb).add_(a[s:e], alpha=ca)
            else:  # out is a or a third buffer: no temporaries
                torch.mul(a[s:e], ca, out=o)
                o.add_(b[s:e], alpha=cb)
    return out


CROSSOVER_MODES = ("slerp_split", "slerp", "none")


def genome_slerp(compute_dtype: str = "input") -> MergeMethod:
    """SLERP with one angle over the whole genome: the M2N2 reference's crossover;
    ``compute_dtype``: see ``Slerp``."""
    from sparse_merge.merging.slerp import Slerp

    return Slerp(granularity="genome", compute_dtype=compute_dtype)


class Crossover:
    """The crossover operator of an evolver: a merge method (``sparse_merge.merging``) applied
    to two archive members with weights ``[1 - w, w]``, ``w ~ U[0, 1)``, written in place.

    Args:
        method: the merge method (``None``: the child is a copy of the first parent, i.e.
            mutation and pruning only). Methods that work on task vectors (TIES, DARE, ...)
            get the problem's base model.
        split: draw a split point ``k ~ U{0..P}``; the weights are reversed after it
            (``t = w`` on ``[:k]``, ``1 - w`` on ``[k:]`` for two parents, as in M2N2; the
            reference draws ``k ~ U{0..P-1}``, which never leaves the weights unreversed:
            a difference of one value in ``P + 1``, kept so that published runs reproduce).
        enabled: ``False`` switches crossover off whatever ``method`` says (the child is a
            copy of the first parent): the no-crossover ablation sets it, so that a config
            group composed after the evolver that sets ``method`` (``search=task_vectors``
            sets a linear merge) cannot switch crossover back on.

    The M2N2 default (``slerp_split``) is ``Crossover(Slerp(granularity="genome"), split=True)``:
    one SLERP angle over the whole genome, as in the M2N2 reference code. The names
    ``slerp_split``, ``slerp`` and ``none`` are accepted for the three classic variants.
    """

    def __init__(
        self, method: MergeMethod | None = None, split: bool = True, enabled: bool = True
    ) -> None:
        self.method, self.split = (method if enabled else None), bool(split)

    @classmethod
    def named(cls, mode: str) -> Crossover:
        """``slerp_split`` (M2N2), ``slerp`` (no split point) or ``none``."""
        check_choice("crossover", mode, CROSSOVER_MODES)
        if mode == "none":
            return cls(None, split=False)
        return cls(genome_slerp(), split=mode == "slerp_split")

    @property
    def mode(self) -> str:
        """A short name: ``none``, or the method's name with ``+split`` when it splits."""
        if self.method is None:
            return "none"
        name = self.method.describe()["name"]
        if name == "slerp" and getattr(self.method, "granularity", None) == "genome":
            return "slerp_split" if self.split else "slerp"
        return f"{name}+split" if self.split else name

    def describe(self) -> dict[str, object]:
        """The operator's settings (for checkpoints and logs)."""
        method = None if self.method is None else self.method.describe()
        return {"method": method, "split": self.split}

    @torch.no_grad()
    def warm_up(self, dtype: torch.dtype, device: torch.device) -> None:
        """Run the method once on small genomes of ``dtype``, so that what it compiles on first
        use (``merging.kernels``: 0.5-3 s, then cached on disk) is done before the first step:
        10,000 entries in two tensors, enough for every loop the method's fused path takes
        (TIES samples its thresholds from 4,096 entries on). No RNG of the run is drawn."""
        if self.method is None:
            return
        local = torch.Generator().manual_seed(0)
        a, b, base = (
            torch.randn(10_000, generator=local).to(dtype=dtype, device=device) for _ in range(3)
        )
        rng = torch.Generator(device).manual_seed(0)
        split = 5_000 if self.split else None
        self.method.merge_(a, base, [a, b], [0.5, 0.5], split=split, rng=rng)

    @torch.no_grad()
    def __call__(
        self,
        out: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        generator: torch.Generator,
        base: torch.Tensor | None = None,
        segments: Sequence[Segment] | None = None,
    ) -> dict[str, float | int | None]:
        """Write the child of ``a`` and ``b`` into ``out`` (which may be ``a`` or ``b``);
        returns the operator parameters drawn (``weight``, ``split``) for the lineage log."""
        if self.method is None:
            if out.data_ptr() != a.data_ptr():
                out.copy_(a)
            return {"weight": None, "split": None}
        w = float(torch.rand((), generator=generator, dtype=torch.float64))
        split = None
        if self.split:
            split = int(torch.randint(0, a.numel() + 1, (), generator=generator))
        self.method.merge_(
            out, base, [a, b], [1.0 - w, w], segments=segments, split=split, rng=generator
        )
        return {"weight": w, "split": split}
