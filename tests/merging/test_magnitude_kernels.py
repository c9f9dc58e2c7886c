"""TIES and Model Breadcrumbs of two models through the fused kernels (``kernels.magnitude_bands``
for the top-k selection, ``kernels.magnitude_merge2_`` and ``kernels.tie_end`` for the merge)
give the bits of the torch path: float32 and bfloat16, every consensus, tiny tensors, sizes not
a multiple of a block, tensors large enough for the sampled bracket, ties at the threshold
(partial ties, a band that overflows its buffer), signed zeros, infinities, NaN and subnormals,
negative weights and weights summing to zero, rescaling, the split point, 2-D segments and an
output that is one of the inputs. NaN payloads are not compared (see ``same_bits``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparse_merge.merging import kernels
from sparse_merge.merging.task_arithmetic import TaskArithmetic

from .fused_paths import (
    DTYPES,
    GENOME,
    SEGMENTS,
    both_paths,
    check,
    differences,
    same_bits,
    watch,
)

pytestmark = pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba is not installed")

LARGE = 300_000  # > 4 * 65536: every selection brackets its thresholds with a sample


# ---- helpers -------------------------------------------------------------------------------


def _fused_compiles_for_avx2() -> bool:
    """Whether numba compiles for a CPU with AVX2 (the table form of the compress runs)."""
    if not kernels.HAVE_NUMBA:
        return False
    from sparse_merge.merging import _fused

    return "+avx2" in _fused._FEATURES


def specials(dtype: torch.dtype) -> torch.Tensor:
    """NaN, +-inf, subnormals of ``dtype``, huge values and signed zeros."""
    tiny = torch.finfo(dtype).smallest_normal
    huge = torch.finfo(dtype).max / 2
    nan, inf = float("nan"), float("inf")
    return torch.tensor([nan, inf, -inf, tiny / 3, -tiny / 7, huge, -huge, 0.0, -0.0])


def models(n: int, dtype: torch.dtype, seed: int, kind: str) -> tuple[torch.Tensor, ...]:
    """``(base, x0, x1)`` [n] of ``dtype``, seeded; ``kind``:

    - ``gauss``: Gaussian task vectors; 10 % of the entries of each model equal to the base
      (``|d| = 0`` ties), signed zeros, and a few NaN, +-inf, subnormals, huge values;
    - ``grid``: base and models on a coarse grid (exact in bfloat16), so that ``|d|`` takes
      four values: ties everywhere, the threshold always among them; signed zeros;
    - ``same``: 60 % of each model equal to the base (a block of ``|d| = 0`` ties);
    - ``subnormal``: task vectors of subnormals (and zeros of both signs), ties among them;
    - ``inf``: 15 % of ``|d|`` infinite (partial ties at +inf: TIES's and Breadcrumbs's
      thresholds land there) and 0.3 % NaN (inf - inf too);
    - ``nan``: the same with 20 % NaN: thresholds land on NaN (the largest key).
    """
    g = torch.Generator().manual_seed(seed)

    def mask(p: float) -> torch.Tensor:
        return torch.rand(n, generator=g) < p

    if kind == "grid":
        base = torch.randint(-2, 3, (n,), generator=g) * 0.5
        xs = [base + torch.randint(-3, 4, (n,), generator=g) * 0.25 for _ in range(2)]
        base[mask(0.1) & (base == 0)] = -0.0
        for x in xs:
            x[mask(0.1) & (x == 0)] = -0.0
    elif kind == "subnormal":
        tiny = torch.finfo(dtype).smallest_normal
        base = torch.where(mask(0.5), 0.0, -0.0) * torch.ones(n)
        xs = [torch.randint(-4, 5, (n,), generator=g) * (tiny / 16) for _ in range(2)]
        for x in xs:
            x[mask(0.1)] = -0.0
            big = mask(0.05)
            x[big] = torch.randn(int(big.sum()), generator=g)
    else:
        base = torch.randn(n, generator=g)
        xs = [base + 0.1 * torch.randn(n, generator=g) for _ in range(2)]
        share = 0.6 if kind == "same" else 0.1
        for x in xs:
            same = mask(share)
            x[same] = base[same]
        if kind == "gauss":
            special = specials(dtype)
            for t in (base, *xs):
                t[mask(0.03)] = 0.0
                t[mask(0.03)] = -0.0
                at = torch.randint(0, n, (max(1, n // 200),), generator=g)
                t[at] = special[torch.randint(0, special.numel(), at.shape, generator=g)]
        elif kind in ("inf", "nan"):
            base[mask(0.01)] = float("inf")
            for x in xs:
                x[mask(0.1)] = float("inf")
                x[mask(0.05)] = -float("inf")
                x[mask(0.003 if kind == "inf" else 0.2)] = float("nan")
    return tuple(t.to(dtype) for t in (base, *xs))


class Spy:
    """Counts the calls of the fused magnitude kernels and the bands that overflowed."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.merges = self.selections = self.tie_ends = self.band_tie_ends = 0
        self.overflows = 0

        def selected(found) -> None:
            self.selections += 1
            values = found.values() if isinstance(found, dict) else found
            self.overflows += sum(band is None for band in values)

        watch(mp, kernels, "magnitude_merge2_", lambda _: self.count("merges"))
        watch(mp, kernels, "magnitude_bands", selected)
        watch(mp, kernels, "tie_end", lambda _: self.count("tie_ends"))
        watch(mp, kernels, "tie_end_in", lambda _: self.count("band_tie_ends"))

    def count(self, what: str) -> None:
        setattr(self, what, getattr(self, what) + 1)


