"""torch's draws (``draws="torch"``, the default) for DARE and DELLA, drawn in numba.

- ``kernels.bernoulli_bits`` is ``torch.rand(n, generator=rng) < p`` packed as bits, for any
  count and any place in the generator's stream (fresh, mid-block, at a twist), any ``p``
  from 0 to 1 (and beyond, and NaN), one float or one per entry (then also ``torch.bernoulli``'s masks), and
  leaves the generator in the state ``torch.rand`` leaves it; a generator it cannot read
  gets None (and the merge draws with torch);
- DARE of two models through the fused kernels (``kernels.bits_sums``,
  ``kernels.bits_merge2_``) gives the bits of the torch path and of torch's own draws, with
  every consensus, rescaling, normalisation, float32 and bfloat16, sizes up to past a chunk
  (where the L1 norms sum in float64 on both paths), segments, a split point and in place;
- DELLA's masks are ``torch.bernoulli`` of its probabilities, merged by the fused loop when
  its blocks of rows start at whole bytes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparse_merge.merging import kernels
from sparse_merge.merging.base import CHUNK
from sparse_merge.merging.task_arithmetic import TaskArithmetic

from .fused_paths import DTYPES, GENOME, SEGMENTS, Spy, both_paths, check, same_bits
from .test_counter_draws import (
    CONFIGS,
    KINDS,
    SEGMENT_METHODS,
    SIZES,
    VARIANTS,
    dare_settings,
    della_keep,
    della_probs,
    from_yaml,
    gen,
    keep_p,
    merge_both,
    models,
)

needs_numba = pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba is not installed")

COUNTS = [0, 1, 7, 8, 9, 623, 624, 625, 1249, 4096, 4097, 100_003]
BEFORE = [None, 1, 623, 624, 5000]  # draws taken before: None, a fresh generator
PROBABILITIES = [
    0.0,
    2.0**-24,
    float(np.float32(0.3)),
    0.5,
    1 - 2.0**-24,
    1.0,
    1.5,
    -0.5,
    float("nan"),
]


def generator(seed: int, before: int | None) -> torch.Generator:
    g = gen(seed)
    if before is not None:
        torch.rand(before, generator=g)
    return g


def twin(g: torch.Generator) -> torch.Generator:
    """A generator in the state of ``g``."""
    other = torch.Generator()
    other.set_state(g.get_state())
    return other


def packed(mask: torch.Tensor) -> np.ndarray:
    return np.packbits(mask.numpy(), bitorder="little")


# ---- the draws ---------------------------------------------------------------------------------


@needs_numba
@pytest.mark.parametrize("before", BEFORE)
@pytest.mark.parametrize("n", COUNTS)
def test_bits_are_torch_rand(n, before):
    for k, p in enumerate(PROBABILITIES):
        g = generator(1000 * n + k, before)
        reference = twin(g)
        bits = kernels.bernoulli_bits(g, p, n)
        assert bits is not None and bits.dtype == torch.uint8 and bits.numel() == (n + 7) // 8
        expected = packed(torch.rand(n, generator=reference) < p)
        assert np.array_equal(bits.numpy(), expected), f"p={p}"
        if n > 0:  # the same state, byte for byte
            assert torch.equal(g.get_state(), reference.get_state())
        assert torch.equal(torch.rand(1000, generator=g), torch.rand(1000, generator=reference))


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_per_entry_probabilities_are_torch_bernoulli(dtype):
    """One probability per entry, as DELLA draws: ``torch.bernoulli``'s mask. Probabilities
    equal to their entry's uniform drop it (the compare is strict), the next float up keeps
    it: an off-by-one compare would show here and nowhere in random data."""
    n = 50_000
    g = generator(3, 777)
    uniforms = torch.rand(n, generator=twin(g))
    probs = torch.rand(n, generator=gen(4))
    at, above = slice(0, n, 3), slice(1, n, 3)
    probs[at] = uniforms[at]
    probs[above] = torch.nextafter(uniforms[above], torch.tensor(2.0))
    probs = probs.to(dtype)
    if dtype != torch.float32:  # probabilities compared as float32, rounded only by the dtype
        probs[at] = uniforms[at].to(dtype)
        probs[above] = 1.0
    reference = twin(g)
    bits = kernels.bernoulli_bits(g, probs, n)
    expected = torch.bernoulli(probs, generator=reference).bool()
    assert np.array_equal(bits.numpy(), packed(expected))
    assert not bool(expected[at][probs[at].float() == uniforms[at]].any())
    assert bool(expected[above].all())
    assert torch.equal(g.get_state(), reference.get_state())


class Unreadable:
    """A generator whose state is not torch's CPU layout (or not on the CPU)."""

    def __init__(self, state: torch.Tensor, device: str = "cpu") -> None:
        self.device, self.state = torch.device(device), state

    def get_state(self) -> torch.Tensor:
        return self.state.clone()

    def set_state(self, state: torch.Tensor) -> None:
        raise AssertionError("bernoulli_bits wrote a state it could not read")


@needs_numba
def test_states_it_cannot_read_get_none():
    state = gen(5).get_state()
    assert kernels.bernoulli_bits(Unreadable(state[:-8]), 0.5, 10) is None  # another size
    assert kernels.bernoulli_bits(Unreadable(state, "meta"), 0.5, 10) is None  # not the CPU
    probs = torch.full((10,), 0.5, dtype=torch.float64)  # torch.bernoulli draws float64 for it
    assert kernels.bernoulli_bits(Unreadable(state), probs, 10) is None
    bad = state.clone()
    bad[kernels.MT_LEFT : kernels.MT_LEFT + 4] = torch.tensor([0], dtype=torch.int32).view(
        torch.uint8
    )  # no words left: not a state torch writes
    assert kernels.bernoulli_bits(Unreadable(bad), 0.5, 10) is None
    wide = state.clone()
    wide[kernels.MT_WORDS + 4] = 1  # a state word above 32 bits: another layout
    assert kernels.bernoulli_bits(Unreadable(wide), 0.5, 10) is None


