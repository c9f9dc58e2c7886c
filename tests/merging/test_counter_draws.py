"""Counter-based random draws (``TaskArithmetic(draws="counter")``) for DARE and DELLA.

- ``counter_uniform`` is SplitMix64 (checked against a pure-Python SplitMix64 and its known
  outputs), equals the numba kernels' ``_fused.draw`` / ``_fused.uniform`` for any seed and
  index, and each draw depends on its index only;
- ``kernels._threshold`` turns a keep probability into the integer compare the fused loops use,
  exactly, over all 2^24 draws;
- the masks have the right statistics (keep fraction, no correlation between task vectors,
  neighbours or pieces) and follow the seeded ``rng``;
- DARE of two models through the fused kernels (``kernels.random_sums``,
  ``kernels.random_merge2_``) gives the bits of the torch path, for ``conf/merge/dare_ties.yaml``
  and ``dare_linear.yaml`` with every consensus, rescaling, normalisation, lambda, float32 and
  bfloat16, odd sizes, the split point, 2-D segments, in place, and data with signed zeros, NaN,
  infinities and subnormals (NaN payloads are not compared, see ``same_bits``);
- DELLA (``conf/merge/della.yaml``) with counter draws keeps by the documented streams;
- ``draws`` is validated and described, and ``draws="torch"`` (the default) is mergekit's stream.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sparse_merge.errors import ConfigError
from sparse_merge.merging import kernels, task_arithmetic
from sparse_merge.merging.task_arithmetic import TaskArithmetic, _seeds, counter_uniform

from .fused_paths import (
    DTYPES,
    GENOME,
    SEGMENTS,
    Spy,
    both_paths,
    check,
    differences,
    same_bits,
    torch_path,
)

needs_numba = pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba is not installed")

CONF = Path(__file__).resolve().parents[2] / "conf" / "merge"
MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
SEEDS = [0, 1, 42, GOLDEN, 2**32 - 1, 2**63, 2**63 - 1, 2**64 - 1]
STARTS = [0, 5, 2**32 - 3, 2**32 + 7, 2**40 + 123, 2**62, 2**63 - 100]


# ---- reference SplitMix64 --------------------------------------------------------------------


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def splitmix64(seed: int, count: int) -> list[int]:
    """The first ``count`` outputs of SplitMix64 seeded with ``seed``, step by step."""
    state, out = seed & MASK64, []
    for _ in range(count):
        state = (state + GOLDEN) & MASK64
        out.append(_mix(state))
    return out


def splitmix64_at(seed: int, i: int) -> int:
    """The ``i + 1``-th output of SplitMix64 seeded with ``seed`` (its state after ``i + 1``
    steps is ``seed + (i + 1) * GOLDEN``)."""
    return _mix((seed + (i + 1) * GOLDEN) & MASK64)


def top24(z: int) -> float:
    """A 64-bit output as the draw ``counter_uniform`` makes of it."""
    return (z >> 40) * 2.0**-24


# ---- helpers -------------------------------------------------------------------------------


@functools.cache
def _fused_loop():
    """A numba loop calling ``_fused.draw`` and ``_fused.uniform`` as the kernels do (uint64
    seed and index)."""
    import numba

    from sparse_merge.merging import _fused

    draw, uniform = _fused.draw, _fused.uniform

    @numba.njit
    def loop(seed, start, draws, uniforms):
        for k in range(draws.size):
            i = start + np.uint64(k)
            draws[k] = draw(seed, i)
            uniforms[k] = uniform(seed, i)

    return loop


def fused_draws(seed: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``(_fused.draw, _fused.uniform)`` of indices ``start .. start + count - 1``."""
    draws, uniforms = np.empty(count, np.uint64), np.empty(count, np.float32)
    _fused_loop()(np.uint64(seed), np.uint64(start), draws, uniforms)
    return draws, uniforms


