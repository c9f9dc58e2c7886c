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


def test_the_child_does_not_depend_on_the_thread_count():
    """The angle's float32 dots run on one thread: MKL splits a dot between its threads, and
    the same dot on 1 and 2 threads differs in its last bits from ~10 K entries on."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300_000, generator=g), torch.randn(300_000, generator=g)
    threads = torch.get_num_threads()
    children = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            children.append(slerp_(torch.empty_like(a), a, b, 0.3, 100_000))
            assert torch.get_num_threads() == n  # the caller's count comes back
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(children[0], child) for child in children[1:])
