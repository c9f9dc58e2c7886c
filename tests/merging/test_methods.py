"""Merge methods: mergekit 0.1.5's own outputs, hand-computed values on tiny tensors, the flat
driver (segments, split point, aliasing), settings validation and every conf/merge YAML."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from sparse_merge.config import check_target_keys
from sparse_merge.errors import ConfigError
from sparse_merge.evolution.crossover import slerp_
from sparse_merge.merging.base import MergeMethod, tensor_segments
from sparse_merge.merging.linear import Linear
from sparse_merge.merging.slerp import Slerp
from sparse_merge.merging.task_arithmetic import TaskArithmetic, _keys, _value, first_k_mask
from sparse_merge.models.paramspace import ParamSpace

ROOT = Path(__file__).resolve().parents[2]
MERGE_CONF = sorted((ROOT / "conf" / "merge").glob("*.yaml"))
REFERENCE = torch.load(
    ROOT / "tests" / "fixtures" / "mergekit_reference.pt", weights_only=True
)  # written by tests/fixtures/make_mergekit_reference.py
CLASSES = {"Linear": Linear, "Slerp": Slerp, "TaskArithmetic": TaskArithmetic}

TIES = {"sparsification": "magnitude", "consensus": "sum", "normalize": True}
DARE = {"sparsification": "random", "rescale": True}


def t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- mergekit's own outputs ----------------------------------------------------------------


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda c: c["label"])
def test_matches_mergekit(case):
    if case["seed"] is not None and REFERENCE["torch"] != torch.__version__:
        pytest.skip(f"random masks recorded under torch {REFERENCE['torch']}")
    method = CLASSES[case["cls"]](**case["kwargs"])
    inputs = case["inputs"]
    base, models = (inputs[0], inputs[1:]) if method.needs_base else (None, inputs)
    rng = None if case["seed"] is None else gen(case["seed"])  # mergekit: torch.manual_seed
    out = method.merge_tensor(base, models, case["weights"], rng)
    assert out.dtype == case["output"].dtype and out.shape == case["output"].shape
    if case["cls"] == "Slerp":  # the angle's dots are summed in float64 (docs/merging.md)
        torch.testing.assert_close(out, case["output"], rtol=0, atol=1e-6)
    else:  # bit for bit
        assert torch.equal(out, case["output"])


@pytest.mark.parametrize(
    "case",
    [c for c in REFERENCE["cases"] if c["cls"] == "TaskArithmetic" and len(c["weights"]) > 2],
    ids=lambda c: c["label"],
)
def test_matches_mergekit_on_the_torch_path(case, monkeypatch):
    """More than two models, and any device but the CPU, take the op-by-op torch path; this
    runs every case of three or more models there."""
    from sparse_merge.merging import kernels

    monkeypatch.setattr(kernels, "usable", lambda *tensors: False)
    test_matches_mergekit(case)


# --- linear ---------------------------------------------------------------------------------


def test_linear_normalises_by_the_weight_sum():
    a, b = t([[1, 2, 3], [4, 5, 6]]), t([[3, 2, 1], [0, -1, 2]])
    # (1 * a + 3 * b) = [[10, 8, 6], [4, 2, 12]], / (1 + 3)
    out = Linear().merge_tensor(None, [a, b], [1.0, 3.0], None)
    assert torch.equal(out, t([[2.5, 2, 1.5], [1, 0.5, 3]]))
    out = Linear(normalize=False).merge_tensor(None, [a, b], [1.0, 3.0], None)
    assert torch.equal(out, t([[10, 8, 6], [4, 2, 12]]))
    with pytest.raises(ValueError, match="sum to 0"):
        Linear().merge_tensor(None, [a, b], [1.0, -1.0], None)


# --- slerp ----------------------------------------------------------------------------------


def test_slerp_ends_are_the_inputs():
    g = gen(0)
    a, b = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    assert torch.equal(Slerp().merge_tensor(None, [a, b], [1.0, 0.0], None), a)
    assert torch.equal(Slerp().merge_tensor(None, [a, b], [0.0, 1.0], None), b)
    # weights need not sum to 1: t = w1 / (w0 + w1)
    torch.testing.assert_close(
        Slerp().merge_tensor(None, [a, b], [3.0, 1.0], None),
        Slerp().merge_tensor(None, [a, b], [0.75, 0.25], None),
    )


def test_slerp_orthogonal_vectors():
    a, b = t([2, 0]), t([0, 3])  # angle pi/2: coefficients sin((1-t) pi/2), sin(t pi/2)
    out = Slerp().merge_tensor(None, [a, b], [0.5, 0.5], None)
    torch.testing.assert_close(out, t([math.sqrt(2), 1.5 * math.sqrt(2)]))
    out = Slerp().merge_tensor(None, [a, b], [2 / 3, 1 / 3], None)  # sin(pi/3), sin(pi/6)
    torch.testing.assert_close(out, t([math.sqrt(3), 1.5]))


def test_slerp_falls_back_to_lerp_when_nearly_parallel():
    a, b = t([1, 0]), t([math.cos(0.1), math.sin(0.1)])  # cos = 0.995
    lerp = 0.7 * a + 0.3 * b
    curved = Slerp().merge_tensor(None, [a, b], [0.7, 0.3], None)
    flat = Slerp(dot_threshold=0.99).merge_tensor(None, [a, b], [0.7, 0.3], None)
    torch.testing.assert_close(flat, lerp)
    assert not torch.allclose(curved, lerp, atol=1e-5)
    torch.testing.assert_close(curved.norm(), torch.tensor(1.0))  # on the unit circle
    x = t([1, 2, 3])
    torch.testing.assert_close(Slerp().merge_tensor(None, [x, 2 * x], [0.5, 0.5], None), 1.5 * x)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("granularity", ["tensor", "genome"])
def test_slerp_of_a_tensor_holding_nan_or_inf_is_nan(bad, granularity):
    """The angle is undefined: every entry is NaN, as mergekit gives (the per-tensor form used
    to fall back to a linear interpolation that hid it)."""
    a, b = torch.randn(4, 8, generator=gen(0)), torch.randn(4, 8, generator=gen(1))
    a[0, 0] = bad
    out = Slerp(granularity=granularity).merge_tensor(None, [a, b], [0.7, 0.3], None)
    assert torch.isnan(out).all()


def test_slerp_angle_per_tensor_differs_from_one_per_genome():
    g = gen(1)
    a, b = torch.randn(40, generator=g), torch.randn(40, generator=g)
    b[20:] = a[20:] * 5  # second tensor parallel, first one not
    segments = [(0, 20, (4, 5)), (20, 40, (20,))]
    per_tensor = Slerp().merge_(torch.empty(40), None, [a, b], [0.6, 0.4], segments=segments)
    genome = Slerp(granularity="genome")
    whole = genome.merge_(torch.empty(40), None, [a, b], [0.6, 0.4], segments=segments)
    assert not torch.allclose(per_tensor, whole, atol=1e-4)
    torch.testing.assert_close(per_tensor[20:], 0.6 * a[20:] + 0.4 * b[20:])
    assert torch.equal(whole, slerp_(torch.empty(40), a, b, 0.4))
    # with a split point: t on [:split], 1 - t after it, as the M2N2 reference
    split = genome.merge_(torch.empty(40), None, [a, b], [0.6, 0.4], split=13)
    assert torch.equal(split, slerp_(torch.empty(40), a, b, 0.4, 13))
    one = genome.merge_tensor(None, [a.view(4, 10), b.view(4, 10)], [0.6, 0.4], None)
    assert torch.equal(one.view(-1), whole)


# --- generalized task arithmetic -------------------------------------------------------------


def test_task_arithmetic_with_lambda_and_normalize():
    base = torch.ones(2, 3)
    d1, d2 = t([[2, 0, -2], [4, 4, 0]]), t([[1, 1, 1], [0, -1, 0.5]])
    # 0.5 * d1 + 2 * d2 = [[3, 2, 1], [2, 0, 1]]
    out = TaskArithmetic(lambda_=0.5).merge_tensor(base, [base + d1, base + d2], [0.5, 2.0])
    assert torch.equal(out, 1 + t([[1.5, 1, 0.5], [1, 0, 0.5]]))
    out = TaskArithmetic(normalize=True).merge_tensor(base, [base + d1, base + d2], [0.5, 2.0])
    torch.testing.assert_close(out, 1 + t([[3, 2, 1], [2, 0, 1]]) / 2.5)
    # weights summing to 0: mergekit divides by 1 instead
    out = TaskArithmetic(normalize=True).merge_tensor(base, [base + d1, base + d2], [1.0, -1.0])
    assert torch.equal(out, base + d1 - d2)


def test_ties_trim_elect_and_disjoint_mean():
    base = torch.ones(2, 3)
    d1 = t([[3, -1, 0.5], [-2, 4, -0.2]])
    d2 = t([[-1, 2, -3], [1, -0.5, 0.1]])
    # k = int(0.5 * 6) = 3 per tensor. d1 keeps 4, 3, -2: [[3, 0, 0], [-2, 4, 0]].
    # d2 keeps -3, 2 and, of the tie |-1| = |1|, the lower index: [[-1, 2, -3], [0, 0, 0]].
    # Weighted (1, 0.5): d2 -> [[-0.5, 1, -1.5], [0, 0, 0]]; sums [[2.5, 1, -1.5], [-2, 4, 0]]
    # elect [[+, +, -], [-, +, +]] (0 counts as +); kept: d1 at (0,0), (1,0), (1,1); d2 at
    # (0,1), (0,2); merged [[3, 1, -1.5], [-2, 4, 0]] / kept weights [[1, .5, .5], [1, 1, 0->1]]
    ties = TaskArithmetic(**TIES, density=0.5)
    out = ties.merge_tensor(base, [base + d1, base + d2], [1.0, 0.5])
    assert torch.equal(out, 1 + t([[3, 2, -3], [-2, 4, 0]]))
    plain = TaskArithmetic(**{**TIES, "normalize": False}, density=0.5)
    out = plain.merge_tensor(base, [base + d1, base + d2], [1.0, 0.5])
    assert torch.equal(out, 1 + t([[3, 1, -1.5], [-2, 4, 0]]))


def test_ties_sign_election_counts_zero_as_positive():
    zero = torch.zeros(2)
    x1, x2 = t([1, -2]), t([-1, 2])  # sums 0, 0: positive wins, mean of the positive entries
    out = TaskArithmetic(consensus="sum", normalize=True).merge_tensor(zero, [x1, x2], [1, 1])
    assert torch.equal(out, t([1, 2]))
    # count: two small negatives outvote one large positive; sum: the positive wins
    xs = [t([-1.0]), t([-1.0]), t([5.0])]
    count = TaskArithmetic(consensus="count", normalize=True)
    assert torch.equal(count.merge_tensor(torch.zeros(1), xs, [1, 1, 1]), t([-1.0]))
    by_sum = TaskArithmetic(consensus="sum", normalize=True)
    assert torch.equal(by_sum.merge_tensor(torch.zeros(1), xs, [1, 1, 1]), t([5.0]))


def test_magnitude_keeps_int_density_numel_at_least_one():
    g = gen(2)
    base, x = torch.zeros(10, 10), torch.randn(10, 10, generator=g)
    for density, kept in [(0.5, 50), (0.29, 28), (0.001, 1), (0.0, 0), (1.0, 100)]:
        method = TaskArithmetic(sparsification="magnitude", density=density)
        out = method.merge_tensor(base, [x], [1.0])
        assert int(out.count_nonzero()) == kept  # 0.29 * 100 = 28.999...: truncated
        if 0 < kept < 100:  # the largest |x| are kept
            assert out.abs().max() == x.abs().max()
            assert x[out == 0].abs().max() <= out[out != 0].abs().min()


def test_first_k_mask_ties_keep_lowest_indices():
    v = t([1, 3, 2, 3, 2, 2, 0])
    assert first_k_mask(v, 3, largest=True).tolist() == [0, 1, 1, 1, 0, 0, 0]
    assert first_k_mask(v, 4, largest=True).tolist() == [0, 1, 1, 1, 1, 0, 0]
    assert first_k_mask(v, 3, largest=False).tolist() == [1, 0, 1, 0, 0, 0, 1]
    big = torch.randint(0, 4, (5000,), generator=gen(3)).float()  # many ties
    sort = torch.sort(big, descending=True, stable=True).indices[:1234]
    expected = torch.zeros(5000, dtype=torch.bool)
    expected[sort] = True
    assert torch.equal(first_k_mask(big, 1234, largest=True), expected)


@pytest.mark.parametrize("pattern", ["ties", "aligned"])
def test_first_k_mask_on_large_tensors_is_a_stable_sort(pattern):
    n = 300_000  # large enough for the sampled bracket (and its fallback when it misses)
    if pattern == "ties":  # few distinct values, like deltas quantised to the weights' ulp
        v = torch.randint(0, 1000, (n,), generator=gen(16)).float()
    else:  # the strided sample sees only the large entries: the bracket misses
        v = torch.rand(n, generator=gen(16))
        v[:: n // (1 << 14)] += 10
    for k in (1, 3_000, 150_000, 299_000):
        for largest in (True, False):
            first = torch.sort(v, descending=largest, stable=True).indices[:k]
            expected = torch.zeros(n, dtype=torch.bool)
            expected[first] = True
            assert torch.equal(first_k_mask(v, k, largest=largest), expected), (k, largest)


def test_breadcrumbs_removes_outliers_and_smallest():
    base = torch.zeros(2, 5)
    x = t([[1, -2, 3, -4, 5], [-6, 7, -8, 9, -10]])  # |x| ranks 1..10
    crumbs = TaskArithmetic(sparsification="magnitude_outliers", density=0.5, gamma=0.1)
    # keep int(0.5 * 10) = 5, drop int(0.1 * 10) = 1 largest and 10 - 5 - 1 = 4 smallest
    expected = t([[0, 0, 0, 0, 5], [-6, 7, -8, 9, 0]])
    assert torch.equal(crumbs.merge_tensor(base, [x], [1.0]), expected)
    # int() truncates: 5.5 -> 5 kept, 1.9 -> 1 outlier
    crumbs = TaskArithmetic(sparsification="magnitude_outliers", density=0.55, gamma=0.19)
    assert torch.equal(crumbs.merge_tensor(base, [x], [1.0]), expected)
    # density + gamma > 1: fewer outliers removed so that density is kept
    crumbs = TaskArithmetic(sparsification="magnitude_outliers", density=0.95, gamma=0.1)
    assert torch.equal(crumbs.merge_tensor(base, [x], [1.0]), x.masked_fill(x.abs() == 10, 0))


def test_dare_keeps_density_and_rescales_to_the_l1_norm():
    base = torch.zeros(400, 250)
    x = torch.randn(400, 250, generator=gen(4))
    out = TaskArithmetic(**DARE, density=0.3).merge_tensor(base, [x], [1.0], gen(5))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    scale = x.abs().sum() / x[kept].abs().sum()  # mergekit 0.1.5: L1 norm matched
    torch.testing.assert_close(out[kept], x[kept] * scale)
    torch.testing.assert_close(out.abs().sum(), x.abs().sum())
    raw = TaskArithmetic(sparsification="random", density=0.3).merge_tensor(
        base, [x], [1.0], gen(5)
    )
    assert torch.equal(raw != 0, kept) and torch.equal(raw[kept], x[kept])
    again = TaskArithmetic(**DARE, density=0.3).merge_tensor(base, [x], [1.0], gen(5))
    other = TaskArithmetic(**DARE, density=0.3).merge_tensor(base, [x], [1.0], gen(6))
    assert torch.equal(out, again) and not torch.equal(out, other)
    with pytest.raises(ValueError, match="Generator"):
        TaskArithmetic(**DARE, density=0.3).merge_tensor(base, [x], [1.0], None)


@pytest.mark.parametrize("settings", [DARE, {**DARE, "consensus": "sum"}, TIES])
def test_density_one_is_the_plain_method(settings):
    g = gen(7)
    base, a, b = (torch.randn(6, 8, generator=g) for _ in range(3))
    rng = gen(8)
    state = rng.get_state()
    method = TaskArithmetic(**settings, density=1.0)
    assert not method.stochastic
    plain = TaskArithmetic(consensus=settings.get("consensus", "none"), normalize=method.normalize)
    torch.testing.assert_close(
        method.merge_tensor(base, [a, b], [0.4, 0.9], rng),
        plain.merge_tensor(base, [a, b], [0.4, 0.9]),
    )
    assert torch.equal(rng.get_state(), state)  # nothing drawn


def test_della_keep_probability_rises_with_rank():
    base = torch.zeros(200, 2000)
    x = torch.randn(200, 2000, generator=gen(9))
    della = TaskArithmetic(sparsification="rank_magnitude", density=0.5, epsilon=0.4, rescale=True)
    assert della.stochastic
    out = della.merge_tensor(base, [x], [1.0], gen(10))
    kept = out != 0
    rank = x.abs().argsort(dim=1).argsort(dim=1)  # [200, 2000], 0 = smallest in its row
    # probabilities 0.1 + 0.8 * rank / 1999: mean 0.14 on the bottom tenth, 0.86 on the top
    assert abs(kept[rank < 200].float().mean().item() - 0.14) < 0.01
    assert abs(kept[rank >= 1800].float().mean().item() - 0.86) < 0.01
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    torch.testing.assert_close(out.abs().sum(), x.abs().sum())  # L1 rescaled


# --- the flat driver ------------------------------------------------------------------------

METHODS = {
    "linear": lambda: Linear(),
    "slerp": lambda: Slerp(),
    "slerp_genome": lambda: Slerp(granularity="genome"),
    "task_arithmetic": lambda: TaskArithmetic(lambda_=0.7),
    "ties": lambda: TaskArithmetic(**TIES, density=0.4),
    "dare_ties": lambda: TaskArithmetic(**DARE, consensus="sum", density=0.4),
    "breadcrumbs": lambda: TaskArithmetic(sparsification="magnitude_outliers", density=0.6),
    "della": lambda: TaskArithmetic(
        sparsification="rank_magnitude", consensus="sum", density=0.4, normalize=True
    ),
}
SEGMENTS = [(0, 12, (3, 4)), (12, 16, (4,)), (20, 50, (5, 6)), (50, 60, None)]  # gap 16:20


def _genomes(n: int, count: int = 3, dtype=torch.float32) -> list[torch.Tensor]:
    g = gen(11)
    return [torch.randn(n, generator=g).to(dtype) for _ in range(count)]


def _per_tensor(method: MergeMethod, base, genomes, weights, split, seed):
    """The driver's result built by hand: one merge_tensor call per piece."""
    rng, out = gen(seed), torch.empty_like(genomes[0])
    pieces = [(0, 12, (3, 4)), (12, 16, (4,)), (16, 20, None), (20, 50, (5, 6)), (50, 60, None)]
    if split is not None:  # the straddling segment (20, 50) is cut in two flat pieces
        pieces = pieces[:3] + [(20, split, None), (split, 50, None)] + pieces[4:]
    for lo, hi, shape in pieces:
        w = weights if hi <= (split if split is not None else 60) else weights[::-1]
        shape = shape or (hi - lo,)
        b = None if base is None else base[lo:hi].view(shape)
        merged = method.merge_tensor(b, [x[lo:hi].view(shape) for x in genomes], w, rng)
        out[lo:hi] = merged.reshape(-1)
    return out


