import pytest
import torch

from sparse_merge.models.blocks import prunable_layers
from sparse_merge.pruning.base import keep_smallest_out
from sparse_merge.pruning.magnitude import MagnitudePruner
from sparse_merge.pruning.sparsity import measure_sparsity


def test_keep_smallest_out_is_exact_with_ties():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 1.0, 2.0, 1.0]])
    keep = keep_smallest_out(scores, 2)
    assert keep.tolist() == [[False, False, True, True], [True, False, True, False]]


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_layer_sparsity_is_exact(tiny_llama, sparsity):
    masks = MagnitudePruner().prune(tiny_llama, None, sparsity)
    for layer in prunable_layers(tiny_llama):
        w = layer.module.weight
        assert int((w == 0).sum()) == round(sparsity * w.numel())
        assert torch.equal(masks[layer.param_name], w != 0) or sparsity == 0.0
    report = measure_sparsity(tiny_llama)
    assert abs(report.overall - sparsity) < 1e-3


def test_magnitude_prunes_the_smallest_per_row(tiny_llama):
    layer = prunable_layers(tiny_llama)[0]
    before = layer.module.weight.detach().clone()
    MagnitudePruner("row").prune(tiny_llama, None, 0.5)
    w = layer.module.weight
    assert ((w == 0).sum(1) == before.shape[1] // 2).all()
    kept_min = before.abs().masked_fill(w == 0, float("inf")).min(1).values
    pruned_max = before.abs().masked_fill(w != 0, -1).max(1).values
    assert (pruned_max <= kept_min).all()


def test_embeddings_norms_and_head_are_not_prunable(tiny_llama):
    names = {layer.name for layer in prunable_layers(tiny_llama)}
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per block
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in names)
