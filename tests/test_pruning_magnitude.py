import copy
import weakref

import pytest
import torch

from sparse_merge.models.blocks import prunable_layers
from sparse_merge.pruning.base import keep_smallest_out
from sparse_merge.pruning.importance import MagnitudeImportance, RandomImportance
from sparse_merge.pruning.magnitude import MagnitudePruner
from sparse_merge.pruning.scored import ScorePruner
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


class _EveryLayerFirst:
    """An importance's ``compute`` alone: the pruner scores every layer before masking any."""

    def __init__(self, importance) -> None:
        self.importance, self.name = importance, importance.name

    def compute(self, model, calib, layers=None):
        return self.importance.compute(model, calib, layers)


@pytest.mark.parametrize("importance", [MagnitudeImportance(), RandomImportance(seed=3)])
@pytest.mark.parametrize(
    "granularity, nm",
    [("layer", None), ("row", None), ("channel", None), ("head", None), ("layer", "2:4")],
)
def test_scoring_layer_by_layer_prunes_as_scoring_every_layer_first(
    tiny_llama, importance, granularity, nm
):
    other = copy.deepcopy(tiny_llama)
    sparsity = 0.5 if nm else 0.4
    masks = ScorePruner(importance, granularity, nm).prune(tiny_llama, None, sparsity)
    ref = ScorePruner(_EveryLayerFirst(importance), granularity, nm).prune(other, None, sparsity)
    assert masks.keys() == ref.keys()
    assert all(torch.equal(masks[k], ref[k]) for k in masks)
    assert all(torch.equal(p, q) for p, q in zip(tiny_llama.parameters(), other.parameters()))
    assert sum(int((~m).sum()) for m in masks.values()) > 0


def test_a_score_pruner_holds_one_layers_scores_at_a_time(tiny_llama):
    alive = []  # weak references to the scores handed out so far

    class Watched(MagnitudeImportance):
        def each(self, model, calib, layers):
            for scores in super().each(model, calib, layers):
                assert all(ref() is None for ref in alive), "earlier scores still held"
                alive.append(weakref.ref(scores))
                yield scores
                del scores

    ScorePruner(Watched(), "row").prune(tiny_llama, None, 0.5)
    assert len(alive) == len(prunable_layers(tiny_llama))