# ---- DARE: the fused merge is the torch path, and torch's draws --------------------------------


@pytest.fixture
def spy(monkeypatch) -> Spy:
    """Counts the fused kernels that take the masks as bits."""
    return Spy(monkeypatch, "bits_merge2_", "bits_sums")


def torch_draws_only(monkeypatch) -> None:
    """The masks drawn by torch itself (``kernels.bernoulli_bits`` unavailable)."""
    monkeypatch.setattr(kernels, "bernoulli_bits", lambda *args: None)


LARGE = CHUNK + 1003  # more than one chunk: the L1 norms sum in float64


@dare_settings
def test_fused_merge_matches_the_torch_path(config, rescale, normalize, dtype, spy):
    name, overrides = CONFIGS[config]
    for weights, lambda_ in VARIANTS:
        method = from_yaml(
            name, draws="torch", rescale=rescale, normalize=normalize, lambda_=lambda_, **overrides
        )
        for n in SIZES:
            for kind in KINDS:
                spy.reset()
                got, expected = merge_both(method, n, dtype, n + len(kind), kind, weights)
                check(got, expected, f"{weights} lambda={lambda_} n={n} {kind}")
                assert (spy.merges, spy.sums) == (1, 0)  # one chunk: the norms as mergekit's


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_past_a_chunk_the_norms_sum_in_float64_on_both_paths(config, dtype, spy, monkeypatch):
    name, overrides = CONFIGS[config]
    method = from_yaml(name, draws="torch", rescale=True, **overrides)
    spy.reset()
    got, expected = merge_both(method, LARGE, dtype, 8, "clean", (0.9, -0.35))
    check(got, expected)
    assert (spy.merges, spy.sums) == (1, 1)
    torch_draws_only(monkeypatch)
    check(got, merge_both(method, LARGE, dtype, 8, "clean", (0.9, -0.35))[0], "torch's draws")


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masks_are_torch_draws(dtype, monkeypatch):
    """The masks ``bernoulli_bits`` draws are torch's: every merge the same bits as with the
    draws taken by ``torch.rand`` itself, and the first model's mask is ``torch.rand(n) <
    p``, the second the next ``n`` draws (mergekit's order)."""
    cases = [(name, overrides, n) for name, overrides in CONFIGS.values() for n in SIZES]
    fast = [
        merge_both(from_yaml(name, draws="torch", **kw), n, dtype, n, "specials", (0.7, 0.6))[0]
        for name, kw, n in cases
    ]
    torch_draws_only(monkeypatch)
    for (name, kw, n), got in zip(cases, fast):
        method = from_yaml(name, draws="torch", **kw)
        check(got, merge_both(method, n, dtype, n, "specials", (0.7, 0.6))[0], f"{name} {n}")
    monkeypatch.undo()
    n, density = 5000, 0.4
    base = torch.zeros(n, dtype=dtype)
    xs = [torch.full((n,), 1.0, dtype=dtype), torch.full((n,), 2.0, dtype=dtype)]
    method = TaskArithmetic(sparsification="random", density=density)
    out = method.merge_(torch.empty_like(base), base, xs, [1.0, 1.0], rng=gen(6)).long()
    rng, p = gen(6), keep_p(density, dtype)
    assert torch.equal(out & 1 == 1, torch.rand(n, generator=rng) < p)
    assert torch.equal(out & 2 == 2, torch.rand(n, generator=rng) < p)


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split", [None, 1000, 2572])
@pytest.mark.parametrize("into", ["third", "x0", "base"])
def test_segments_split_point_and_in_place(dtype, split, into, spy):
    for name, overrides in SEGMENT_METHODS:
        method = from_yaml(name, draws="torch", **overrides)
        spy.reset()
        got, expected = merge_both(
            method, GENOME, dtype, 3, "specials", (0.9, -0.3), into, segments=SEGMENTS, split=split
        )
        check(got, expected, f"{name} {overrides}")
        assert spy.merges >= len(SEGMENTS)  # one per piece


# ---- DELLA ---------------------------------------------------------------------------------


@needs_numba
@pytest.mark.parametrize(
    "shape, fused",
    [((61, 83), True), ((3, 200_000), True), ((3, 200_001), False), ((1, 600_001), True)],
    ids=["one_block", "blocks_at_whole_bytes", "a_block_inside_a_byte", "a_row_past_a_chunk"],
)
def test_della_masks_are_torch_bernoulli_and_merge_fused(shape, fused, spy):
    """DELLA keeps entry ``j`` when ``torch.bernoulli`` of its rank's probability does (the
    draws continue from block to block of rows: (3, 200000) is cut at entry 400000; a row
    longer than a chunk is a block of its own, in buffers of its own); two models merge in
    the fused loop when every block starts at a whole byte of the bits, and give the torch
    path's bits either way."""
    method = from_yaml("della", draws="torch")
    x = torch.randn(shape, generator=gen(21))
    x[x == 0] = 1.0
    keep = della_keep(method, x, rng_seed=22)
    probs = della_probs(x, method.density, method.epsilon)
    assert torch.equal(keep, torch.bernoulli(probs, generator=gen(22)).bool())

    def run():
        base, x0, x1 = (t.view(shape) for t in models(x.numel(), torch.float32, 23, "clean"))
        return method.merge_into_(torch.empty_like(base), base, [x0, x1], [0.6, 0.5], gen(24))

    spy.reset()
    got, expected = both_paths(run)
    check(got, expected)
    assert spy.merges == int(fused)
    assert same_bits(got, run())