def specials(dtype: torch.dtype, finite: bool) -> torch.Tensor:
    """Subnormals of ``dtype``, signed zeros, large values; with ``finite=False`` also NaN,
    +-inf and huge values."""
    tiny = torch.finfo(dtype).smallest_normal
    values = [tiny / 3, -tiny / 7, 0.0, -0.0, 1e3, -1e3]
    if not finite:
        huge = torch.finfo(dtype).max / 2
        values += [float("nan"), float("inf"), -float("inf"), huge, -huge]
    return torch.tensor(values)


def models(n: int, dtype: torch.dtype, seed: int, kind: str, count: int = 2):
    """``(base, x_0, .., x_{count-1})`` [n] of ``dtype``, seeded; ``kind``:

    - ``specials``: Gaussian task vectors, 10 % of each model equal to the base, signed zeros,
      and a few NaN, +-inf, subnormals and huge values;
    - ``clean``: the same with finite specials only (subnormals, signed zeros), so that the L1
      norms of ``rescale`` are finite and the factors are ordinary numbers;
    - ``subnormal``: task vectors of subnormals and zeros of both signs, 5 % ordinary values.
    """
    g = torch.Generator().manual_seed(seed)

    def mask(p: float) -> torch.Tensor:
        return torch.rand(n, generator=g) < p

    if kind == "subnormal":
        tiny = torch.finfo(dtype).smallest_normal
        base = torch.where(mask(0.5), torch.tensor(0.0), torch.tensor(-0.0))
        xs = [torch.randint(-4, 5, (n,), generator=g) * (tiny / 16) for _ in range(count)]
        for x in xs:
            x[mask(0.1)] = -0.0
            big = mask(0.05)
            x[big] = torch.randn(int(big.sum()), generator=g)
    else:
        base = torch.randn(n, generator=g)
        xs = [base + 0.1 * torch.randn(n, generator=g) for _ in range(count)]
        for x in xs:
            same = mask(0.1)
            x[same] = base[same]
        special = specials(dtype, finite=kind == "clean")
        for t in (base, *xs):
            t[mask(0.03)] = 0.0
            t[mask(0.03)] = -0.0
            at = torch.randint(0, n, (max(1, n // 200),), generator=g)
            t[at] = special[torch.randint(0, special.numel(), at.shape, generator=g)]
    return tuple(t.to(dtype) for t in (base, *xs))


@pytest.fixture
def spy(monkeypatch) -> Spy:
    """Counts the fused DARE kernels of counter draws."""
    return Spy(monkeypatch, "random_merge2_", "random_sums")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def merge_both(method, n, dtype, seed, kind, weights, into="third", rng_seed=0, **kwargs):
    """``method.merge_`` of ``models(n, dtype, seed, kind)`` on both paths with the rng seeded
    by ``rng_seed``, into a new buffer (``third``) or into the base or a model (in place)."""

    def run():
        base, *xs = models(n, dtype, seed, kind, len(weights))
        out = {"third": torch.empty_like(base), "base": base, "x0": xs[0], "x1": xs[-1]}[into]
        result = method.merge_(out, base, xs, weights, rng=gen(rng_seed), **kwargs)
        assert result is out
        return result

    return both_paths(run)


@functools.cache
def _yaml(name: str):
    return OmegaConf.load(CONF / f"{name}.yaml")


def from_yaml(name: str, **overrides) -> TaskArithmetic:
    """``conf/merge/<name>.yaml`` instantiated with ``overrides`` (``draws`` counter unless
    given)."""
    cfg = OmegaConf.merge(_yaml(name), {"draws": "counter", **overrides})
    method = instantiate(cfg, _convert_="all")
    assert isinstance(method, TaskArithmetic)
    return method


def dare(density: float, draws: str | None = "counter", **settings) -> TaskArithmetic:
    """DARE without rescaling or normalisation: the merge of task vectors 1, 2, 4... with
    weights 1 is the sum of the masks times those powers of two (``masks`` decodes it)."""
    extra = {} if draws is None else {"draws": draws}
    return TaskArithmetic(sparsification="random", density=density, **extra, **settings)


def masks(method, n, dtype=torch.float32, rng_seed=0, count=2, **kwargs) -> list[torch.Tensor]:
    """The keep masks [n] (bool) of ``count`` task vectors that ``method`` (``dare``) draws."""
    base = torch.zeros(n, dtype=dtype)
    xs = [torch.full((n,), float(1 << i), dtype=dtype) for i in range(count)]
    out = method.merge_(
        torch.empty_like(base), base, xs, [1.0] * count, rng=gen(rng_seed), **kwargs
    )
    code = out.float().to(torch.int64)
    assert torch.equal(code.float(), out.float()) and bool((code < 1 << count).all())
    return [(code >> i) & 1 == 1 for i in range(count)]


def keep_p(density: float, dtype: torch.dtype) -> float:
    """The keep probability DARE compares with: ``density`` in the work dtype."""
    work = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    return float(torch.tensor(density, dtype=work))


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two 0/1 masks (under independence ~ N(0, 1 / n))."""
    a, b = a.double(), b.double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# ---- the streams ----------------------------------------------------------------------


def test_reference_splitmix64_outputs():
    """The known first outputs of SplitMix64 seeded with 0; the closed form of the reference
    agrees with its step-by-step form."""
    known = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert splitmix64(0, 3) == known
    expected = torch.tensor([top24(z) for z in known], dtype=torch.float32)
    assert torch.equal(counter_uniform(0, 0, 3), expected)
    for seed in (0, 1, 2**63, 2**64 - 1, 1234567891011):
        assert splitmix64(seed, 20) == [splitmix64_at(seed, i) for i in range(20)]


@pytest.mark.parametrize("form", ["default", "torch"])
@pytest.mark.parametrize("seed", SEEDS)
def test_counter_uniform_is_splitmix64(seed, form):
    """Both forms (numba on the CPU, torch int64 ops anywhere) are SplitMix64."""
    draws = counter_uniform if form == "default" else task_arithmetic._counter_uniform_torch
    for start in STARTS:
        got = draws(seed, start, 9, "cpu")
        assert got.dtype == torch.float32 and got.shape == (9,)
        expected = [top24(splitmix64_at(seed, i)) for i in range(start, start + 9)]
        assert got.tolist() == expected, (seed, start)
    assert torch.equal(draws(seed - (1 << 64), 7, 5, "cpu"), draws(seed, 7, 5, "cpu"))
    assert torch.equal(
        task_arithmetic._counter_uniform_torch(seed, 100, 4000, "cpu"),
        counter_uniform(seed, 100, 4000),
    )


@needs_numba
@pytest.mark.parametrize("seed", SEEDS)
def test_counter_uniform_equals_the_fused_draws(seed):
    for start, count in [(0, 1000), *((s, 64) for s in STARTS[1:])]:
        draws, uniforms = fused_draws(seed, start, count)
        torch_draws = counter_uniform(seed, start, count).numpy()
        assert draws.max() < 1 << 24
        np.testing.assert_array_equal(torch_draws, uniforms)
        np.testing.assert_array_equal(torch_draws, draws.astype(np.float32) * np.float32(2.0**-24))
        reference = [splitmix64_at(seed, i) >> 40 for i in range(start, start + 4)]
        assert draws[:4].tolist() == reference


@pytest.mark.parametrize("seed", [0, 2**64 - 1, 987654321])
def test_draws_depend_on_their_index_only(seed):
    whole = counter_uniform(seed, 0, 5000)
    for start, count in [(0, 1), (0, 5000), (1, 17), (63, 64), (4096, 904), (4999, 1), (77, 0)]:
        part = counter_uniform(seed, start, count)
        assert torch.equal(part, whole[start : start + count]), (start, count)
    far = 2**40
    assert torch.equal(counter_uniform(seed, far + 10, 30), counter_uniform(seed, far, 40)[10:])


def test_draws_are_uniform():
    """A chi-square test of 2^20 draws in 64 bins (63 degrees of freedom: mean 63, sd 11.2;
    bound six standard deviations above), and the mean of the draws."""
    for seed in _seeds(gen(3), 3):
        u = counter_uniform(seed, 0, 1 << 20)
        assert float(u.min()) >= 0 and float(u.max()) < 1
        counts = torch.bincount((u * 64).long(), minlength=64).double()
        expected = (1 << 20) / 64
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 63 + 6 * math.sqrt(2 * 63), chi2
        assert abs(float(u.double().mean()) - 0.5) < 6 * math.sqrt(1 / 12 / (1 << 20))


# ---- the integer threshold -----------------------------------------------------------------


@functools.cache
def all_draws() -> tuple[np.ndarray, np.ndarray]:
    """Every 24-bit draw and its float32 uniform."""
    draws = np.arange(1 << 24, dtype=np.int32)
    return draws, draws.astype(np.float32) * np.float32(2.0**-24)


P_VALUES = {
    "0": (0.0, 0),
    "1": (1.0, 1 << 24),
    "0.5": (0.5, 1 << 23),
    "2^-24": (2.0**-24, 1),
    "1-2^-24": (1 - 2.0**-24, (1 << 24) - 1),
    "0.3_float32": (float(np.float32(0.3)), None),
    "0.3_bfloat16": (float(torch.tensor(0.3, dtype=torch.bfloat16)), None),
    "1e-9_float32": (float(np.float32(1e-9)), 1),
    "0.9_bfloat16": (float(torch.tensor(0.9, dtype=torch.bfloat16)), None),
}


@pytest.mark.parametrize("name", list(P_VALUES))
def test_threshold_matches_the_float_compare(name):
    p, expected_t = P_VALUES[name]
    t = kernels._threshold(p)
    assert isinstance(t, np.uint64)
    if expected_t is not None:
        assert int(t) == expected_t
    draws, uniforms = all_draws()
    by_integer = draws < int(t)
    np.testing.assert_array_equal(by_integer, uniforms.astype(np.float64) < p)
    # the torch path's compare (``_KeepDraws.mask``: float32 draws against the float p)
    by_torch = torch.lt(torch.from_numpy(uniforms), p).numpy()
    np.testing.assert_array_equal(by_integer, by_torch)


# ---- statistics and reproducibility ----------------------------------------------------------


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_keep_fraction_is_the_density_and_masks_are_uncorrelated(density, dtype, spy):
    n = 200_000
    m0, m1 = masks(dare(density), n, dtype, rng_seed=11)
    assert spy.merges == 1  # two models of one dtype: the fused merge drew these
    p = keep_p(density, dtype)
    bound = 6 * math.sqrt(p * (1 - p) / n)
    for m in (m0, m1):
        assert abs(m.double().mean().item() - p) < bound
    r_bound = 6 / math.sqrt(n)
    assert abs(corr(m0, m1)) < r_bound  # the two task vectors
    for a, b in [(m0, m0), (m1, m1), (m0, m1), (m1, m0)]:
        assert abs(corr(a[:-1], b[1:])) < r_bound  # neighbours
    assert abs(corr(m0[: n // 2], m0[n // 2 :])) < r_bound  # far apart
    # two pieces of a genome (two merge_into_ calls) draw their own streams
    h = n // 2
    pieces = masks(dare(density), n, dtype, rng_seed=11, segments=[(0, h, None), (h, n, None)])
    assert abs(corr(pieces[0][:h], pieces[0][h:])) < 6 / math.sqrt(h)
    assert abs(corr(pieces[1][:h], pieces[1][h:])) < 6 / math.sqrt(h)


def test_keep_fraction_of_three_models_on_the_torch_path():
    n, density = 150_000, 0.3
    ms = masks(dare(density), n, count=3, rng_seed=5)
    p = keep_p(density, torch.float32)
    for m in ms:
        assert abs(m.double().mean().item() - p) < 6 * math.sqrt(p * (1 - p) / n)
    for i in range(3):
        for j in range(i + 1, 3):
            assert abs(corr(ms[i], ms[j])) < 6 / math.sqrt(n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("count", [2, 3])
def test_masks_are_the_documented_streams(dtype, count):
    """Model ``i`` keeps entry ``j`` when draw ``j`` of the stream ``_seeds(rng, count)[i]`` is
    below the density (in the work dtype): through the fused merge (two models) and the torch
    path (three); and the ``rng`` gives nothing else: its state advances by the seeds only."""
    n, density = 4099, 0.37
    rng_seed = 1000 + count
    got = masks(dare(density), n, dtype, rng_seed=rng_seed, count=count)
    seeds = _seeds(gen(rng_seed), count)
    p = keep_p(density, dtype)
    for m, seed in zip(got, seeds):
        assert torch.equal(m, counter_uniform(seed, 0, n) < p)
    rng, reference = gen(rng_seed), gen(rng_seed)
    method = dare(density, rescale=True)
    base, *xs = models(n, dtype, 1, "clean", count)
    method.merge_(torch.empty_like(base), base, xs, [0.5] * count, rng=rng)
    _seeds(reference, count)
    assert torch.equal(rng.get_state(), reference.get_state())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_seed_same_merge_other_seed_other_masks(dtype):
    n, density = 20_000, 0.5
    first = masks(dare(density), n, dtype, rng_seed=7)
    again = masks(dare(density), n, dtype, rng_seed=7)
    other = masks(dare(density), n, dtype, rng_seed=8)
    p = keep_p(density, dtype)
    expected_disagreement = 2 * p * (1 - p)  # two independent masks
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b)
        assert abs((a != c).double().mean().item() - expected_disagreement) < 6 * math.sqrt(
            expected_disagreement * (1 - expected_disagreement) / n
        )
    assert not torch.equal(first[0], first[1])
    method = from_yaml("dare_ties", density=0.4)
    base, x0, x1 = models(n, dtype, 2, "clean")
    runs = [
        method.merge_(torch.empty_like(base), base, [x0, x1], [0.6, 0.4], rng=gen(s))
        for s in (3, 3, 4)
    ]
    check(runs[0], runs[1], "same seed")
    assert not same_bits(runs[0], runs[2])


# ---- the fused merge is the torch path, bit for bit ------------------------------------------

CONFIGS = {  # id: (yaml, overrides)
    "dare_ties": ("dare_ties", {}),
    "dare_linear": ("dare_linear", {}),
    "dare_count": ("dare_ties", {"consensus": "count"}),
}
SIZES = [1, 17, 1000, 5003]
KINDS = ["specials", "clean", "subnormal"]
VARIANTS = [  # (weights, lambda_)
    ((0.6, 0.4), 1.0),
    ((1.3, -0.45), 1.37),
    ((0.7, -0.7), 0.5),  # the weights sum to zero: the fixed divisor is 1
]


def dare_settings(test):
    """The settings the fused DARE merges are checked over, for either kind of draws: every
    configuration, rescaled or not, normalised or not, float32 and bfloat16."""
    marks = (
        pytest.mark.parametrize("config", list(CONFIGS)),
        pytest.mark.parametrize("rescale", [True, False], ids=["rescale", "unscaled"]),
        pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"]),
        pytest.mark.parametrize("dtype", DTYPES, ids=str),
        needs_numba,
    )
    for mark in marks:
        test = mark(test)
    return test


@dare_settings
def test_fused_merge_matches_the_torch_path(config, rescale, normalize, dtype, spy):
    name, overrides = CONFIGS[config]
    for weights, lambda_ in VARIANTS:
        method = from_yaml(name, rescale=rescale, normalize=normalize, lambda_=lambda_, **overrides)
        assert method.draws == "counter" and method.density == 0.5
        for n in SIZES:
            for kind in KINDS:
                spy.reset()
                got, expected = merge_both(method, n, dtype, n + len(kind), kind, weights)
                check(got, expected, f"{weights} lambda={lambda_} n={n} {kind}")
                assert spy.merges == 1 and spy.sums == int(rescale)


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 1e-9, 0.1, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_densities(config, density, dtype, spy):
    """Density 0 and tiny densities drop (nearly) everything, 0.999 keeps nearly everything;
    density 1 keeps everything without drawing (no fused DARE merge)."""
    name, overrides = CONFIGS[config]
    for rescale in (True, False):
        method = from_yaml(name, density=density, rescale=rescale, **overrides)
        spy.reset()
        got, expected = merge_both(method, 3001, dtype, 6, "clean", (0.8, -0.3))
        check(got, expected, f"rescale={rescale}")
        assert spy.merges == int(density < 1)


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", [0, 1])
def test_draws_at_the_threshold(dtype, model, spy):
    """A density equal to a draw of the tensor (``v * 2^-24`` with ``v`` of at most 8
    significant bits: exact in bfloat16 too): the entry whose draw is ``v`` is dropped
    (``draw < p`` is strict) and every one whose draw is below ``v`` kept, on both paths alike; an
    off-by-one threshold would show here and nowhere in random data (2^-24 per entry)."""
    n, rng_seed = 1 << 18, 77
    draws = counter_uniform(_seeds(gen(rng_seed), 2)[model], 0, n).double() * (1 << 24)
    draws = draws.long()
    candidates = ((draws & 0xFFFF) == 0) & (draws > 0)
    assert bool(candidates.any())
    v = int(draws[candidates][0])
    density = v * 2.0**-24
    assert keep_p(density, dtype) == density
    fused = masks(dare(density), n, dtype, rng_seed)
    assert spy.merges == 1
    with torch_path():
        reference = masks(dare(density), n, dtype, rng_seed)
    assert torch.equal(fused[model], reference[model])
    assert torch.equal(fused[model], draws < v)
    assert not bool(fused[model][draws == v].any())
    method = from_yaml("dare_ties", density=density, rescale=True)
    check(*merge_both(method, n, dtype, 12, "clean", (0.6, -0.4), rng_seed=rng_seed))


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("into", ["base", "x0", "x1"])
def test_merge_in_place(dtype, into, spy):
    for config in CONFIGS.values():
        method = from_yaml(config[0], lambda_=0.9, **config[1])
        got, expected = merge_both(method, 3001, dtype, 5, "specials", (0.7, 0.5), into=into)
        check(got, expected, into)
    assert spy.merges == len(CONFIGS)


SEGMENT_METHODS = [  # (yaml, overrides) merged over segments, split points and in place
    ("dare_ties", {}),
    ("dare_linear", {"normalize": True, "lambda_": 0.8}),
    ("dare_ties", {"consensus": "count", "rescale": False, "density": 0.3}),
]


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split", [None, 1000, 2572, 4000])  # inside a tensor, at one's start
@pytest.mark.parametrize("into", ["third", "x0", "base"])
def test_segments_and_split_point(dtype, split, into, spy):
    for name, overrides in SEGMENT_METHODS:
        method = from_yaml(name, **overrides)
        for kind in ("specials", "clean"):
            spy.reset()
            got, expected = merge_both(
                method, GENOME, dtype, 3, kind, (0.9, -0.3), into, segments=SEGMENTS, split=split
            )
            check(got, expected, f"{name} {overrides} {kind}")
            assert spy.merges >= len(SEGMENTS)  # one per piece


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_into_a_2d_tensor(dtype, spy):
    method = from_yaml("dare_ties", density=0.35, normalize=True)

    def run():
        base, x0, x1 = (t.view(61, 83) for t in models(61 * 83, dtype, 9, "clean"))
        return method.merge_into_(torch.empty_like(base), base, [x0, x1], [0.5, 0.8], gen(1))

    check(*both_paths(run))
    assert spy.merges == 1 and spy.sums == 1


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_fused_path_is_taken_for_two_models_only(dtype, spy):
    base, x0, x1, x2 = models(2048, dtype, 1, "clean", count=3)
    for rescale in (True, False):
        method = from_yaml("dare_ties", rescale=rescale)
        spy.reset()
        method.merge_(torch.empty_like(base), base, [x0, x1], [0.5, 0.5], rng=gen(0))
        assert (spy.merges, spy.sums) == (1, int(rescale))
        # three models: the torch path, deterministic, the same with the kernels switched off
        spy.reset()
        got, expected = both_paths(
            lambda m=method: m.merge_(
                torch.empty_like(base), base, [x0, x1, x2], [0.5, 0.3, -0.2], rng=gen(4)
            )
        )
        again = method.merge_(
            torch.empty_like(base), base, [x0, x1, x2], [0.5, 0.3, -0.2], rng=gen(4)
        )
        check(got, expected, "three models")
        check(got, again, "three models, again")
        assert (spy.merges, spy.sums) == (0, 0)


def test_other_inputs_fall_back_to_the_torch_path(spy):
    """float16, a float32 output for bfloat16 models and a non-contiguous model take the torch
    merge with counter draws, deterministically (the float32 output still gets the fused L1
    norms of ``rescale``, which read only the base and the models)."""
    method = from_yaml("dare_linear")
    n = 3001
    base, x0, x1 = models(n, torch.float32, 4, "clean")
    h = [t.half() for t in (base, x0, x1)]
    bf = [t.bfloat16() for t in (base, x0, x1)]
    strided = torch.stack([x1, x0], dim=1)[:, 0]  # x1, not contiguous
    cases = {  # name: (merge, fused L1 norms expected per merge)
        "float16": (
            lambda g: method.merge_(torch.empty_like(h[0]), h[0], h[1:], [0.6, 0.4], rng=g),
            0,
        ),
        "float32 output": (
            lambda g: method.merge_into_(torch.empty(n), bf[0], bf[1:], [0.6, 0.4], g),
            1,
        ),
        "not contiguous": (
            lambda g: method.merge_into_(
                torch.empty_like(base), base, [x0, strided], [0.6, 0.4], g
            ),
            0,
        ),
    }
    for name, (run, sums) in cases.items():
        spy.reset()
        got, expected = both_paths(lambda run=run: run(gen(9)))
        assert same_bits(got, expected), f"{name}: {differences(got, expected)}"
        assert same_bits(got, run(gen(9))), name
        assert not same_bits(got, run(gen(10))), name
        assert (spy.merges, spy.sums) == (0, 3 * sums), name


# ---- DELLA ----------------------------------------------------------------------------------


def della_probs(x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probabilities of a 2-D ``x`` (rows along dim 1), mergekit's arithmetic:
    ``density - epsilon + 2 epsilon * rank / (m - 1)`` by the rank of ``|x|`` in its row."""
    m = x.shape[1]
    order = torch.argsort(x.abs(), dim=1, stable=True)
    ranks = torch.arange(m).to(x.dtype) + 1
    rank_norm = ((ranks - ranks.amin()) / (ranks.amax() - ranks.amin())).clamp(0, 1)
    by_rank = (density - epsilon) + rank_norm * 2 * epsilon
    return torch.empty_like(x).scatter_(1, order, by_rank.expand_as(order))


def della_keep(method: TaskArithmetic, x: torch.Tensor, rng_seed: int) -> torch.Tensor:
    """Where DELLA (one model, base 0, weight 1) keeps the entries of ``x`` (all nonzero)."""
    assert bool((x != 0).all())
    out = method.merge_into_(torch.empty_like(x), torch.zeros_like(x), [x], [1.0], gen(rng_seed))
    return out != 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 250), (3, 200_000)], ids=["one_block", "blocks"])
