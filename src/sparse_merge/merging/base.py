"""The merge-method base class: subclasses merge one tensor into an output buffer
(``merge_into_``), chunk by chunk; the shared driver ``merge_`` merges flat genomes tensor by
tensor, with M2N2's split point, writing into an output buffer that may be one of the inputs.

Crossover runs a merge for every child on genomes of billions of elements, so the kernels
stream: every genome-sized pass reads (and writes) each element once, in chunks of ``CHUNK``
elements whose temporaries stay in cache, with fused in-place torch ops. What each method must
move at minimum is its ``traffic_floor``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import torch
from torch import Tensor

from sparse_merge.merging import kernels

# One tensor inside a flat genome: elements [lo, hi) with its shape (None: merged flat).
Segment = tuple[int, int, tuple[int, ...] | None]

# Elements per chunk of the streaming kernels (a multiple of 64, so that the vectorised torch
# kernels split every chunk as they split the whole tensor). On a 2-core EPYC (1 MiB L2, 32 MiB
# L3) with one thread, 64K-element chunks lose ~1 genome pass to the ~3 us each torch op costs
# in Python; 1M-element chunks spill the buffers of a multi-op kernel out of L3.
CHUNK = 1 << 19


# compute_dtype (TaskArithmetic, Slerp): ``input``, every op in the tensors' dtype (mergekit's
# and the M2N2 reference's arithmetic), or ``float32`` for these dtypes (rounded once)
COMPUTE_DTYPES = ("input", "float32")
LOW_PRECISION = (torch.bfloat16, torch.float16)


def work_dtype(compute_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a merge computes in on tensors of ``dtype`` under ``compute_dtype``."""
    return torch.float32 if compute_dtype == "float32" and dtype in LOW_PRECISION else dtype


def compute_setting(compute_dtype: str) -> dict[str, str]:
    """``compute_dtype`` for a method's ``describe()``, listed only when it is not the default:
    runs and checkpoints from before the setting existed describe the same merge, so they
    still resume and their stored results still match."""
    return {} if compute_dtype == "input" else {"compute_dtype": compute_dtype}


def chunk_len(n: int) -> int:
    """Elements in the chunk buffers of a kernel over ``n`` elements: ``min(n, CHUNK)``."""
    return min(n, CHUNK)


def chunks(stop: int, start: int = 0) -> Iterator[tuple[int, int]]:
    """``(s, e)`` of the consecutive chunks of ``CHUNK`` elements that cover ``[start, stop)``."""
    for s in range(start, stop, CHUNK):
        yield s, min(s + CHUNK, stop)


def weighted_sum_(
    out: Tensor,
    tensors: Sequence[Tensor],
    coeffs: Sequence[float],
    divisor: float | None = None,
    scratch: Tensor | None = None,
) -> Tensor:
    """``out = sum_i coeffs[i] * tensors[i] (/ divisor)`` over flat tensors [n], accumulated in
    float32 (float64 for float64 inputs) chunk by chunk and rounded once into ``out``'s dtype;
    ``out`` may be one of ``tensors``. The same arithmetic as ``(x_0 * c_0).add_(x_1, alpha=c_1)
    ... .div_(divisor)`` on whole tensors: bit-identical to it.

    Traffic: one pass reading every tensor and writing ``out`` (``add`` with ``alpha`` is one
    fused multiply-add). Two float32 or bfloat16 tensors on the CPU take one fused kernel with
    the same arithmetic (``merging.kernels``); otherwise the sum builds up in ``out``'s chunk while it is in cache, or in a
    chunk-sized accumulator (``scratch``, [>= ``chunk_len(n)``], else allocated) when ``out``
    has another dtype or is one of the tensors still to be read."""
    if len(tensors) == 2 and kernels.usable(out, *tensors):  # one fused pass
        return kernels.weighted_sum2_(out, tensors, coeffs, divisor)
    first, n = tensors[0], out.numel()
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    in_place = out.dtype == dtype and all(t.data_ptr() != out.data_ptr() for t in tensors[1:])
    if not in_place and scratch is None:
        scratch = torch.empty(chunk_len(n), dtype=dtype, device=out.device)
    for s, e in chunks(n):
        o = out[s:e]
        acc = o if in_place else scratch[: e - s]  # [c]
        if first.dtype == dtype:
            torch.mul(first[s:e], coeffs[0], out=acc)
        else:
            acc.copy_(first[s:e]).mul_(coeffs[0])
        # the last op writes the output, unless it would cast (torch's slow mixed-dtype path)
        cast = o.dtype != dtype
        fused_add = acc is not o and not cast and divisor is None and len(tensors) > 1
        rest = len(tensors) - 1 if fused_add else len(tensors)
        for x, c in zip(tensors[1:rest], coeffs[1:rest]):
            acc.add_(x[s:e], alpha=c)
        if fused_add:
            torch.add(acc, tensors[-1][s:e], alpha=coeffs[-1], out=o)
        elif divisor is not None and acc is not o and not cast:
            torch.div(acc, divisor, out=o)
        else:
            if divisor is not None:
                acc.div_(divisor)
            if acc is not o:
                o.copy_(acc)
    return out


