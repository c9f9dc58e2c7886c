"""SLERP crossover on flat genomes, written straight into an output buffer.

As in the M2N2 reference code, one angle is computed over the whole genome, and the
interpolation weight is ``w`` before a split point and ``1 - w`` after it.
"""

from __future__ import annotations

import torch

CHUNK = 1 << 22  # elements per chunk, bounds temporaries for billion-parameter genomes
EPS = 1e-7


def _dots(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(a.b, |a|^2, |b|^2) in float64, chunked."""
    ab = aa = bb = 0.0
    for s in range(0, a.numel(), CHUNK):
        x, y = a[s : s + CHUNK].double(), b[s : s + CHUNK].double()
        ab += float(x @ y)
        aa += float(x @ x)
        bb += float(y @ y)
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

    for lo, hi, t in ((0, split, w), (split, n, 1.0 - w)):
        ca, cb = coeffs(t)
        for s in range(lo, hi, CHUNK):
            e = min(s + CHUNK, hi)
            torch.add(a[s:e] * ca, b[s:e], alpha=cb, out=out[s:e])
    return out
