"""SLERP crossover on flat genomes, written straight into an output buffer.

As in the M2N2 reference code, one angle is computed over the whole genome, and the
interpolation weight is ``w`` before a split point and ``1 - w`` after it.
"""

from __future__ import annotations

import torch

from sparse_merge.errors import check_choice

CHUNK = 1 << 22  # elements per chunk, bounds temporaries for billion-parameter genomes
EPS = 1e-7


DOT_CHUNK = 1 << 20  # elements per BLAS dot: short float32 sums, accumulated in float64


def _dots(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(a.b, |a|^2, |b|^2): float32 dots over chunks of ``DOT_CHUNK``, summed in float64
    (half-precision genomes are upcast chunk by chunk)."""
    ab = aa = bb = 0.0
    for s in range(0, a.numel(), DOT_CHUNK):
        x, y = a[s : s + DOT_CHUNK], b[s : s + DOT_CHUNK]
        if x.dtype not in (torch.float32, torch.float64):
            x, y = x.float(), y.float()
        ab += float(torch.dot(x, y))
        aa += float(torch.dot(x, x))
        bb += float(torch.dot(y, y))
    return ab, aa, bb


@torch.no_grad()
def slerp_(
    out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w: float, split: int | None = None
) -> torch.Tensor:
    """``out = slerp(a, b, t)`` with ``t = w`` on ``[:split]`` and ``1 - w`` on ``[split:]``
    (``split=None``: ``t = w`` everywhere). ``t = 0`` gives ``a``, ``t = 1`` gives ``b``.

    ``out`` may be ``a`` or ``b``: the angle is computed first, and every element is read only
    at its own position before it is written. Falls back to linear interpolation when the
    genomes are (nearly) parallel.
    """
    n = a.numel()
    split = n if split is None else int(split)
    if not 0 <= split <= n:
        raise ValueError(f"split={split} outside [0, {n}]")
    ab, aa, bb = _dots(a, b)
    cos = ab / max((aa * bb) ** 0.5, EPS)
    omega = torch.tensor(min(max(cos, -1.0), 1.0), dtype=torch.float64).acos().item()
    sin = torch.tensor(omega, dtype=torch.float64).sin().item()

    def coeffs(t: float) -> tuple[float, float]:
        if sin < EPS:  # parallel: slerp degenerates to lerp
            return 1.0 - t, t
        ca = torch.tensor((1.0 - t) * omega, dtype=torch.float64).sin().item() / sin
        cb = torch.tensor(t * omega, dtype=torch.float64).sin().item() / sin
        return ca, cb

    into_b = out.data_ptr() == b.data_ptr()  # then scale b in place first, never read it after
    for lo, hi, t in ((0, split, w), (split, n, 1.0 - w)):
        ca, cb = coeffs(t)
        for s in range(lo, hi, CHUNK):
            e = min(s + CHUNK, hi)
            o = out[s:e]
            if into_b:
                o.mul_(cb).add_(a[s:e], alpha=ca)
            else:  # out is a or a third buffer: no temporaries
                torch.mul(a[s:e], ca, out=o)
                o.add_(b[s:e], alpha=cb)
    return out


CROSSOVER_MODES = ("slerp_split", "slerp", "none")


class Crossover:
    """The crossover operator of an evolver, one of three variants, always in place:

    * ``slerp_split`` (M2N2): SLERP with a random weight ``w ~ U[0, 1)`` and a random split
      point ``k ~ U{0..P}``: ``t = w`` on ``[:k]`` and ``1 - w`` on ``[k:]``;
    * ``slerp``: SLERP with a random weight, no split point;
    * ``none``: the child is a copy of the first parent (mutation and pruning only).
    """

    def __init__(self, mode: str = "slerp_split") -> None:
        self.mode = check_choice("crossover", mode, CROSSOVER_MODES)

    @torch.no_grad()
    def __call__(
        self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, generator: torch.Generator
    ) -> dict[str, float | int | None]:
        """Write the child of ``a`` and ``b`` into ``out`` (which may be ``a`` or ``b``);
        returns the operator parameters drawn (``weight``, ``split``) for the lineage log."""
        if self.mode == "none":
            if out.data_ptr() != a.data_ptr():
                out.copy_(a)
            return {"weight": None, "split": None}
        w = float(torch.rand((), generator=generator, dtype=torch.float64))
        split = None
        if self.mode == "slerp_split":
            split = int(torch.randint(0, a.numel() + 1, (), generator=generator))
        slerp_(out, a, b, w, split)
        return {"weight": w, "split": split}
