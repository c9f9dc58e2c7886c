import pytest
import torch

from sparse_merge.errors import ConfigError
from sparse_merge.models.blocks import prunable_layers
from sparse_merge.pruning.base import Calibration
from sparse_merge.pruning.magnitude import MagnitudePruner
from sparse_merge.pruning.masking import row_mask
from sparse_merge.pruning.wanda import WandaPruner


def make_calib(vocab: int, n: int = 6, t: int = 12, seed: int = 0) -> Calibration:
    """Random token sequences, the last two right-padded (padding must be ignored)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, t), generator=g)
    attn = torch.ones(n, t, dtype=torch.long)
    attn[-1, t // 2 :] = 0
    attn[-2, t - 3 :] = 0
    ids[attn == 0] = 0
    return Calibration(ids, attn)


def make_uneven(model) -> None:
    """Make a few input features of every block far larger than the rest (outlier features)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name and p.dim() == 1:
                p[:4] *= 20.0


@pytest.fixture
def uneven_llama(tiny_llama):
    make_uneven(tiny_llama)
    return tiny_llama


def test_wanda_and_magnitude_masks_differ_on_uneven_activations(uneven_llama, tokenizer):
    import copy

    calib = make_calib(len(tokenizer))
    other = copy.deepcopy(uneven_llama)
    wanda = WandaPruner(n_calibration=8, batch_size=4).prune(uneven_llama, calib, 0.5)
    magnitude = MagnitudePruner("row").prune(other, None, 0.5)
    assert wanda.keys() == magnitude.keys()
    q = "model.layers.0.self_attn.q_proj.weight"
    differ = (wanda[q] != magnitude[q]).float().mean().item()
    assert differ > 0.05
    # the outlier input features are kept by Wanda in (almost) every row
    assert wanda[q][:, :4].float().mean() > magnitude[q][:, :4].float().mean() + 0.3


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_wanda_per_row_sparsity_is_exact(tiny_llama, tokenizer, sparsity):
    masks = WandaPruner(n_calibration=6, batch_size=4).prune(
        tiny_llama, make_calib(len(tokenizer)), sparsity
    )
    for layer in prunable_layers(tiny_llama):
        w = layer.weight
        n_prune = round(sparsity * w.shape[1])
        assert ((w == 0).sum(1) == n_prune).all(), layer.name
        assert torch.equal(masks[layer.param_name], layer.module.weight != 0)


def test_wanda_scores_match_a_reference_through_pruned_blocks(uneven_llama, tokenizer):
    """q/k/v inputs of every block, recomputed on the pruned model (earlier blocks pruned),
    give the same per-row masks: |W| * ||X_j|| over non-padding tokens, inputs propagated."""
    calib = make_calib(len(tokenizer))
    layers = [
        layer
        for layer in prunable_layers(uneven_llama)
        if layer.name.split(".")[-1] in ("q_proj", "k_proj", "v_proj")
    ]
    before = {layer.name: layer.weight.detach().clone() for layer in layers}
    masks = WandaPruner(n_calibration=8, batch_size=4).prune(uneven_llama, calib, 0.5)
    sq = {layer.name: torch.zeros(layer.weight.shape[1]) for layer in layers}

    def accumulate(name):
        def hook(_module, inputs):
            sq[name].add_(inputs[0][calib.attention_mask.bool()].pow(2).sum(0))

        return hook

    hooks = [layer.module.register_forward_pre_hook(accumulate(layer.name)) for layer in layers]
    with torch.no_grad():
        uneven_llama(
            input_ids=calib.input_ids, attention_mask=calib.attention_mask, use_cache=False
        )
    for h in hooks:
        h.remove()
    for layer in layers:
        ref = row_mask(before[layer.name].abs() * sq[layer.name].sqrt()[None], 0.5)
        assert torch.equal(masks[layer.param_name], ref), layer.name


@pytest.mark.parametrize("nm", ["2:4", "4:8"])
def test_wanda_nm_pattern_in_every_group(tiny_llama, tokenizer, nm):
    n, m = map(int, nm.split(":"))
    WandaPruner(n_calibration=4, nm=nm).prune(tiny_llama, make_calib(len(tokenizer)), (m - n) / m)
    for layer in prunable_layers(tiny_llama):
        w = layer.weight
        groups = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
        assert (groups == n).all(), layer.name


def test_wanda_refuses_without_calibration_and_bad_values(tiny_llama):
    with pytest.raises(ValueError, match="calibration"):
        WandaPruner().prune(tiny_llama, None, 0.5)
    with pytest.raises(ConfigError, match="nm"):
        WandaPruner(nm="4:2")
    with pytest.raises(ConfigError, match="n_calibration"):
        WandaPruner(n_calibration=0)
    with pytest.raises(ConfigError, match="sparsity"):
        WandaPruner(nm="2:4").prune(tiny_llama, make_calib(10), 0.3)


def test_wanda_uses_only_n_calibration_sequences(tiny_llama, tokenizer):
    import copy

    calib = make_calib(len(tokenizer), n=8)
    other = copy.deepcopy(tiny_llama)
    a = WandaPruner(n_calibration=3).prune(tiny_llama, calib, 0.5)
    b = WandaPruner(n_calibration=8).prune(
        other, Calibration(calib.input_ids[:3], calib.attention_mask[:3]), 0.5
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reference_wanda_uses_norms_pooled_over_the_reference_models(uneven_llama, tokenizer):
    import copy

    from sparse_merge.pruning.importance import WandaImportance
    from sparse_merge.pruning.scored import ScorePruner

    calib = make_calib(len(tokenizer))
    pruner = WandaPruner(n_calibration=8, batch_size=4)
    # norms of the model itself: the one-pass (dense) Wanda score, exactly
    reference = pruner.reference([uneven_llama], calib)
    one_pass = copy.deepcopy(uneven_llama)
    expected = ScorePruner(WandaImportance(8, 4), "row").prune(one_pass, calib, 0.5)
    pruned = copy.deepcopy(uneven_llama)
    masks = reference.prune(pruned, None, 0.5)  # no calibration pass: none needed
    assert all(torch.equal(masks[k], expected[k]) for k in expected)
    for layer in prunable_layers(pruned):
        assert ((layer.weight == 0).sum(1) == layer.weight.shape[1] // 2).all()
    # two reference models: the squared norms add up over both models' tokens
    other = copy.deepcopy(uneven_llama)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    both = pruner.reference([uneven_llama, other], calib)
    name = "model.layers.1.mlp.down_proj"
    one, two = reference.norms[name], pruner.reference([other], calib).norms[name]
    assert torch.allclose(both.norms[name], (one**2 + two**2).sqrt(), rtol=1e-5)


def test_in_loop_setting_is_checked():
    with pytest.raises(ConfigError, match="in_loop"):
        WandaPruner(in_loop="sometimes")