@pytest.mark.parametrize("name", [n for n in METHODS if n != "slerp_genome"])
@pytest.mark.parametrize("split", [None, 33])
def test_merge_over_segments_is_merge_tensor_per_tensor(name, split):
    method = METHODS[name]()
    base, *genomes = _genomes(60)
    base = base if method.needs_base else None
    weights = [0.3, 0.9]
    out = method.merge_(
        torch.empty(60), base, genomes, weights, segments=SEGMENTS, split=split, rng=gen(12)
    )
    torch.testing.assert_close(out, _per_tensor(method, base, genomes, weights, split, 12))


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("split", [None, 0, 27, 60])
def test_out_may_alias_an_input(name, split):
    method = METHODS[name]()
    base, *genomes = _genomes(60)
    if not method.needs_base:
        base, genomes = None, genomes[:2] if name.startswith("slerp") else [base, *genomes]
    weights = [0.2, 0.7, 1.1][: len(genomes)]
    kw = {"segments": SEGMENTS, "split": split}
    fresh = method.merge_(torch.empty(60), base, genomes, weights, rng=gen(13), **kw)
    for target in range(len(genomes) + (base is not None)):
        ins = [x.clone() for x in genomes]
        b = None if base is None else base.clone()
        out = b if target == len(ins) else ins[target]
        got = method.merge_(out, b, ins, weights, rng=gen(13), **kw)
        assert got is out
        # slerp_ writing into b scales b first: the same up to rounding
        exact = {} if name == "slerp_genome" else {"rtol": 0, "atol": 0}
        torch.testing.assert_close(got, fresh, **exact)


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_ties"])
def test_one_method_merges_many_weights_and_dtypes_as_fresh_ones(name):
    """A method instance that has merged before (it keeps its last weights, rounded to the
    dtype) gives what a fresh one gives, across weights and dtypes in turn."""
    used = METHODS[name]()
    for step in range(12):
        dtype = (torch.float32, torch.bfloat16, torch.float16)[step % 3]
        base, *genomes = _genomes(60, dtype=dtype)
        weights = [0.1 + 0.07 * (step // 3), 1 / 3]  # 1/3 rounds differently per dtype
        got, fresh = (
            method.merge_(
                torch.empty(60, dtype=dtype), base, genomes, weights, split=20, rng=gen(step)
            )
            for method in (used, METHODS[name]())
        )
        torch.testing.assert_close(got, fresh, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("signed", [False, True])
def test_selection_keys_map_back_to_their_values(dtype, signed):
    """``_value`` inverts ``_keys``: every float, zeros, subnormals and infinities included,
    comes back from its order key (magnitudes only, without ``signed``)."""
    specials = [0.0, -0.0, 1e-40, -1e-40, 5e-8, math.inf, -math.inf, 1.0, -3.5]
    v = torch.cat([torch.tensor(specials), torch.randn(200, generator=gen(3)) * 1e3]).to(dtype)
    v = v if signed else v.abs()
    back = [_value(int(k), dtype, signed) for k in _keys(v, signed)]
    expected = (v + 0.0 if signed else v).tolist()  # signed keys take -0.0 as +0.0
    assert [(x, math.copysign(1, x)) for x in back] == [(x, math.copysign(1, x)) for x in expected]


def test_split_reverses_the_weights():
    a, b = _genomes(60, 2)
    out = Linear().merge_(torch.empty(60), None, [a, b], [0.25, 0.75], segments=SEGMENTS, split=9)
    torch.testing.assert_close(out[:9], 0.25 * a[:9] + 0.75 * b[:9])
    torch.testing.assert_close(out[9:], 0.75 * a[9:] + 0.25 * b[9:])
    # three genomes: the weights reversed, [w0, w1, w2] -> [w2, w1, w0]
    x, y, z = _genomes(60)
    out = Linear(normalize=False).merge_(torch.empty(60), None, [x, y, z], [1, 2, 3], split=30)
    torch.testing.assert_close(out[:30], (x + 2 * y + 3 * z)[:30])
    torch.testing.assert_close(out[30:], (3 * x + 2 * y + z)[30:])


def test_three_genomes_and_the_base():
    base, x, y, z = _genomes(60, 4)
    out = TaskArithmetic().merge_(torch.empty(60), base, [x, y, z], [0.5, 0.25, 1.0])
    torch.testing.assert_close(out, base + 0.5 * (x - base) + 0.25 * (y - base) + (z - base))
    with pytest.raises(ValueError, match="needs the base"):
        TaskArithmetic().merge_(torch.empty(60), None, [x, y], [0.5, 0.5])
    with pytest.raises(ValueError, match="exactly two"):
        Slerp().merge_(torch.empty(60), None, [x, y, z], [1, 1, 1])
    with pytest.raises(ValueError, match="weights"):
        Linear().merge_(torch.empty(60), None, [x, y, z], [1, 1])
    with pytest.raises(ValueError, match="split"):
        Linear().merge_(torch.empty(60), None, [x, y], [1, 1], split=61)


def test_segments_of_a_param_space():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    space = ParamSpace(model)
    segments = tensor_segments(space.slots)
    assert segments == [(0, 12, (4, 3)), (12, 16, (4,)), (16, 24, (2, 4)), (24, 26, (2,))]
    genomes = [space.genome() + i for i in range(2)]
    ties = TaskArithmetic(**TIES, density=0.5)
    out = ties.merge_(space.flat, torch.zeros(26), genomes, [1.0, 1.0], segments=segments)
    assert out is space.flat
    weight = model[0].weight  # a view of the merged genome: 6 of 12 kept per task vector
    ref = ties.merge_tensor(torch.zeros(4, 3), [g[:12].view(4, 3) for g in genomes], [1, 1])
    assert torch.equal(weight, ref)


@pytest.mark.parametrize("name", list(METHODS))
def test_bfloat16_genomes(name):
    method = METHODS[name]()
    base, *genomes = _genomes(60, dtype=torch.bfloat16)
    if not method.needs_base:
        base = None
    genomes = genomes[:2]
    out = method.merge_(
        torch.empty(60, dtype=torch.bfloat16),
        base,
        genomes,
        [0.4, 0.6],
        segments=SEGMENTS,
        split=31,
        rng=gen(14),
    )
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = method.merge_(
        torch.empty(60),
        None if base is None else base.float(),
        [g.float() for g in genomes],
        [0.4, 0.6],
        segments=SEGMENTS,
        split=31,
        rng=gen(14),
    )
    if name in ("linear", "slerp", "slerp_genome", "task_arithmetic"):  # no masks to differ
        torch.testing.assert_close(out.float(), ref, atol=0.03, rtol=0.02)


# --- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: TaskArithmetic(sparsification="dropout"), "sparsification"),
        (lambda: TaskArithmetic(consensus="max"), "consensus"),
        (lambda: TaskArithmetic(density=1.5), "density"),
        (lambda: TaskArithmetic(density=-0.1), "density"),
        (lambda: TaskArithmetic(gamma=2.0), "gamma"),
        (lambda: TaskArithmetic(epsilon=1.0), "epsilon"),
        (
            lambda: TaskArithmetic(sparsification="rank_magnitude", density=0.2, epsilon=0.2),
            "epsilon",
        ),
        (lambda: TaskArithmetic(normalize="yes"), "normalize"),
        (lambda: TaskArithmetic(rescale=None), "rescale"),
        (lambda: TaskArithmetic(lambda_=float("nan")), "lambda_"),
        (lambda: TaskArithmetic(lambda_=float("-inf")), "lambda_"),
        (lambda: TaskArithmetic(lambda_=True), "lambda_"),
        (lambda: Slerp(granularity="layer"), "granularity"),
        (lambda: Slerp(dot_threshold=1.0), "dot_threshold"),
        (lambda: Slerp(eps=0.0), "eps"),
        (lambda: Linear(normalize="true"), "normalize"),
        (lambda: TaskArithmetic(compute_dtype="float16"), "compute_dtype"),
        (lambda: Slerp(granularity="genome", compute_dtype="bf16"), "compute_dtype"),
    ],
)
def test_bad_settings_name_the_key(build, key):
    with pytest.raises(ConfigError) as err:
        build()
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}=")


