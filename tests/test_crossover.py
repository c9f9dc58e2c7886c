import math

import torch

from sparse_merge.evolution.crossover import slerp_


def test_slerp_endpoints_and_midpoint():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = torch.empty(2)
    assert torch.allclose(slerp_(out, a, b, 0.0), a)
    assert torch.allclose(slerp_(out, a, b, 1.0), b)
    h = math.sqrt(0.5)
    assert torch.allclose(slerp_(out, a, b, 0.5), torch.tensor([h, h]))  # stays on the unit circle


def test_split_point_uses_w_before_and_one_minus_w_after():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(10, generator=g), torch.randn(10, generator=g)
    out = slerp_(torch.empty(10), a, b, 0.0, split=4)
    assert torch.allclose(out[:4], a[:4]) and torch.allclose(out[4:], b[4:])
    out = slerp_(torch.empty(10), a, b, 1.0, split=4)
    assert torch.allclose(out[:4], b[:4]) and torch.allclose(out[4:], a[4:])


def test_slerp_in_place_into_a_parent_and_parallel_fallback():
    a = torch.tensor([1.0, 2.0, 3.0])
    b = 2 * a  # parallel: lerp
    expected = 0.75 * a + 0.25 * b
    assert torch.allclose(slerp_(a, a, b, 0.25), expected)
