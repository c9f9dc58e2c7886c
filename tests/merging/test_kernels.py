"""The fused CPU kernels (``merging.kernels``) give what the torch ops they replace give, bit
for bit: linear and per-tensor SLERP (``weighted_sum_``), the genome SLERP of the crossover
(``slerp_``) and plain task arithmetic, in float32 and bfloat16, in place and not, with signed
zeros, NaN, infinities and subnormals in the inputs."""

import pytest
import torch

from sparse_merge.evolution import crossover
from sparse_merge.evolution.crossover import slerp_
from sparse_merge.merging import kernels
from sparse_merge.merging.base import weighted_sum_
from sparse_merge.merging.task_arithmetic import TaskArithmetic

from . import fused_paths
from .fused_paths import same_bits

pytestmark = pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba is not installed")

N = 3 * 4099  # not a multiple of any vector width


def awkward(dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Gaussian values of ``dtype`` with +-0.0, NaN, +-inf, subnormals and huge values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, generator=g)
    x[torch.rand(N, generator=g) < 0.05] = 0.0
    x[torch.rand(N, generator=g) < 0.05] = -0.0
    tiny = torch.finfo(dtype).smallest_normal
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), tiny / 3, -tiny / 7, 3e38])
    x[torch.randint(0, N, (60,), generator=g)] = special.repeat(10)
    return x.to(dtype)


def torch_path(fn, *args, **kwargs):
    """``fn`` with the fused kernels switched off."""
    with fused_paths.torch_path():
        return fn(*args, **kwargs)


DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),  # bfloat16 models into a float32 buffer
    (torch.float32, torch.bfloat16),
]


@pytest.mark.parametrize("dtype,out_dtype", DTYPE_PAIRS, ids=str)
@pytest.mark.parametrize("divisor", [None, 1.0, 0.37])
@pytest.mark.parametrize("coeffs", [(0.3, 0.7), (1.7, -0.25)])
def test_weighted_sum_of_two_matches_the_torch_ops(dtype, out_dtype, divisor, coeffs):
    x0, x1 = awkward(dtype, 0), awkward(dtype, 1)
    expected = torch_path(weighted_sum_, torch.empty(N, dtype=out_dtype), [x0, x1], coeffs, divisor)
    fused = weighted_sum_(torch.empty(N, dtype=out_dtype), [x0, x1], coeffs, divisor)
    assert same_bits(fused, expected)


def torch_tails(lengths: list[int]) -> torch.Tensor:
    """Bool mask of the elements torch's scalar loop computes in one call per piece of
    ``lengths`` (one thread): the last ``len % 32`` of each."""
    tails = []
    for n in lengths:
        t = torch.zeros(n, dtype=torch.bool)
        t[n - n % 32 :] = True
        tails.append(t)
    return torch.cat(tails)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("into", ["third", "a", "b"])
@pytest.mark.parametrize("split", [None, N // 3])
def test_genome_slerp_matches_the_torch_ops(dtype, into, split, monkeypatch):
    a, b = awkward(dtype, 2), awkward(dtype, 3)
    a[~torch.isfinite(a) | (a.abs() > 1e30)] = 1.0  # a finite angle: no NaN coefficients
    b[~torch.isfinite(b) | (b.abs() > 1e30)] = -2.0

    def run(fn):
        x, y = a.clone(), b.clone()
        x[:50] = y[:50] = float("nan")  # NaN in the interpolation only
        out = {"third": torch.empty_like(x), "a": x, "b": y}[into]
        return fn(out, x, y, 0.35, split)

    dots = crossover._dots  # one angle for both paths, from the finite entries
    monkeypatch.setattr(crossover, "angle_dots", lambda x, y: dots(x[50:], y[50:]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's bfloat16 result depends on how threads cut the op
    try:
        expected, fused = torch_path(run, slerp_), run(slerp_)
    finally:
        torch.set_num_threads(threads)
    if dtype == torch.bfloat16:  # torch's scalar tails round the product first
        tails = torch_tails([N] if split is None else [split, N - split])
        expected, fused = expected[~tails], fused[~tails]
    assert same_bits(fused, expected)


def test_bfloat16_interpolation_is_the_vectorised_arithmetic_everywhere():
    x0, x1 = awkward(torch.bfloat16, 7), awkward(torch.bfloat16, 8)
    c0, c1 = 0.7312345678, 0.4123456789
    first = (x0.float() * torch.tensor(c0, dtype=torch.float32)).bfloat16()
    alpha = float(torch.tensor(c1, dtype=torch.bfloat16))
    expected = (first.float() + x1.float() * alpha).bfloat16()  # the product is exact in float32
    out = torch.empty_like(x0)
    assert same_bits(kernels.lerp_chain_(out, x0, x1, c0, c1), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "normalize,lambda_", [(False, 1.0), (True, 1.0), (True, 0.9), (False, 1.3)]
)
@pytest.mark.parametrize("into", ["third", "base", "x0"])
@pytest.mark.parametrize("weights", [(0.3, 0.9), (0.25, 0.75)])  # the second sums to 1
def test_task_arithmetic_of_two_matches_the_torch_ops(dtype, normalize, lambda_, into, weights):
    method = TaskArithmetic(normalize=normalize, lambda_=lambda_)

    def run():
        base, x0, x1 = awkward(dtype, 4), awkward(dtype, 5), awkward(dtype, 6)
        out = {"third": torch.empty_like(base), "base": base, "x0": x0}[into]
        return method.merge_into_(out, base, [x0, x1], list(weights))

    assert same_bits(run(), torch_path(run))


def test_other_inputs_take_the_torch_path():
    x = torch.zeros(8)
    assert kernels.usable(x, x.bfloat16())
    assert not kernels.usable(x, x.double())
    assert not kernels.usable(x, torch.zeros(8, 2)[:, 0])  # not contiguous
    assert not kernels.usable(x.half())