@pytest.fixture
def spy(monkeypatch) -> Spy:
    return Spy(monkeypatch)


def merge_both(method, n, dtype, seed, kind, weights, into="third", **kwargs):
    """``method.merge_`` of ``models(n, dtype, seed, kind)`` on both paths, into a new buffer
    (``third``) or into the base or a model (in place)."""

    def run():
        base, x0, x1 = models(n, dtype, seed, kind)
        out = {"third": torch.empty_like(base), "base": base, "x0": x0, "x1": x1}[into]
        result = method.merge_(out, base, [x0, x1], weights, **kwargs)
        assert result is out
        return result

    return both_paths(run)


# ---- the settings ---------------------------------------------------------------------------

TIES = {"sparsification": "magnitude", "consensus": "sum", "normalize": True}
BREADCRUMBS = {"sparsification": "magnitude_outliers", "consensus": "none", "gamma": 0.01}


def config(name, weights, base, fused=True, **settings):
    """(id, settings, weights, fused): ``fused``, whether the fused merge pass runs."""
    return name, {**base, **settings}, weights, fused


# density 0 drops everything on the torch path; density 1 without consensus would be plain task
# arithmetic (another kernel), with consensus the fused merge keeps everything
CONFIGS = [
    config("ties", (0.6, 0.4), TIES, density=0.5),  # conf/merge/ties.yaml
    config("ties_unnormalized", (1.3, -0.45), TIES, density=0.3, normalize=False),
    config("ties_lambda", (0.7, -0.7), TIES, density=0.7, lambda_=1.37),
    config("magnitude_none", (0.6, 0.4), TIES, consensus="none", density=0.2),
    config("magnitude_none_raw", (1, 1), TIES, consensus="none", density=0.6, normalize=False),
    config("magnitude_count", (-0.5, 1.2), TIES, consensus="count", density=0.4),
    config("magnitude_count_raw", (2, 1), TIES, consensus="count", normalize=False),
    config("ties_k1", (0.6, 0.4), TIES, density=1e-9),  # k = max(1, 0) = 1
    config("ties_tiny_density", (0.3, 0.9), TIES, density=0.003),
    config("ties_dense", (0.3, 0.9), TIES, density=0.999),
    config("ties_density1", (0.3, -0.9), TIES, density=1.0),  # k >= n: keep all
    config("ties_density0", (0.3, 0.9), TIES, fused=False, density=0.0),
    config("ties_rescale", (0.6, 0.4), TIES, density=0.3, rescale=True),
    config("breadcrumbs", (0.6, 0.4), BREADCRUMBS, density=0.9),  # breadcrumbs.yaml
    config("breadcrumbs_ties", (1, 1), BREADCRUMBS, density=0.9, consensus="sum"),
    config(
        "breadcrumbs_count",
        (0.8, -0.3),
        BREADCRUMBS,
        density=0.5,
        gamma=0.1,
        consensus="count",
        normalize=True,
    ),
    config("breadcrumbs_gamma0", (0.4, 0.6), BREADCRUMBS, density=0.7, gamma=0.0),
    config(
        "breadcrumbs_gamma0_ties",
        (0.4, 0.6),
        BREADCRUMBS,
        density=0.3,
        gamma=0.0,
        consensus="sum",
        normalize=True,
    ),
    config("breadcrumbs_wide_gamma", (0.5, 0.5), BREADCRUMBS, density=0.5, gamma=0.6),
    config("breadcrumbs_density0", (0.5, 0.5), BREADCRUMBS, density=0.0, gamma=0.1),
    config(
        "breadcrumbs_rescale",
        (1.1, -0.2),
        BREADCRUMBS,
        density=0.8,
        gamma=0.05,
        consensus="sum",
        rescale=True,
        lambda_=0.7,
    ),
    config(
        "breadcrumbs_normalized_zero_sum", (0.25, -0.25), BREADCRUMBS, density=0.6, normalize=True
    ),
]
CONFIG_IDS = [c[0] for c in CONFIGS]
KINDS = ["gauss", "grid", "same", "subnormal", "inf"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1000, 5003])
def test_magnitude_merge_matches_the_torch_path(dtype, config, kind, n, spy):
    _, settings, weights, fused = config
    method = TaskArithmetic(**settings)
    got, expected = merge_both(method, n, dtype, seed=n + len(kind), kind=kind, weights=weights)
    check(got, expected)
    assert spy.merges == int(fused)
    if fused and not method.rescale and 0 < method.density < 1:
        assert spy.selections == 1  # the fused selection pass ran too


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 3, 7, 15, 16, 17, 255, 257])
@pytest.mark.parametrize(
    "config", [c for c in CONFIGS if c[0] in ("ties", "breadcrumbs_ties", "ties_rescale",
                                              "magnitude_count", "breadcrumbs_gamma0")],
    ids=lambda c: c[0],
)  # fmt: skip
def test_tiny_and_odd_sizes(dtype, n, config):
    """Below a block of the selection (256) and a vector of the merge (16), and just around
    them; n = 1 makes k >= n for TIES."""
    _, settings, weights, _ = config
    for kind in ("gauss", "grid"):
        got, expected = merge_both(TaskArithmetic(**settings), n, dtype, n, kind, weights)
        check(got, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "weights", [(0.6, 0.4), (1.0, 1.0), (-0.5, -1.2), (0.7, -0.7), (1e-9, -1e-9), (0.0, 0.0)]
)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("consensus", ["none", "sum", "count"])
def test_weights_negative_or_summing_to_zero(dtype, weights, normalize, consensus):
    for settings in (TIES | {"density": 0.4}, BREADCRUMBS | {"density": 0.8}):
        method = TaskArithmetic(**{**settings, "normalize": normalize, "consensus": consensus})
        got, expected = merge_both(method, 777, dtype, 11, "grid", weights)
        check(got, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("into", ["base", "x0", "x1"])
@pytest.mark.parametrize("kind", ["gauss", "grid"])
def test_merge_in_place(dtype, into, kind):
    for settings in (TIES | {"density": 0.3}, BREADCRUMBS | {"consensus": "sum", "density": 0.9}):
        method = TaskArithmetic(**settings)
        got, expected = merge_both(method, 3001, dtype, 5, kind, (0.7, 0.5), into=into)
        check(got, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split", [None, 1000, 2572, 4000])  # inside a tensor, at one's start
@pytest.mark.parametrize("into", ["third", "x0", "base"])
def test_segments_and_split_point(dtype, split, into):
    for settings in (
        TIES | {"density": 0.25},
        BREADCRUMBS | {"density": 0.9, "consensus": "sum"},
        TIES | {"density": 0.5, "consensus": "count", "rescale": True, "lambda_": 0.8},
    ):
        method = TaskArithmetic(**settings)
        for kind in ("gauss", "grid"):
            got, expected = merge_both(
                method, GENOME, dtype, 3, kind, (0.9, -0.3), into, segments=SEGMENTS, split=split
            )
            check(got, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_into_a_2d_tensor(dtype, spy):
    method = TaskArithmetic(**TIES, density=0.35)

    def run():
        base, x0, x1 = (t.view(61, 83) for t in models(61 * 83, dtype, 9, "grid"))
        return method.merge_into_(torch.empty_like(base), base, [x0, x1], [0.5, 0.8])

    check(*both_paths(run))
    assert spy.merges == 1 and spy.selections == 1


@pytest.mark.parametrize(
    "dtype,kind,settings",
    [
        (torch.float32, "gauss", TIES | {"density": 0.2}),
        (torch.bfloat16, "grid", BREADCRUMBS | {"density": 0.9, "consensus": "sum"}),
    ],
    ids=["float32-ties-gauss", "bfloat16-breadcrumbs_ties-grid"],
)
def test_large_tensors_with_a_sampled_bracket(dtype, kind, settings, spy):
    got, expected = merge_both(TaskArithmetic(**settings), LARGE, dtype, 21, kind, (0.6, -0.25))
    check(got, expected)
    assert spy.merges == 1 and spy.selections == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("extra", [1000, -1000], ids=["threshold_above_ties", "partial_ties"])
def test_many_ties_overflow_the_band_and_fall_back(dtype, extra, spy):
    """90 % of each task vector is 0 (x == base) and the k-th largest ``|d|`` sits at the edge
    of that block of ties: the sample brackets it with a zero and a positive key, every tie
    falls inside the bracket and overflows the band buffer, and the selection is redone without
    a sample. ``extra < 0``: fewer nonzeros than k, the threshold is 0 with some of its ties
    kept (``tie_end``)."""
    n = LARGE
    k = n // 10  # TIES with density 0.1
    g = torch.Generator().manual_seed(17)

    def make():
        base = torch.randn(n, generator=g)
        xs = []
        for _ in range(2):
            x = base.clone()
            where = torch.randperm(n, generator=g)[: k + extra]
            x[where] += torch.randn(k + extra, generator=g)
            xs.append(x)
        return [t.to(dtype) for t in (base, *xs)]

    method = TaskArithmetic(**TIES, density=0.1)
    data = make()

    def run():
        base, x0, x1 = (t.clone() for t in data)
        return method.merge_(torch.empty_like(base), base, [x0, x1], [0.6, 0.4])

    check(*both_paths(run))
    assert spy.overflows >= 1
    if extra < 0:
        assert spy.tie_ends >= 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [4099, 300_000], ids=["unsampled", "sampled"])
def test_partial_ties_at_the_threshold_are_found_in_the_band(dtype, n, spy):
    """Four values of ``|d|``: the threshold is one of them and only some of its ties are
    kept; where the last one kept lies comes from the selection's band and the block it was
    appended in (``tie_end_in``), not from a scan of the tensor (``tie_end``: only where a
    band overflowed, as it may with so many ties once the bracket is sampled)."""
    for settings in (TIES | {"density": 0.3}, BREADCRUMBS | {"density": 0.5, "gamma": 0.3}):
        method = TaskArithmetic(**settings)
        check(*merge_both(method, n, dtype, 2, "grid", (0.6, 0.4)), str(settings))
    assert spy.band_tie_ends >= 2
    assert spy.tie_ends <= spy.overflows


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_fused_path_is_taken_for_two_models(dtype, spy):
    for settings in (TIES | {"density": 0.3}, BREADCRUMBS | {"density": 0.9}):
        base, x0, x1 = models(2048, dtype, 1, "gauss")
        TaskArithmetic(**settings).merge_(torch.empty_like(base), base, [x0, x1], [0.5, 0.5])
    assert spy.merges == 2 and spy.selections == 2


def test_other_inputs_fall_back_to_the_torch_path(spy):
    """Three models, float16, a float32 output for bfloat16 models and a non-contiguous model
    take the torch merge, without error, with the torch path's result (the float32 output still
    gets the fused selection, which reads only the base and the models)."""
    method = TaskArithmetic(**TIES, density=0.3)
    base, x0, x1 = models(3001, torch.float32, 4, "gauss")
    x2 = models(3001, torch.float32, 5, "gauss")[1]
    h = [t.half() for t in (base, x0, x1)]
    bf = [t.bfloat16() for t in (base, x0, x1)]
    strided = torch.stack([x1, x0], dim=1)[:, 0]  # x1, not contiguous
    cases = {  # name: (merge, fused selections expected)
        "three models": (
            lambda: method.merge_(torch.empty_like(base), base, [x0, x1, x2], [0.5, 0.3, -0.2]),
            0,
        ),
        "float16": (lambda: method.merge_(torch.empty_like(h[0]), h[0], h[1:], [0.5, 0.3]), 0),
        "float32 output": (
            lambda: method.merge_into_(torch.empty(3001), bf[0], bf[1:], [0.5, 0.3]),
            1,
        ),
        "not contiguous": (
            lambda: method.merge_into_(torch.empty_like(base), base, [x0, strided], [0.5, 0.3]),
            0,
        ),
    }
    for name, (run, selections) in cases.items():
        spy.merges = spy.selections = 0
        got, expected = both_paths(run)
        assert same_bits(got, expected), f"{name}: {differences(got, expected)}"
        assert spy.merges == 0, name
        assert spy.selections == selections, name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_breadcrumbs_with_a_nan_threshold_hand_example(dtype):
    """n = 10, density 0.5, gamma 0.1: each model keeps ranks [4, 9) of |d|, NaN sorting last
    as in mergekit's argsort. x0's 9th smallest |d| is NaN, so x0 keeps 1.5, 2.0, 2.5, 3.0
    (and a NaN, NaN either way); x1 keeps -0.625, 1.0, 1.25, 1.75, -2.0. Both paths."""
    nan = float("nan")
    method = TaskArithmetic(**BREADCRUMBS | {"density": 0.5, "gamma": 0.1})

    def run():
        base = torch.zeros(10, dtype=dtype)
        x0 = torch.tensor([0.5, 0.25, 1.0, 0.75, 2.0, 1.5, 3.0, 2.5, nan, nan], dtype=dtype)
        x1 = torch.tensor(
            [0.125, -0.5, 0.25, 1.0, -2.0, 0.375, 1.25, 3.5, 1.75, -0.625], dtype=dtype
        )
        return method.merge_(torch.empty_like(base), base, [x0, x1], [1.0, 1.0])

    fused, reference = both_paths(run)
    check(fused, reference)
    expected = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 1.5, 4.25, 2.5, nan, nan], dtype=dtype)
    torch.testing.assert_close(fused, expected, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_thresholds_on_nan(dtype, config):
    """20 % of |d| NaN: TIES's top-k threshold is NaN (nothing kept, on both paths) and so is
    Model Breadcrumbs's first cut (every number below it kept)."""
    _, settings, weights, _ = config
    check(*merge_both(TaskArithmetic(**settings), 5003, dtype, 8, "nan", weights))


@pytest.mark.parametrize("size", [0, 1, 17, 1000])
def test_key_counts_count_below_and_equal(size):
    """The selection's counts around a key (numba for int32 keys, numpy otherwise) against a
    count by hand, for a key present, absent, below and above every key."""
    rng = np.random.default_rng(size)
    keys = rng.integers(-5, 6, size).astype(np.int32)
    for key in (-9, -5, 0, 3, 9):
        expected = (sum(int(k) < key for k in keys), sum(int(k) == key for k in keys))
        assert kernels.key_counts(keys, key) == expected
        assert kernels.key_counts(keys.astype(np.int64), key) == expected


# the compress of the selection pass in each form the host can run: LLVM's vector.compress
# (AVX-512's vpcompressd, or LLVM's expansion) and, on AVX2, the table of permutations
COMPRESS_FORMS = [False] + ([True] if _fused_compiles_for_avx2() else [])


@pytest.mark.parametrize("by_table", COMPRESS_FORMS)
@pytest.mark.parametrize("inside", [0.0, 0.03, 0.5, 1.0])
def test_compress_band_appends_the_keys_in_the_bracket_in_order(monkeypatch, by_table, inside):
    """``_fused.compress_band`` compiled in either form appends the keys in ``[lo, hi]`` in
    index order and counts those below ``lo``, for brackets holding none, a few, half and
    every key, the ends included; and writes nothing past 16 keys from where it appends."""
    from numba import njit

    from sparse_merge.merging import _fused

    monkeypatch.setattr(_fused, "_BY_TABLE", by_table)

    @njit  # compiled here, uncached, so the intrinsic is generated in the form patched in
    def compress_all(keys, lo, hi, out):
        m = below = 0
        for j in range(0, keys.size, 16):
            found = _fused.compress_band(keys, j, lo, hi, out, m)
            m += found & 0xFFFFFFFF
            below += found >> 32
        return m, below

    rng = np.random.default_rng(int(inside * 100))
    keys = rng.integers(0, 1000, 4096).astype(np.int32)
    lo = 200
    hi = lo + int(inside * 1000) - 1 if inside < 1 else 1 << 30
    lo = lo if inside < 1 else 0
    expected = keys[(keys >= lo) & (keys <= hi)]
    out = np.full(keys.size + 32, -7, np.int32)
    m, below = compress_all(keys, np.int32(lo), np.int32(hi), out)
    assert (m, below) == (expected.size, int((keys < lo).sum()))
    np.testing.assert_array_equal(out[:m], expected)
    assert (out[m + 16 :] == -7).all()


def test_band_ends_keep_exactly_the_entries_of_the_band():
    """The merge loops' one-compare-per-end test (``_fused.band_ends``, ``_fused.kept``)
    keeps exactly what ``lo < a < hi``, or ``a`` equal to an end whose ties are kept, keeps:
    for ends and magnitudes at zeros, subnormals, the float next to each end, the largest
    float, infinities and NaN, with every choice of kept ties."""
    from sparse_merge.merging import _fused

    f32 = np.float32
    tiny = np.finfo(f32).smallest_subnormal
    points = [0.0, -0.0, tiny, 2 * tiny, 1.0, 3.5, np.finfo(f32).max, np.inf, -np.inf, np.nan]
    points = np.array(points, f32)
    with np.errstate(over="ignore"):  # the float after the largest is inf
        near = [np.nextafter(points, f32(-np.inf)), np.nextafter(points, f32(np.inf))]
    near = np.concatenate(near)
    values = np.concatenate([points, near])
    values = values[~(values < 0)]  # magnitudes: |x - base| (either zero, or NaN)
    for lo in points:
        for hi in points:
            for tied_lo in (False, True):
                for tied_hi in (False, True):
                    above, upto = _fused.band_ends(lo, hi, tied_lo, tied_hi)
                    for a in values:
                        expected = ((a > lo) | ((a == lo) & tied_lo)) & (
                            (a < hi) | ((a == hi) & tied_hi)
                        )
                        assert _fused.kept(a, above, upto) == expected, (lo, hi, a)
