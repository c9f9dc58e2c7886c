"""The merge-method base class: subclasses merge one tensor (``merge_tensor``); the shared
driver ``merge_`` merges flat genomes tensor by tensor, with M2N2's split point, writing into
an output buffer that may be one of the inputs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import torch
from torch import Tensor

# One tensor inside a flat genome: elements [lo, hi) with its shape (None: merged flat).
Segment = tuple[int, int, tuple[int, ...] | None]


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
    """A merge method: ``merge_tensor`` merges one tensor of several models; ``merge_`` merges
    flat genomes [P] tensor by tensor into an output buffer.

    Class attributes: ``granularity`` (``tensor``: statistics such as SLERP's angle or TIES's
    top-k are taken per tensor), ``needs_base`` (works on task vectors ``x_i - base``) and
    ``stochastic`` (draws from the ``rng`` passed in).
    """

    name: str = "merge"
    granularity: str = "tensor"
    needs_base: bool = False
    stochastic: bool = False

    def merge_tensor(
        self,
        base: Tensor | None,
        tensors: Sequence[Tensor],
        weights: Sequence[float],
        rng: torch.Generator | None = None,
    ) -> Tensor:
        """Merge one tensor (any shape) of each model; a new tensor of the inputs' dtype."""
        raise NotImplementedError

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
        a tensor straddling it is merged as two flat pieces). Every piece is read completely
        before it is written, and temporaries are bounded by one tensor.
        """
        self.check_inputs(base, genomes, weights)
        n = genomes[0].numel()
        for name, t in [("out", out), *((f"genomes[{i}]", g) for i, g in enumerate(genomes))]:
            if t.dim() != 1 or t.numel() != n:
                raise ValueError(f"{self.name}: {name} has shape {tuple(t.shape)}, not [{n}]")
        if base is not None and (base.dim() != 1 or base.numel() != n):
            raise ValueError(f"{self.name}: base has shape {tuple(base.shape)}, not [{n}]")
        forward, backward = list(weights), list(weights)[::-1]
        for lo, hi, shape, reverse in _pieces(segments, n, split):
            shape = (hi - lo,) if shape is None else shape
            merged = self.merge_tensor(
                None if base is None else base[lo:hi].view(shape),
                [g[lo:hi].view(shape) for g in genomes],
                backward if reverse else forward,
                rng,
            )
            out[lo:hi].copy_(merged.reshape(-1))
        return out
