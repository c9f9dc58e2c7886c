"""Crossover's streaming merge kernels: every merge method the engine can use as crossover gives
what a straightforward whole-tensor implementation gives (the arithmetic mergekit 0.1.5 uses,
Bernoulli masks from ``torch.bernoulli``, top-k by a stable sort), over many chunks, with and
without a split point, written into a fresh buffer or into a parent; and no merge holds a
temporary anywhere near the genome's size.

The chunk (``merging.base.CHUNK``) and the selection sample (``SELECT_SAMPLE``) are shrunk so
that genomes of 70K elements cross dozens of chunk boundaries and take the sampled top-k path.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from sparse_merge.evolution.crossover import Crossover
from sparse_merge.merging import base as merging_base
from sparse_merge.merging import kernels as merge_kernels
from sparse_merge.merging import task_arithmetic
from sparse_merge.merging.linear import Linear
from sparse_merge.merging.slerp import Slerp
from sparse_merge.merging.task_arithmetic import TaskArithmetic

from ..merging.fused_paths import watch

# (name, method, exact): exact means bit-identical to the reference; otherwise the reference
# sums differently (SLERP's dot products, the L1 norms of rescale) and agrees to rounding
METHODS = [
    ("slerp_genome", lambda: Slerp(granularity="genome"), False),
    ("slerp_tensor", lambda: Slerp(), False),
    ("linear", lambda: Linear(), True),
    ("task_arithmetic", lambda: TaskArithmetic(lambda_=0.7), True),
    ("ties", lambda: TaskArithmetic("magnitude", "sum", density=0.4, normalize=True), True),
    ("dare_linear", lambda: TaskArithmetic("random", density=0.5, rescale=True), False),
    ("dare_ties", lambda: TaskArithmetic("random", "sum", density=0.4, rescale=True), False),
    ("dare_plain", lambda: TaskArithmetic("random", "sum", density=0.4), True),
    ("breadcrumbs", lambda: TaskArithmetic("magnitude_outliers", density=0.9, gamma=0.05), True),
    ("breadcrumbs_ties", lambda: TaskArithmetic("magnitude_outliers", "sum", density=0.6), True),
    (
        "della",
        lambda: TaskArithmetic("rank_magnitude", "sum", density=0.5, normalize=True, rescale=True),
        False,
    ),
    ("della_plain", lambda: TaskArithmetic("rank_magnitude", density=0.5, epsilon=0.3), True),
]
# two matrices, a vector, a gap (merged flat) and a tail: 70123 elements
SEGMENTS = [(0, 30000, (120, 250)), (30000, 50000, (20000,)), (50500, 69700, (64, 300))]
N = 70123
SPLIT = 41234  # inside the vector: merged as two flat pieces


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(merging_base, "CHUNK", 4096)
    monkeypatch.setattr(task_arithmetic, "SELECT_SAMPLE", 4096)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _genomes(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and three parents near it; the third on a grid of 1/8, so that its task vector
    has ties of every size (a large mass at zero)."""
    g = gen(0)
    base = (torch.randn(N, generator=g) / 8).round() / 8
    parents = [base + 0.1 * torch.randn(N, generator=g) for _ in range(2)]
    parents.append(base + (torch.randn(N, generator=g) / 2).round() / 8)
    return base.to(dtype), [p.to(dtype) for p in parents]


# --- the straightforward reference ------------------------------------------------------------


def _ref_slerp(x: torch.Tensor, y: torch.Tensor, t: float, method: Slerp) -> torch.Tensor:
    """mergekit's SLERP of two flat tensors (M2N2's per genome), float64 dot products."""
    xd, yd = x.double(), y.double()
    na, nb = float(xd.norm()), float(yd.norm())
    if method.granularity == "genome":
        cos = float(xd @ yd) / max(na * nb, 1e-7)
        linear = math.sin(math.acos(min(max(cos, -1.0), 1.0))) < 1e-7
    else:
        na, nb = (na if na > method.eps else 1.0), (nb if nb > method.eps else 1.0)
        cos = min(max(float(xd @ yd) / (na * nb), -1.0), 1.0)
        linear = abs(cos) > method.dot_threshold
    ca, cb = 1.0 - t, t
    if not linear:
        theta = math.acos(min(max(cos, -1.0), 1.0))
        ca, cb = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    if method.granularity == "genome":  # in the genome's dtype, as the M2N2 reference
        return (x * ca).add_(y, alpha=cb)
    return x.to(torch.float32, copy=True).mul_(ca).add_(y, alpha=cb).to(x.dtype)


