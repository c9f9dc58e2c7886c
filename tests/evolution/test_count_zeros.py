"""Exact zero counts of genome slices (``count_zeros``, ``slots_sparsity``): the host counter
on float bits agrees with torch's own comparisons on every float dtype, signed zeros, NaN,
infinities and subnormals included, across chunk boundaries and runs of slots."""

import pytest
import torch

from sparse_merge.evolution import problem as problem_module
from sparse_merge.evolution.problem import count_zeros, slot_runs, slots_sparsity
from sparse_merge.models.paramspace import Slot

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def awkward_values(dtype: torch.dtype, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` values of ``dtype``: Gaussian, a third of them +0.0 or -0.0, and NaN, +-inf,
    subnormals and values right at the thresholds the tests use."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, generator=g) * 0.05).to(dtype)
    w[torch.rand(n, generator=g) < 0.2] = 0.0
    w[torch.rand(n, generator=g) < 0.15] = -0.0
    tiny = torch.finfo(dtype).smallest_normal / 4  # a subnormal
    special = [float("nan"), float("inf"), -float("inf"), tiny, -tiny, 0.01, -0.01, 1e-3]
    idx = torch.randint(0, n, (64,), generator=g)
    w[idx] = torch.tensor(special * 8, dtype=torch.float64).to(dtype)
    return w


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("epsilon", [0.0, 1e-3, 0.01, 0.0123, 1e-45, float("inf")])
def test_count_matches_torch_comparisons(dtype, epsilon, monkeypatch):
    monkeypatch.setattr(problem_module, "_COUNT_CHUNK", 1000)  # many chunks, a ragged last one
    w = awkward_values(dtype, 10_007)
    expected = int((w == 0).sum()) if epsilon == 0 else int((w.abs() <= epsilon).sum())
    assert count_zeros(w, epsilon) == expected
    assert count_zeros(w[::3], epsilon) == (
        int((w[::3] == 0).sum()) if epsilon == 0 else int((w[::3].abs() <= epsilon).sum())
    )


def test_negative_zeros_count_as_zeros():
    w = torch.tensor([-0.0, 0.0, 1.0, -1.0, -0.0], dtype=torch.bfloat16)
    assert count_zeros(w) == 3
    assert count_zeros(torch.empty(0)) == 0


def test_non_float_tensors_are_counted_by_torch():
    assert count_zeros(torch.tensor([0, 3, 0, -1])) == 2


def test_contiguous_slots_are_counted_as_one_run():
    slots = [
        Slot("a", 0, torch.Size([4, 5])),
        Slot("b", 20, torch.Size([10])),
        Slot("c", 40, torch.Size([2, 5])),  # a gap before it
        Slot("d", 30, torch.Size([10])),  # listed out of order, contiguous with b and c
        Slot("e", 60, torch.Size([3])),
    ]
    assert slot_runs(slots) == [(0, 50), (60, 63)]


@pytest.mark.parametrize("epsilon", [0.0, 0.01])
def test_slots_sparsity_counts_only_the_slots(epsilon):
    genome = awkward_values(torch.bfloat16, 200, seed=1)
    slots = [
        Slot("a", 3, torch.Size([7, 5])),
        Slot("b", 38, torch.Size([40])),
        Slot("c", 120, torch.Size([10, 6])),
    ]
    inside = torch.cat([genome[s.offset : s.stop] for s in slots])
    expected = (inside == 0) if epsilon == 0 else (inside.abs() <= epsilon)
    assert slots_sparsity(genome, slots, epsilon) == int(expected.sum()) / inside.numel()
    assert slots_sparsity(genome, [], epsilon) == 0.0
