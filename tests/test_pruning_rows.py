"""Per-row magnitude and Wanda pruning in one pass over the weight (``kernels.prune_rows_``):
the mask of the scores' stable sort and the weights of ``mul_`` by it, bit for bit."""

import copy

import pytest
import torch

from sparse_merge.merging import kernels
from sparse_merge.models.blocks import prunable_layers
from sparse_merge.pruning.base import keep_smallest_out
from sparse_merge.pruning.magnitude import MagnitudePruner
from sparse_merge.pruning.masking import row_mask
from sparse_merge.pruning.wanda import ReferenceWanda, wanda_scores

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS[t.dtype])


def _weight(rows: int, n: int, dtype: torch.dtype, zeros: float, g: torch.Generator):
    """Random rows with a fraction ``zeros`` of (signed) zeros, an all-zero row and a row of
    one repeated value: ties at the cut of every kind."""
    w = torch.randn(rows, n, generator=g)
    w *= torch.rand(rows, n, generator=g) >= zeros
    w[0] = 0.0
    w[1, ::2] = -0.0
    w[2] = -0.75
    return w.to(dtype)


def _reference(w: torch.Tensor, k: int, scale: torch.Tensor | None):
    """The path of every other pruner: float32 scores, their stable sort's mask, ``mul_``."""
    scores = w.abs().float() if scale is None else wanda_scores(w, scale)
    keep = keep_smallest_out(scores, k)
    return keep, w.clone().mul_(keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zeros", [0.0, 0.3, 0.6])
@pytest.mark.parametrize("scaled", [False, True])
def test_rows_pruned_in_one_pass_equal_a_stable_sorts_mask_multiplied_in(dtype, zeros, scaled):
    g = torch.Generator().manual_seed(0)
    for rows, n in [(7, 13), (40, 96), (9, 700)]:
        w = _weight(rows, n, dtype, zeros, g)
        scale = None
        if scaled:  # Wanda's input norms, one of them zero (an input never seen)
            scale = torch.rand(n, generator=g) + 0.5
            scale[3] = 0.0
        for k in sorted({1, n // 4, n // 2, n // 2 + 1, 3 * n // 4, n - 1}):
            keep, expected = _reference(w, k, scale)
            pruned = w.clone()
            assert torch.equal(kernels.prune_rows_(pruned, k, scale, True), keep), (n, k)
            assert torch.equal(_bits(pruned), _bits(expected)), (n, k)
            again = w.clone()
            assert kernels.prune_rows_(again, k, scale, False) is None
            assert torch.equal(_bits(again), _bits(expected)), (n, k)


def test_rows_pruned_in_blocks_and_threads_equal_one_block(monkeypatch):
    """Many blocks of rows per part, and parts on two threads: the same mask and weights."""
    g = torch.Generator().manual_seed(1)
    w = _weight(2048, 1100, torch.float32, 0.4, g)
    keep, expected = _reference(w, 550, None)
    monkeypatch.setattr(kernels, "ROW_BLOCK", 3000)  # 2 rows a block
    monkeypatch.setattr(kernels, "PART_MIN", 1 << 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert kernels.part_count(w.numel()) == 2
        pruned = w.clone()
        assert torch.equal(kernels.prune_rows_(pruned, 550, None, True), keep)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(_bits(pruned), _bits(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_magnitude_and_reference_wanda_per_row_prune_as_their_scores_do(
    tiny_llama, dtype, sparsity, monkeypatch
):
    """The pruners take the one-pass path on every layer of a CPU model, and prune exactly
    as masking their scores per row (``row_mask``) and multiplying it in does, once dense
    and once already pruned."""
    model = tiny_llama.to(dtype)
    layers = prunable_layers(model)
    g = torch.Generator().manual_seed(2)
    norms = {layer.name: torch.rand(layer.weight.shape[1], generator=g) for layer in layers}
    norms[layers[0].name].zero_()  # never seen: scored by |W|, as ``wanda_scores`` scores
    calls = []
    one_pass = kernels.prune_rows_
    monkeypatch.setattr(kernels, "prune_rows_", lambda *a: calls.append(1) or one_pass(*a))
    for pruner, scale in [
        (MagnitudePruner("row"), lambda layer: None),
        (ReferenceWanda(norms), lambda layer: norms[layer.name]),
    ]:
        pruned, expected = copy.deepcopy(model), copy.deepcopy(model)
        for target in (0.2, sparsity):  # dense, then a pruned genome (its zeros tie)
            calls.clear()
            masks = pruner.prune(pruned, None, target)
            assert len(calls) == len(layers)
            for layer in prunable_layers(expected):
                w = layer.weight
                s = w.abs().float() if scale(layer) is None else wanda_scores(w, scale(layer))
                keep = row_mask(s, target)
                with torch.no_grad():
                    w.mul_(keep)
                assert torch.equal(masks[layer.param_name], keep), (layer.name, target)
            for p, q in zip(pruned.parameters(), expected.parameters()):
                assert torch.equal(_bits(p.detach()), _bits(q.detach()))