def test_della_keeps_by_the_counter_streams(shape, dtype):
    """Entry ``j`` (flat index) kept when draw ``j`` of the stream ``_seeds(rng, 1)[0]`` is
    below its rank's probability; (3, 200000) is cut into blocks of rows (at entries 0 and
    400000) whose draws continue the stream. In bfloat16 a row's magnitudes tie often, and
    rows up to 64 K sort 32-bit keys: the ranks are still those of a stable sort."""
    method = from_yaml("della")
    assert method.draws == "counter" and method.sparsification == "rank_magnitude"
    x = torch.randn(shape, generator=gen(21)).to(dtype)
    x[x == 0] = 1.0
    keep = della_keep(method, x, rng_seed=22)
    (seed,) = _seeds(gen(22), 1)
    probs = della_probs(x, method.density, method.epsilon)
    expected = counter_uniform(seed, 0, x.numel()).view(shape) < probs
    assert torch.equal(keep, expected)


def test_della_keep_fraction_and_rank_dependence():
    method = from_yaml("della", epsilon=0.3)
    rows, m = 3, 200_000
    x = torch.randn(rows, m, generator=gen(31))
    keep = della_keep(method, x, rng_seed=32).double()
    n = keep.numel()
    assert abs(keep.mean().item() - method.density) < 6 * 0.5 / math.sqrt(n)
    rank = torch.argsort(torch.argsort(x.abs(), dim=1, stable=True), dim=1, stable=True)
    for lo, hi in [(0, m // 10), (m // 2 - m // 20, m // 2 + m // 20), (m - m // 10, m)]:
        r = torch.arange(lo, hi, dtype=torch.float64)
        expected = (method.density - method.epsilon + 2 * method.epsilon * r / (m - 1)).mean()
        band = keep[(rank >= lo) & (rank < hi)]
        assert abs(band.mean().item() - float(expected)) < 6 * 0.5 / math.sqrt(band.numel())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_della_is_deterministic_and_differs_from_torch_draws(dtype):
    method = from_yaml("della")
    torch_draws = from_yaml("della", draws="torch")
    base, x0, x1 = models(GENOME, dtype, 41, "clean")

    def run(m, s):
        out = torch.empty_like(base)
        return m.merge_(out, base, [x0, x1], [0.6, 0.4], segments=SEGMENTS, split=2000, rng=gen(s))

    first, again, other = run(method, 5), run(method, 5), run(method, 6)
    check(first, again, "same seed")
    assert not same_bits(first, other)
    assert not same_bits(first, run(torch_draws, 5))
    # the masks themselves: one model, base 0
    x = torch.randn(50, 400, generator=gen(42)).to(dtype)
    x[x == 0] = 1.0
    counter, torch_keep = della_keep(method, x, 7), della_keep(torch_draws, x, 7)
    assert torch.equal(counter, della_keep(method, x, 7))
    disagreement = (counter != torch_keep).double().mean().item()
    assert 0.4 < disagreement < 0.6  # independent masks of density ~0.5: about half differ


# ---- the setting --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["bogus", "Counter", "", None, 1])
def test_bad_draws_are_a_config_error(bad):
    with pytest.raises(ConfigError) as info:
        TaskArithmetic(sparsification="random", density=0.5, draws=bad)
    message = str(info.value)
    assert info.value.key == "draws" and info.value.value == bad
    assert message.startswith(f"draws={bad!r} ")
    assert "'torch'" in message and "'counter'" in message


def test_describe_and_repr_include_draws():
    assert TaskArithmetic().describe()["draws"] == "torch"
    method = from_yaml("dare_ties")
    assert method.describe()["draws"] == "counter"
    assert "draws='counter'" in repr(method)
    assert from_yaml("della", draws="torch").describe()["draws"] == "torch"
    for name in ("dare_ties", "dare_linear", "della"):  # the configs default to mergekit's draws
        assert instantiate(_yaml(name), _convert_="all").draws == "torch"


# ---- draws="torch" is mergekit's stream -------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_draws_are_the_default_and_unchanged(dtype, spy):
    n, density = 5000, 0.4
    default, explicit = (
        masks(dare(density, draws=None), n, dtype, 3),
        masks(dare(density, draws="torch"), n, dtype, 3),
    )
    rng, p = gen(3), keep_p(density, dtype)
    for a, b in zip(default, explicit):
        assert torch.equal(a, b)
        assert torch.equal(a, torch.rand(n, generator=rng) < p)  # mergekit: x_0's, then x_1's
    counter = masks(dare(density), n, dtype, 3)
    assert not torch.equal(default[0], counter[0])
    spy.reset()
    for settings in (
        {"sparsification": "random", "consensus": "sum", "density": 0.4, "rescale": True},
        {"sparsification": "rank_magnitude", "consensus": "sum", "density": 0.5, "rescale": True},
    ):
        base, x0, x1 = models(3001, dtype, 8, "clean")
        runs = [
            TaskArithmetic(**settings, **extra).merge_(
                torch.empty_like(base), base, [x0, x1], [0.6, 0.4], rng=gen(12)
            )
            for extra in ({}, {"draws": "torch"})
        ]
        check(*runs, f"{settings}")
    assert spy.merges == 0 and spy.sums == 0
