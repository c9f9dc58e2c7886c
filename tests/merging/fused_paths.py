"""Helpers shared by the tests that compare the fused kernels (``merging.kernels``) with the
torch path: switching the kernels off, and comparing results bit for bit."""

from __future__ import annotations

import contextlib

import pytest
import torch

from sparse_merge.merging import kernels

DTYPES = [torch.float32, torch.bfloat16]
INTS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
# a genome of 2-D tensors, a 1-element bias and gaps merged flat, for the segment tests
SEGMENTS = [
    (0, 12 * 37, (12, 37)),
    (444, 449, (5,)),
    (460, 460 + 64 * 33, (64, 33)),
    (2572, 2573, (1,)),
    (2600, 2600 + 40 * 70, (40, 70)),
]
GENOME = 5500


@contextlib.contextmanager
def torch_path():
    """The fused kernels switched off: the torch path everywhere."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "usable", lambda *t: False)
        yield


def watch(mp: pytest.MonkeyPatch, module, name: str, seen) -> None:
    """Wrap ``module.name`` for the test: every call runs as before and hands its result to
    ``seen``."""
    original = getattr(module, name)

    def watched(*args, **kwargs):
        result = original(*args, **kwargs)
        seen(result)
        return result

    mp.setattr(module, name, watched)


class Spy:
    """Counts the calls of a fused merge kernel and of its norms' pass (``merging.kernels``
    functions named ``merges`` and ``sums``)."""

    def __init__(self, mp: pytest.MonkeyPatch, merges: str, sums: str) -> None:
        self.merges = self.sums = 0
        watch(mp, kernels, merges, lambda _: self.count("merges"))
        watch(mp, kernels, sums, lambda _: self.count("sums"))

    def count(self, what: str) -> None:
        setattr(self, what, getattr(self, what) + 1)

    def reset(self) -> None:
        self.merges = self.sums = 0


def both_paths(run):
    """``run()`` with the fused kernels, then on the torch path."""
    fused = run()
    with torch_path():
        expected = run()
    return fused, expected


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """NaN at the same places, every other value bit for bit (-0.0 differs from +0.0). NaN
    payloads are not compared: torch itself stores a bfloat16 NaN as 0xFFFF in its vectorised
    loops and as 0x7FC0 in their scalar tails."""
    nan = torch.isnan(a)
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(nan, torch.isnan(b))
        and torch.equal(a[~nan].view(INTS[a.dtype]), b[~nan].view(INTS[b.dtype]))
    )


def differences(a: torch.Tensor, b: torch.Tensor) -> str:
    """The first entries where ``a`` and ``b`` differ (for assertion messages)."""
    a, b = a.reshape(-1), b.reshape(-1)
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    bits_differ = a.view(INTS[a.dtype]) != b.view(INTS[b.dtype])
    bad = (nan_a != nan_b) | (~nan_a & ~nan_b & bits_differ)
    idx = bad.nonzero().view(-1)
    shown = ", ".join(f"[{i}] {a[i].item()!r} vs {b[i].item()!r}" for i in idx[:8].tolist())
    return f"{idx.numel()} entries differ (fused vs torch): {shown}"


def check(fused: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Assert ``same_bits``, showing where they differ."""
    assert same_bits(fused, expected), f"{what}: {differences(fused, expected)}"