class _SlotLike(Protocol):
    offset: int
    shape: Sequence[int]

    @property
    def stop(self) -> int: ...


def tensor_segments(slots: Iterable[_SlotLike]) -> list[Segment]:
    """The segments of a ``ParamSpace``'s slots: one per parameter tensor, in its shape."""
    return [(int(s.offset), int(s.stop), tuple(int(d) for d in s.shape)) for s in slots]


def _pieces(
    segments: Sequence[Segment] | None, n: int, split: int | None
) -> Iterator[tuple[int, int, tuple[int, ...] | None, bool]]:
    """``(lo, hi, shape, reversed)`` for every piece of a genome of ``n`` elements: the
    segments in order, the gaps between them flat, a segment straddling ``split`` cut into two
    flat pieces; ``reversed`` marks pieces at or after ``split``."""
    if split is not None and not 0 <= split <= n:
        raise ValueError(f"split={split} outside [0, {n}]")
    segs = [(0, n, None)] if segments is None else sorted(segments, key=lambda s: s[0])
    covered: list[Segment] = []
    pos = 0
    for lo, hi, shape in segs:
        lo, hi = int(lo), int(hi)
        if not pos <= lo <= hi <= n:
            raise ValueError(
                f"segment ({lo}, {hi}) overlaps the previous one or lies outside [0, {n}]"
            )
        if shape is not None and torch.Size(shape).numel() != hi - lo:
            raise ValueError(f"segment ({lo}, {hi}) has {hi - lo} elements, shape {shape} not")
        if lo > pos:
            covered.append((pos, lo, None))  # a gap: merged flat
        covered.append((lo, hi, None if shape is None else tuple(shape)))
        pos = hi
    if pos < n:
        covered.append((pos, n, None))
    for lo, hi, shape in covered:
        if lo == hi:
            continue
        if split is None or hi <= split:
            yield lo, hi, shape, False
        elif lo >= split:
            yield lo, hi, shape, True
        else:
            yield lo, split, None, False
            yield split, hi, None, True