def _ref_mask(m: TaskArithmetic, d: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """mergekit's keep mask of one task vector (float 0/1 in the work dtype)."""
    n, flat = d.numel(), d.abs().reshape(-1)
    work = torch.bfloat16 if d.dtype == torch.bfloat16 else torch.float32
    if m.sparsification == "magnitude":
        keep = torch.zeros(n)
        keep[
            torch.sort(flat, descending=True, stable=True).indices[: max(1, int(m.density * n))]
        ] = 1
    elif m.sparsification == "magnitude_outliers":
        target, top = int(m.density * n), int(m.gamma * n)
        bottom = max(0, n - target - top)
        keep = torch.zeros(n)
        keep[torch.sort(flat, stable=True).indices[bottom : bottom + target]] = 1
    elif m.sparsification == "random":
        return torch.bernoulli(torch.full(d.shape, m.density, dtype=work), generator=rng)
    else:  # DELLA: keep probability linear in the rank of |d| within its row
        rows = d.abs().to(work).reshape(d.shape[0] if d.dim() >= 2 else 1, -1)
        ranks = rows.argsort(dim=1, stable=True).argsort(dim=1).to(work) + 1
        lo, hi = ranks.amin(dim=1, keepdim=True), ranks.amax(dim=1, keepdim=True)
        norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
        probs = (m.density - m.epsilon) + norm * 2 * m.epsilon
        return torch.bernoulli(probs, generator=rng).view(d.shape)
    return keep.view(d.shape).to(d.dtype)


def _ref_task_arithmetic(m: TaskArithmetic, base, xs, weights, rng) -> torch.Tensor:
    """mergekit 0.1.5's generalized task arithmetic on one whole tensor."""
    dtype = base.dtype
    deltas = []
    for x in xs:
        d = x - base
        if m.density < 1:
            work = d.to(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
            before = work.abs().sum()
            work = work * _ref_mask(m, d, rng).to(work.dtype)
            after = work.abs().sum()
            if m.rescale and before >= 1e-7 and after >= 1e-7:
                work = work * (before / after)
            d = work.to(dtype)
        deltas.append(d)
    w = torch.tensor(weights, dtype=dtype).view(-1, *([1] * base.dim()))
    deltas = torch.stack(deltas) * w
    if m.consensus != "none":
        votes = deltas.sum(0) if m.consensus == "sum" else deltas.sign().sum(0)
        keep = deltas * torch.where(votes >= 0, 1.0, -1.0).to(dtype) > 0
        divisor = (w * keep).sum(0)
        divisor[divisor == 0] = 1
        mixed = (deltas * keep).sum(0)
    else:
        mixed, divisor = deltas.sum(0), w.sum()
    if m.normalize:
        mixed = mixed / divisor
    return (mixed * m.lambda_ + base).to(dtype)


def _ref_piece(method, base, xs, weights, rng) -> torch.Tensor:
    if isinstance(method, Slerp):
        t = weights[1] / (weights[0] + weights[1])
        return _ref_slerp(xs[0].reshape(-1), xs[1].reshape(-1), t, method).view(xs[0].shape)
    if isinstance(method, Linear):
        w = torch.tensor(weights, dtype=torch.float32).tolist()
        acc = xs[0].float() * w[0]
        for x, wi in zip(xs[1:], w[1:]):
            acc.add_(x, alpha=wi)
        return (acc / sum(torch.tensor(weights, dtype=torch.float32))).to(xs[0].dtype)
    return _ref_task_arithmetic(method, base, xs, weights, rng)


def _reference(method, base, parents, weights, split, rng) -> torch.Tensor:
    """The merge of flat genomes, piece by piece (tensors, gaps, the split point), each piece
    merged whole."""
    if isinstance(method, Slerp) and method.granularity == "genome":
        split = N if split is None else split
        first = _ref_slerp(parents[0], parents[1], weights[1], method)
        second = _ref_slerp(parents[0], parents[1], weights[0], method)
        return torch.cat([first[:split], second[split:]])
    out = torch.empty_like(parents[0])
    pieces, pos = [], 0
    for lo, hi, shape in SEGMENTS:
        pieces += [(pos, lo, None)] if lo > pos else []
        pieces.append((lo, hi, shape))
        pos = hi
    pieces.append((pos, N, None))
    for lo, hi, shape in pieces:
        cut = [(lo, hi, shape)]
        if split is not None and lo < split < hi:
            cut = [(lo, split, None), (split, hi, None)]
        for a, b, s in cut:
            s = s or (b - a,)
            w = weights if split is None or b <= split else weights[::-1]
            xs = [p[a:b].view(s) for p in parents]
            merged = _ref_piece(method, base[a:b].view(s), xs, w, rng)
            out[a:b] = merged.reshape(-1)
    return out


# --- the kernels against it ---------------------------------------------------------------------


INTO = [  # where the child goes: a fresh buffer, a parent, or (task vectors) the base
    (*m, into)
    for m in METHODS
    for into in ("fresh", "a", "b", "base")
    if into != "base" or m[1]().needs_base
]


@pytest.mark.parametrize(
    ("name", "build", "exact", "into"), INTO, ids=[f"{m[0]}-{m[3]}" for m in INTO]
)
@pytest.mark.parametrize("split", [None, SPLIT])
def test_streaming_merge_matches_the_whole_tensor_reference(
    small_chunks, name, build, exact, into, split
):
    method = build()
    base, (a, b, tied) = _genomes()
    if method.needs_base:
        b = tied  # a task vector with ties at the top-k thresholds
    weights = [0.35, 0.65]
    expected = _reference(method, base, [a, b], weights, split, gen(3))
    base, a, b = base.clone(), a.clone(), b.clone()
    out = {"fresh": torch.empty(N), "a": a, "b": b, "base": base}[into]
    got = method.merge_(out, base, [a, b], weights, segments=SEGMENTS, split=split, rng=gen(3))
    assert got is out
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(got, expected, **tol)


@pytest.mark.parametrize(("name", "build", "exact"), METHODS, ids=[m[0] for m in METHODS])
def test_bfloat16_streaming_merge_matches_the_reference(small_chunks, name, build, exact):
    method = build()
    base, (a, _, tied) = _genomes(torch.bfloat16)
    weights = [0.35, 0.65]
    expected = _reference(method, base, [a, tied], weights, SPLIT, gen(4))
    out = torch.empty(N, dtype=torch.bfloat16)
    got = method.merge_(out, base, [a, tied], weights, segments=SEGMENTS, split=SPLIT, rng=gen(4))
    if exact:
        assert torch.equal(got, expected)
    else:  # a rounding of the angle or the L1 norm can move a bfloat16 result by one step
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
        assert (got != expected).float().mean() < 0.01


def test_three_models_and_count_consensus(small_chunks):
    base, parents = _genomes()
    ties = TaskArithmetic("magnitude", "count", density=0.3, normalize=True, lambda_=0.5)
    got = ties.merge_(torch.empty(N), base, parents, [0.2, 0.5, 0.9], segments=SEGMENTS)
    expected = _reference(ties, base, parents, [0.2, 0.5, 0.9], None, gen(0))
    assert torch.equal(got, expected)


@pytest.mark.parametrize(("name", "build", "exact"), METHODS, ids=[m[0] for m in METHODS])
def test_crossover_writes_the_child_into_a_parent(small_chunks, name, build, exact):
    base, (a, b, _) = _genomes()
    fresh, live = torch.empty(N), b.clone()
    cross = Crossover(build(), split=True)
    info = cross(fresh, a, b, gen(5), base, SEGMENTS)
    assert cross(live, a, live, gen(5), base, SEGMENTS) == info
    tol = {} if name == "slerp_genome" else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(live, fresh, **tol)  # slerp_ scales b in place first


@pytest.mark.parametrize("largest", [True, False])
def test_top_k_across_chunks_is_a_stable_sort(small_chunks, largest):
    """Ties at the threshold spread over many chunks: the first ones by index are kept."""
    v = torch.randint(0, 50, (40_000,), generator=gen(8)).float()  # ~800 copies of each value
    for k in (1, 7_777, 20_000, 39_999):
        expected = torch.zeros(v.numel(), dtype=torch.bool)
        expected[torch.sort(v, descending=largest, stable=True).indices[:k]] = True
        assert torch.equal(task_arithmetic.first_k_mask(v, k, largest), expected), k


# --- no genome-sized temporaries ----------------------------------------------------------------


def _peak_bytes(fn) -> int:
    """The most bytes of torch tensors held at once while ``fn`` runs (beyond those before)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.events() if e.self_cpu_memory_usage != 0]
    held = peak = 0
    for e in sorted(events, key=lambda e: e.time_range.start):
        held += e.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize(("name", "build", "exact"), METHODS, ids=[m[0] for m in METHODS])
def test_no_temporary_near_the_genome_size(small_chunks, name, build, exact):
    """A 256K-element genome of four 64K-element tensors, in 4K-element chunks: the
    whole-tensor merges held one to four genomes of temporaries; the kernels hold their chunk
    buffers, the selection's bracket (a few percent of a tensor) and the packed random masks
    (1/32 of the genome, outside torch's allocator)."""
    n = 1 << 18
    segments = [(i * n // 4, (i + 1) * n // 4, (256, 256)) for i in range(4)]
    g = gen(6)
    base, a, b = (torch.randn(n, generator=g) for _ in range(3))
    method = build()
    out = torch.empty(n)

    def merge():
        method.merge_(out, base, [a, b], [0.3, 0.7], segments=segments, split=n // 2, rng=gen(7))

    assert _peak_bytes(merge) < n * 4 // 4  # a quarter of the genome: one of its tensors


def test_traffic_floors_in_genomes():
    """Reads plus writes a merge of two genomes cannot avoid (what the benchmark divides by)."""
    floors = {name: build().traffic_floor(2) for name, build, _ in METHODS}
    assert floors == {
        "slerp_genome": 5,  # the dot products, then a, b -> out
        "slerp_tensor": 5,
        "linear": 3,
        "task_arithmetic": 4,  # base, a, b -> out
        "ties": 7,  # the top-k thresholds first
        "dare_linear": 7,  # the L1 norms of rescale first
        "dare_ties": 7,
        "dare_plain": 4,  # the masks need no data
        "breadcrumbs": 7,
        "breadcrumbs_ties": 7,
        "della": 7,
        "della_plain": 4,
    }


@pytest.mark.parametrize(
    "method, kernels",
    [
        (
            lambda: TaskArithmetic("magnitude", "sum", density=0.4, normalize=True),
            ("magnitude_sample", "magnitude_bands_f32", "magnitude_merge2"),
        ),
        (
            lambda: TaskArithmetic("magnitude_outliers", density=0.9, gamma=0.05),
            ("magnitude_sample", "magnitude_bands2_f32", "magnitude_merge2"),
        ),
        (
            lambda: TaskArithmetic("random", "sum", density=0.4, rescale=True, draws="counter"),
            ("random_sums", "random_merge2"),
        ),
    ],
    ids=["ties", "breadcrumbs", "dare_counter"],
)
def test_warm_up_runs_the_fused_loops_without_drawing_from_the_run(method, kernels, monkeypatch):
    """Crossover.warm_up runs (so compiles) every loop the method's fused path runs on a real
    genome, so that the first step does not, and leaves the global random state alone."""
    fused = pytest.importorskip("sparse_merge.merging._fused")
    calls = dict.fromkeys(kernels, 0)
    for name in kernels:
        watch(monkeypatch, fused, name, lambda _, name=name: calls.update({name: calls[name] + 1}))
    before = torch.get_rng_state()
    Crossover(method(), split=True).warm_up(torch.float32, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)
    assert all(calls.values()), calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "name", ["ties", "breadcrumbs", "dare_counter", "slerp", "ties_f32", "dare_f32", "slerp_f32"]
)
def test_after_the_warm_up_large_tensors_in_parts_compile_nothing(name, dtype, monkeypatch):
    """A tensor cut into parts on several threads (``kernels.in_parts``) runs the loops the
    warm-up compiled: no new type signature (array layout) for numba to compile mid-run."""
    fused = pytest.importorskip("sparse_merge.merging._fused")
    method = {
        "ties": lambda: TaskArithmetic("magnitude", "sum", density=0.4, normalize=True),
        "breadcrumbs": lambda: TaskArithmetic("magnitude_outliers", density=0.9, gamma=0.05),
        "dare_counter": lambda: TaskArithmetic(
            "random", "sum", density=0.4, rescale=True, draws="counter"
        ),
        "slerp": lambda: Slerp(granularity="genome"),
        # bfloat16 computed in float32 (``compute_dtype``): other loops, the same promise
        "ties_f32": lambda: TaskArithmetic(
            "magnitude", "sum", density=0.4, normalize=True, compute_dtype="float32"
        ),
        "dare_f32": lambda: TaskArithmetic(
            "random", "sum", density=0.4, rescale=True, compute_dtype="float32"
        ),
        "slerp_f32": lambda: Slerp(granularity="genome", compute_dtype="float32"),
    }[name]()
    crossover = Crossover(method, split=True)
    crossover.warm_up(dtype, torch.device("cpu"))
    dispatchers = [f for f in vars(fused).values() if hasattr(f, "signatures")]
    before = {f: len(f.signatures) for f in dispatchers}
    monkeypatch.setattr(merge_kernels, "PART_MIN", 2048)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        g = torch.Generator().manual_seed(0)
        a, b, base = (torch.randn(30_000, generator=g).to(dtype) for _ in range(3))
        rng = torch.Generator().manual_seed(1)
        method.merge_(torch.empty_like(a), base, [a, b], [0.3, 0.7], split=10_000, rng=rng)
    finally:
        torch.set_num_threads(threads)
    assert {f: len(f.signatures) for f in dispatchers} == before
