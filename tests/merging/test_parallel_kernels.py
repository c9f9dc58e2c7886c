"""Large tensors run through the fused kernels in parts on several threads
(``kernels.in_parts``): the same bits however the tensor is cut, for every kernel that is cut
(linear, both SLERPs, task arithmetic, TIES and Model Breadcrumbs with ties at their cuts, DARE
with counter draws and with torch's, DELLA), and an error in any part reaches the caller."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from sparse_merge.evolution.crossover import slerp_
from sparse_merge.merging import kernels
from sparse_merge.merging.linear import Linear
from sparse_merge.merging.slerp import Slerp
from sparse_merge.merging.task_arithmetic import TaskArithmetic

from .fused_paths import DTYPES, both_paths, differences, same_bits
from .test_magnitude_kernels import models

pytestmark = pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba is not installed")

N = 9001  # three parts of ~3000 entries with PART_MIN 1000, cut at multiples of ALIGN
TIES = dict(sparsification="magnitude", consensus="sum", density=0.5, normalize=True)
METHODS = {
    "linear": lambda: Linear(),
    "slerp": lambda: Slerp(),
    "task_arithmetic": lambda: TaskArithmetic(lambda_=0.7),
    "ties": lambda: TaskArithmetic(**TIES),
    "breadcrumbs": lambda: TaskArithmetic(
        sparsification="magnitude_outliers", density=0.6, gamma=0.1
    ),
    "dare_ties": lambda: TaskArithmetic(
        sparsification="random", consensus="sum", density=0.6, rescale=True, draws="counter"
    ),
    "dare_ties_torch_draws": lambda: TaskArithmetic(
        sparsification="random", consensus="sum", density=0.6, rescale=True
    ),
    "della": lambda: TaskArithmetic(sparsification="rank_magnitude", density=0.6, rescale=True),
}


@pytest.fixture
def threads3():
    """Three threads for the test (the kernels cut a tensor in at most that many parts)."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def cut_and_whole(monkeypatch, run):
    """``run()`` with tensors cut into parts of at least 1000 entries, then in one part."""
    monkeypatch.setattr(kernels, "PART_MIN", 1000)
    cut = run()
    monkeypatch.setattr(kernels, "PART_MIN", 1 << 40)
    return cut, run()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["gauss", "grid"])
@pytest.mark.parametrize("name", list(METHODS))
def test_parts_give_the_bits_of_one_part(name, kind, dtype, monkeypatch, threads3):
    def run():
        base, x0, x1 = models(N, dtype, 5, kind)
        out = torch.empty_like(base)
        method = METHODS[name]()
        return method.merge_(
            out,
            base if method.needs_base else None,
            [x0, x1],
            [0.3, 0.7],
            split=N // 3,
            rng=torch.Generator().manual_seed(2),
        )

    cut, whole = cut_and_whole(monkeypatch, run)
    assert same_bits(cut, whole), f"{name}: {differences(cut, whole)}"
    fused, expected = both_paths(run)  # and one part is the torch path, bit for bit
    assert same_bits(fused, expected), f"{name}: {differences(fused, expected)}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_genome_slerp_in_parts(dtype, monkeypatch, threads3):
    def run():
        _, a, b = models(N, dtype, 6, "gauss")
        return slerp_(torch.empty_like(a), a, b, 0.3, split=N // 2)

    cut, whole = cut_and_whole(monkeypatch, run)
    assert same_bits(cut, whole), differences(cut, whole)


def test_parts_cover_the_range_once_on_their_own_threads(monkeypatch, threads3):
    monkeypatch.setattr(kernels, "PART_MIN", 1000)
    seen: list[tuple[int, int, int]] = []
    lock = threading.Lock()

    def run(lo: int, hi: int) -> None:
        with lock:
            seen.append((lo, hi, threading.get_ident()))

    kernels.in_parts(N, run)
    seen.sort()
    assert [(lo, hi) for lo, hi, _ in seen] == [(0, 2944), (2944, 5952), (5952, N)]
    assert all(lo % kernels.ALIGN == 0 for lo, _, _ in seen)
    caller = threading.get_ident()  # runs the first part; the others run on threads of their own
    assert [ident == caller for *_, ident in seen] == [True, False, False]

    seen.clear()
    kernels.in_parts(2999, run)  # fewer than PART_MIN entries per thread: fewer parts
    seen.sort()
    assert [(lo, hi) for lo, hi, _ in seen] == [(0, 1472), (1472, 2999)]
    seen.clear()
    kernels.in_parts(999, run)
    assert [(lo, hi) for lo, hi, _ in seen] == [(0, 999)]


def test_an_error_in_any_part_is_raised_after_all_finish(monkeypatch, threads3):
    monkeypatch.setattr(kernels, "PART_MIN", 1000)
    finished = []

    def run(lo: int, hi: int) -> None:
        if lo > 0 and hi == N:
            raise ValueError(f"part [{lo}, {hi})")
        finished.append(lo)

    with pytest.raises(ValueError, match=r"part \[5952, 9001\)"):
        kernels.in_parts(N, run)
    assert sorted(finished) == [0, 2944]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cuts", [1, 2])
def test_selection_in_parts_finds_the_bands_of_one_pass(dtype, cuts, monkeypatch, threads3):
    """The selection pass in parts: the same counts below, bands (joined in index order) and
    block marks as in one part, for one or two cuts per model; a band too large for a part's
    room is given up."""
    base, x0, x1 = models(N, dtype, 7, "grid")  # four magnitudes: wide bands, ties
    keys = [np.sort(kernels.magnitude_sample(base, x0, x1, 1)[m]) for m in (0, 1)]
    brackets = {
        (m, c): (int(keys[m][q]), int(keys[m][q + N // 20]))
        for m in (0, 1)
        for c, q in enumerate([N // 3, N // 2][:cuts])
    }

    def bands(room: int) -> dict:
        buffer = np.zeros(kernels.bands_shape(N, room), np.int32)
        return {
            key: None if found is None else (found[0], found[1].copy(), found[2].copy())
            for key, found in kernels.magnitude_bands(base, x0, x1, brackets, buffer).items()
        }

    cut, whole = cut_and_whole(monkeypatch, lambda: bands(N))
    assert cut.keys() == whole.keys() == brackets.keys()
    for key in brackets:
        assert cut[key][0] == whole[key][0]
        assert np.array_equal(cut[key][1], whole[key][1])
        assert np.array_equal(cut[key][2], whole[key][2])
        assert len(cut[key][1]) > N // 20  # the grid's ties make the bands wide

    monkeypatch.setattr(kernels, "PART_MIN", 1000)
    assert all(found is None for found in bands(N // 100).values())  # more than a part's room


@pytest.mark.parametrize("threads", [1, 2, 3, 64])
def test_the_band_buffer_holds_at_most_twice_the_cap_however_many_threads(threads, monkeypatch):
    """Several parts share twice the cap between them (never more than a part's entries), so
    a 7B model's embedding on many threads does not reserve a band buffer per thread."""
    monkeypatch.setattr(kernels, "PART_MIN", 1000)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows, columns = kernels.bands_shape(N, N // 8)
        parts = kernels.part_count(N)
        assert rows == 4 and parts == min(threads, N // 1000)
        assert columns - 1 <= (N // 8 if parts == 1 else 2 * (N // 8)) + parts * kernels.BLOCK
        assert kernels.bands_shape(N, N)[1] - 1 <= N + parts * 2 * kernels.BLOCK  # entries
    finally:
        torch.set_num_threads(before)