class MergeMethod:
    """A merge method: ``merge_into_`` merges one tensor of several models into an output
    buffer; ``merge_tensor`` returns that merge as a new tensor; ``merge_`` merges flat genomes
    [P] tensor by tensor into an output buffer.

    Class attributes: ``granularity`` (``tensor``: statistics such as SLERP's angle or TIES's
    top-k are taken per tensor), ``needs_base`` (works on task vectors ``x_i - base``) and
    ``stochastic`` (draws from the ``rng`` passed in).
    """

    name: str = "merge"
    granularity: str = "tensor"
    needs_base: bool = False
    stochastic: bool = False

    def scratch(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        """A buffer of ``shape`` kept by the method between merges, for the chunk buffers of
        its kernels (allocating those few MiB afresh for every tensor costs page faults worth
        a genome pass per merge of a 10-tensor genome). ``name`` tells a kernel's buffers
        apart; two buffers of one name are the same memory."""
        buffers = self.__dict__.setdefault("_scratch", {})
        key, numel = (name, dtype, torch.device(device)), math.prod(shape)
        buf = buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def __getstate__(self) -> dict[str, object]:
        """The settings, without the scratch buffers (pickling, copying)."""
        return {k: v for k, v in self.__dict__.items() if k != "_scratch"}

    def merge_into_(
        self,
        out: Tensor,
        base: Tensor | None,
        tensors: Sequence[Tensor],
        weights: Sequence[float],
        rng: torch.Generator | None = None,
    ) -> Tensor:
        """Merge one contiguous tensor (any shape) of each model into ``out`` (same shape,
        contiguous, any floating dtype; it may be one of the inputs or the base) and return it.
        Temporaries are bounded by ``CHUNK`` elements (a method that cannot says so)."""
        raise NotImplementedError

    @torch.no_grad()
    def merge_tensor(
        self,
        base: Tensor | None,
        tensors: Sequence[Tensor],
        weights: Sequence[float],
        rng: torch.Generator | None = None,
    ) -> Tensor:
        """Merge one tensor (any shape) of each model; a new tensor of the inputs' dtype (the
        base's for methods that use it)."""
        base = base if self.needs_base else None
        self.check_inputs(base, tensors, weights)
        like = tensors[0] if base is None else base
        out = torch.empty_like(like, memory_format=torch.contiguous_format)
        base = None if base is None else base.contiguous()
        return self.merge_into_(out, base, [t.contiguous() for t in tensors], weights, rng)

    def traffic_floor(self, n_models: int) -> int:
        """Genome-sized passes of memory traffic (elements read plus written, in units of the
        genome's size) that merging ``n_models`` genomes cannot avoid; here one pass reading
        every input and writing the output."""
        return n_models + int(self.needs_base) + 1

    def describe(self) -> dict[str, object]:
        """The method's name and settings (for logs and reports)."""
        return {"name": self.name}

    def __repr__(self) -> str:
        settings = {k: v for k, v in self.describe().items() if k != "name"}
        args = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        return f"{type(self).__name__}({args})"

    def check_inputs(
        self, base: Tensor | None, tensors: Sequence[Tensor], weights: Sequence[float]
    ) -> None:
        """Raise ``ValueError`` unless there is one weight per tensor, the shapes agree and a
        base is given when the method needs one; ``TypeError`` for non-floating-point tensors."""
        if len(tensors) == 0:
            raise ValueError(f"{self.name}: no tensors to merge")
        if not tensors[0].is_floating_point():
            raise TypeError(f"{self.name} needs floating-point tensors, not {tensors[0].dtype}")
        if len(weights) != len(tensors):
            raise ValueError(f"{self.name}: {len(weights)} weights for {len(tensors)} tensors")
        shape = tensors[0].shape
        if any(t.shape != shape for t in tensors):
            raise ValueError(f"{self.name}: shapes differ: {[tuple(t.shape) for t in tensors]}")
        if self.needs_base and base is None:
            raise ValueError(
                f"{self.name} merges task vectors (x_i - base) and needs the base model; "
                "the problem has none (give the model config a base)"
            )
        if base is not None and base.shape != shape:
            raise ValueError(f"{self.name}: base shape {tuple(base.shape)} != {tuple(shape)}")

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
        """Merge flat genomes [P] into ``out`` [P] (which may be one of them or the base) and
        return it.

        ``segments`` are the genome's tensors (None: the whole genome is one tensor); elements
        ``[:split]`` use ``weights`` and ``[split:]`` the weights reversed (M2N2's split point;
        a tensor straddling it is merged as two flat pieces). Each piece is merged straight
        into ``out`` by ``merge_into_``: read completely before it is written, with
        temporaries bounded by ``CHUNK`` elements.
        """
        self.check_inputs(base, genomes, weights)
        base = base if self.needs_base else None
        n = genomes[0].numel()
        for name, t in [("out", out), *((f"genomes[{i}]", g) for i, g in enumerate(genomes))]:
            if t.dim() != 1 or t.numel() != n:
                raise ValueError(f"{self.name}: {name} has shape {tuple(t.shape)}, not [{n}]")
        if base is not None and (base.dim() != 1 or base.numel() != n):
            raise ValueError(f"{self.name}: base has shape {tuple(base.shape)}, not [{n}]")
        forward, backward = list(weights), list(weights)[::-1]
        for lo, hi, shape, reverse in _pieces(segments, n, split):
            shape = (hi - lo,) if shape is None else shape
            self.merge_into_(
                out[lo:hi].view(shape),
                None if base is None else base[lo:hi].view(shape),
                [g[lo:hi].view(shape) for g in genomes],
                backward if reverse else forward,
                rng,
            )
        return out