def test_names_flags_and_describe():
    assert TaskArithmetic(**TIES).name == "ties"
    assert TaskArithmetic(sparsification="magnitude", consensus="count").name == "task_arithmetic"
    assert TaskArithmetic(**DARE, density=0.5).stochastic
    assert not TaskArithmetic(**TIES, density=0.5).stochastic
    assert TaskArithmetic().needs_base and not Linear().needs_base and not Slerp().needs_base
    assert Slerp(granularity="genome").describe() == {
        "name": "slerp",
        "granularity": "genome",
        "dot_threshold": 0.9995,
        "eps": 1e-8,
    }
    assert Slerp(compute_dtype="float32").describe()["compute_dtype"] == "float32"
    assert TaskArithmetic(compute_dtype="float32").describe()["compute_dtype"] == "float32"
    assert "compute_dtype" not in TaskArithmetic().describe()  # the default: as before
    assert repr(Linear()) == "Linear(normalize=True)"


@pytest.mark.parametrize("path", MERGE_CONF, ids=lambda p: p.stem)
def test_every_merge_yaml_instantiates_and_merges(path):
    cfg = OmegaConf.load(path)
    check_target_keys(cfg, f"merge/{path.stem}")
    method = instantiate(cfg)
    assert isinstance(method, MergeMethod)
    assert method.describe()["name"] == path.stem  # the file is named after mergekit's method
    base, a, b = _genomes(60)
    out = method.merge_(
        torch.empty(60),
        base if method.needs_base else None,
        [a, b],
        [0.4, 0.6],
        segments=SEGMENTS,
        split=25,
        rng=gen(15),
    )
    assert torch.isfinite(out).all() and not torch.equal(out, a) and not torch.equal(out, b)


def test_every_variant_has_a_yaml():
    names = {p.stem for p in MERGE_CONF}
    assert names == {
        "linear",
        "slerp",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
    }
