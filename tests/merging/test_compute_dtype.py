"""``compute_dtype="float32"``: bfloat16 models merged with every op in float32 and the result
rounded once, mergekit's ``dtype: float32`` with a bfloat16 ``out_dtype``.

- For every method (task arithmetic, TIES, Model Breadcrumbs, DARE with torch's and counter
  draws, DELLA; with and without ``rescale``) the result is the default merge of the upcast
  float32 models, rounded to bfloat16, bit for bit, on the fused loops and on the torch path,
  with NaN, infinities and subnormals, on tensors of one element to past one chunk, segments,
  a split point and in place;
- no float32 copy of a tensor is made: the fused loops load bfloat16 themselves, the torch
  path upcasts chunk by chunk;
- float32 models are merged as before; ``genome`` SLERP (M2N2's crossover) likewise.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_merge.evolution import crossover
from sparse_merge.merging import kernels
from sparse_merge.merging.base import CHUNK, COMPUTE_DTYPES
from sparse_merge.merging.slerp import Slerp
from sparse_merge.merging.task_arithmetic import TaskArithmetic

from ..evolution.test_crossover_speed import _peak_bytes, small_chunks  # noqa: F401
from .fused_paths import GENOME, SEGMENTS, check, torch_path, watch
from .test_counter_draws import from_yaml, gen, models

needs_numba = pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba is not installed")

METHODS = {  # id: (yaml, overrides)
    "task_arithmetic": ("task_arithmetic", {}),
    "task_arithmetic_norm": ("task_arithmetic", {"normalize": True, "lambda_": 1.37}),
    "ties": ("ties", {}),
    "ties_count": ("ties", {"consensus": "count"}),
    "ties_rescale": ("ties", {"rescale": True}),
    "breadcrumbs": ("breadcrumbs", {}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {}),
    "dare_ties": ("dare_ties", {"draws": "torch"}),
    "dare_linear": ("dare_linear", {"draws": "torch"}),
    "dare_ties_counter": ("dare_ties", {}),
    "dare_rescale": ("dare_ties", {"draws": "torch", "rescale": True}),
    "dare_rescale_counter": ("dare_ties", {"rescale": True}),
    "della": ("della", {"draws": "torch"}),
}
SIZES = [1, 17, 1000, 5003]
WEIGHTS = [(0.6, 0.4), (1.3, -0.45)]


def method(name: str, compute_dtype: str = "float32") -> TaskArithmetic:
    yaml, overrides = METHODS[name]
    return from_yaml(yaml, **overrides, compute_dtype=compute_dtype)


def merged(m, inputs, weights, into: str = "third", rng_seed: int = 0, **kwargs) -> torch.Tensor:
    """``m.merge_`` of (base, x0, x1) clones into a new buffer or into one of them."""
    base, x0, x1 = (t.clone() for t in inputs)
    out = {"third": torch.empty_like(base), "base": base, "x0": x0, "x1": x1}[into]
    result = m.merge_(out, base, [x0, x1], weights, rng=gen(rng_seed), **kwargs)
    assert result is out
    return result


def reference(name, inputs, weights, **kwargs) -> torch.Tensor:
    """The default merge of the models upcast to float32, rounded to bfloat16."""
    up = [t.float() for t in inputs]
    return merged(method(name, "input"), up, weights, **kwargs).to(torch.bfloat16)


@needs_numba
@pytest.mark.parametrize("kind", ["specials", "clean", "subnormal"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", list(METHODS))
def test_float32_compute_is_the_float32_merge_rounded_once(name, n, kind):
    inputs = models(n, torch.bfloat16, 7 * n + len(name), kind)
    for weights in WEIGHTS:
        expected = reference(name, inputs, weights)
        check(merged(method(name), inputs, weights), expected, f"{name} fused {weights}")
        with torch_path():
            check(merged(method(name), inputs, weights), expected, f"{name} torch {weights}")


@needs_numba
@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties", "dare_ties", "dare_rescale"])
def test_float32_compute_past_one_chunk(name):
    n = CHUNK + 4099  # two chunks; DARE's norms then sum in float64, fused
    inputs = models(n, torch.bfloat16, 3, "clean")
    expected = reference(name, inputs, (0.7, 0.5))
    check(merged(method(name), inputs, (0.7, 0.5)), expected, name)


@needs_numba
@pytest.mark.parametrize("into", ["base", "x0", "x1"])
@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "dare_ties", "della"])
def test_float32_compute_on_segments_with_a_split_in_place(name, into):
    inputs = models(GENOME, torch.bfloat16, 11, "specials")
    kwargs = {"segments": SEGMENTS, "split": 2000}
    expected = reference(name, inputs, (0.3, 0.9), **kwargs)
    got = merged(method(name), inputs, (0.3, 0.9), into=into, **kwargs)
    check(got, expected, f"{name} into {into}")


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch path"])
@pytest.mark.parametrize("name", list(METHODS))
def test_no_float32_copy_of_a_tensor(name, fused):
    """The float32 arithmetic reads bfloat16 where it is: the fused loops load it, the torch
    path upcasts chunk by chunk (4K entries here). A 256K-entry genome of four 64K-entry
    tensors holds less than a quarter of a float32 genome at once; a float32 copy of one
    tensor is that much."""
    n = 1 << 18
    segments = [(i * n // 4, (i + 1) * n // 4, (256, 256)) for i in range(4)]
    base, a, b = models(n, torch.bfloat16, 4, "clean")
    out, m = torch.empty_like(base), method(name)

    def merge():
        m.merge_(out, base, [a, b], [0.3, 0.7], segments=segments, split=n // 2, rng=gen(7))

    with contextlib.nullcontext() if fused else torch_path():
        merge()  # compiled first
        assert _peak_bytes(merge) < n * 4 // 4


@needs_numba
@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_ties", "della"])
def test_float32_models_are_merged_as_before(name):
    inputs = models(1000, torch.float32, 9, "specials")
    expected = merged(method(name, "input"), inputs, (0.6, 0.4))
    check(merged(method(name), inputs, (0.6, 0.4)), expected, name)


def test_bfloat16_in_float32_differs_from_bfloat16_arithmetic():
    """The setting changes the arithmetic (the test above would pass if it did nothing)."""
    inputs = models(5003, torch.bfloat16, 1, "clean")
    ours = merged(method("ties"), inputs, (0.6, 0.4))
    default = merged(method("ties", "input"), inputs, (0.6, 0.4))
    assert not torch.equal(ours, default)
    exact = reference("ties", inputs, (0.6, 0.4)).float()
    assert (ours.float() - exact).abs().sum() < (default.float() - exact).abs().sum()


@needs_numba
@pytest.mark.parametrize("into", ["third", "x0", "x1"])
@pytest.mark.parametrize("split", [None, 0, 2000, GENOME])
def test_genome_slerp_in_float32_is_the_float32_slerp_rounded_once(split, into, monkeypatch):
    """With the same angle: on the CPU bfloat16 genomes take their dots from one fused pass
    (``kernels.dots3``), the torch path from ``_dots``."""
    _, *inputs = models(GENOME, torch.bfloat16, 13, "specials", 3)  # x0, x1 and one more
    inputs = [t.nan_to_num(0.0, 1e3, -1e3) for t in inputs]  # a NaN would void the angle

    def run(m, xs):
        x0, x1, other = (t.clone() for t in xs)
        out = {"third": other, "x0": x0, "x1": x1}[into]
        return m.merge_(out, None, [x0, x1], (0.35, 0.65), split=split)

    ours, upcast = Slerp("genome", compute_dtype="float32"), [t.float() for t in inputs]
    with torch_path():
        check(run(ours, inputs), run(Slerp("genome"), upcast).to(torch.bfloat16), "torch path")
    fused = run(ours, inputs)
    dots = kernels.dots3(*inputs[:2])
    monkeypatch.setattr(crossover, "_dots", lambda a, b: dots)
    check(fused, run(Slerp("genome"), upcast).to(torch.bfloat16), "fused")
    monkeypatch.undo()
    assert not torch.equal(run(Slerp("genome"), inputs), fused)  # the setting changes the result


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_dots_are_the_exact_dots_to_float32_rounding(dtype, monkeypatch):
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(50_001, generator=g).to(dtype) for _ in range(2))
    exact = [float(x.double() @ y.double()) for x, y in ((a, b), (a, a), (b, b))]
    got = kernels.dots3(a, b)
    assert got == pytest.approx(exact, rel=1e-6, abs=1e-3)
    one = kernels.dots3(a, b)
    monkeypatch.setattr(kernels, "PART_MIN", 1000)  # in parts on three threads: the same bits
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert kernels.part_count(a.numel()) == 3 and kernels.dots3(a, b) == one
    finally:
        torch.set_num_threads(threads)


def _dots_in_their_order(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """``kernels.dots3``'s order in NumPy: per block of ``DOT_BLOCK`` entries, 64 float32
    lanes summed in index order, the lanes in float64 as four vectors of 16 added pairwise
    and then halved down to one, the block's last entries added after; blocks in order."""
    x, y = a.float().numpy(), b.float().numpy()
    lanes, vectors = 64, 4
    dots = []
    for p, q in ((x, y), (x, x), (y, y)):
        products, total = p * q, 0.0  # float32 products
        for start in range(0, products.size, kernels.DOT_BLOCK):
            block = products[start : start + kernels.DOT_BLOCK]
            whole = block.size // lanes * lanes
            sums = np.zeros(lanes, np.float32)
            if whole:  # cumsum adds in index order, rounding each sum to float32
                sums = np.cumsum(block[:whole].reshape(-1, lanes), axis=0, dtype=np.float32)[-1]
            wide = sums.astype(np.float64).reshape(vectors, -1)
            v = (wide[0] + wide[1]) + (wide[2] + wide[3])
            while v.size > 1:
                v = v[: v.size // 2] + v[v.size // 2 :]
            block_sum = float(v[0])
            for product in block[whole:]:
                block_sum += float(product)
            total += block_sum
        dots.append(total)
    return tuple(dots)


def _dots_inputs(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Two vectors whose magnitudes span six decades, so that any other order of the sums
    gives other bits."""
    g = torch.Generator().manual_seed(n)
    a, b = (torch.randn(n, generator=g) * torch.rand(n, generator=g).mul(14).exp() for _ in "ab")
    return a.to(dtype), b.to(dtype)


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [63, 64, 5000, 3 * 4096 + 100])
def test_fused_dots_add_in_one_order(dtype, n, monkeypatch):
    """The fused dots have one order of additions, which fixes their bits on every CPU (a
    reduction left to the compiler follows the CPU's vector width) and however the pass is
    cut into threads."""
    a, b = _dots_inputs(n, dtype)
    expected = _dots_in_their_order(a, b)
    assert kernels.dots3(a, b) == expected
    monkeypatch.setattr(kernels, "PART_MIN", 1000)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert kernels.dots3(a, b) == expected
    finally:
        torch.set_num_threads(threads)


@needs_numba
def test_fused_dots_are_the_same_bits_when_compiled_for_narrower_vectors(tmp_path):
    """Compiled for a baseline x86-64 CPU (SSE2: four float32 lanes a vector, as ARM's NEON)
    the fused dots give the AVX-512 build's bits: with the compiler free to reorder the sums,
    |a|^2 of 16 M bfloat16 entries had differed in its 7th digit."""
    code = (
        "import torch; from sparse_merge.merging import kernels; "
        "from tests.merging.test_compute_dtype import _dots_inputs; "
        "print(repr(kernels.dots3(*_dots_inputs(100_003, torch.bfloat16))))"
    )
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(tmp_path)}
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    here = kernels.dots3(*_dots_inputs(100_003, torch.bfloat16))
    assert done.stdout.strip() == repr(here)


@needs_numba
@pytest.mark.parametrize("compute_dtype", COMPUTE_DTYPES)
@pytest.mark.parametrize("split", [None, 2000])
def test_bfloat16_tensor_slerp_takes_the_fused_dots(compute_dtype, split, monkeypatch):
    """mergekit's SLERP already computes in float32, so both modes are one merge; on the CPU
    the angle's dots of bfloat16 tensors come from one fused pass (``kernels.dots3``, per
    tensor)."""
    _, *inputs = models(GENOME, torch.bfloat16, 17, "clean", 2)

    def run(m, xs):
        x0, x1 = (t.clone() for t in xs)
        out = torch.empty_like(x0)
        return m.merge_(out, None, [x0, x1], (0.35, 0.65), segments=SEGMENTS, split=split)

    ours, upcast = Slerp(compute_dtype=compute_dtype), [t.float() for t in inputs]
    with torch_path():
        check(run(ours, inputs), run(Slerp(), upcast).to(torch.bfloat16), "torch path")
    calls = []
    watch(monkeypatch, kernels, "dots3", calls.append)
    fused = run(ours, inputs)
    assert len(calls) == 8 + (split is not None)  # one per piece: the segments, the gaps
    monkeypatch.setattr(crossover, "_dots", kernels.dots3)
    check(fused, run(Slerp(), upcast).to(torch.bfloat16), "fused")


@needs_numba
@pytest.mark.parametrize("compute_dtype", COMPUTE_DTYPES)
def test_bfloat16_genome_slerp_takes_the_fused_dots(compute_dtype, monkeypatch):
    """The crossover's angle on bfloat16 genomes, in either mode: one fused pass on the CPU,
    whose dots are the exact ones to float32 rounding."""
    _, *inputs = models(GENOME, torch.bfloat16, 19, "clean", 2)
    calls = []
    watch(monkeypatch, kernels, "dots3", calls.append)
    x0, x1 = inputs
    Slerp("genome", compute_dtype=compute_dtype).merge_(
        torch.empty_like(x0), None, [x0, x1], (0.35, 0.65), split=GENOME // 3
    )
    exact = [float(x.double() @ y.double()) for x, y in ((x0, x1), (x0, x0), (x1, x1))]
    assert len(calls) == 1 and calls[0] == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize(
    "name", ["task_arithmetic", "ties", "breadcrumbs_ties", "dare_ties", "della"]
)
def test_three_models_in_float32(name):
    """Three models take the torch path: chunk by chunk in float32, the same bits."""
    base, *xs = models(5003, torch.bfloat16, 21, "specials", 3)
    weights = (0.5, 0.3, -0.2)

    def run(m, inputs):
        b, *ys = (t.clone() for t in inputs)
        return m.merge_(torch.empty_like(b), b, ys, weights, rng=gen(2), split=1234)

    expected = run(method(name, "input"), [t.float() for t in (base, *xs)]).to(torch.bfloat16)
    check(run(method(name), (base, *xs)), expected, name)
