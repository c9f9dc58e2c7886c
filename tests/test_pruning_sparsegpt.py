import pytest
import torch

from sparse_merge.models.blocks import prunable_layers
from sparse_merge.pruning.base import Calibration
from sparse_merge.pruning.masking import layer_mask
from sparse_merge.pruning.sparsegpt import SparseGPTPruner, sparsegpt_prune_


def correlated_inputs(n: int = 256, d: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g)  # dense mixing: strongly correlated features
    return torch.randn(n, d, generator=g) @ mix  # [n, d]


def test_identity_hessian_gives_magnitude_mask_and_no_update():
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    before = w.clone()
    keep = sparsegpt_prune_(w, torch.eye(16), 0.5, block_size=16, dampening=1e-8)
    assert torch.equal(keep, layer_mask(before.abs(), 0.5))
    assert torch.allclose(w, before * keep)  # kept weights unchanged: nothing to compensate


@pytest.mark.parametrize("granularity", ["layer", "row"])
def test_obs_update_reconstructs_better_than_zeroing(granularity):
    x = correlated_inputs()
    w = torch.randn(24, 32, generator=torch.Generator().manual_seed(1))
    dense = x @ w.t()
    pruned = w.clone()
    keep = sparsegpt_prune_(pruned, x.t() @ x, 0.5, granularity=granularity, block_size=8)
    zeroed = w * keep  # same mask, no weight update
    magnitude = w * layer_mask(w.abs(), 0.5)
    err = (x @ pruned.t() - dense).pow(2).sum()
    assert err < 0.8 * (x @ zeroed.t() - dense).pow(2).sum()
    assert err < 0.8 * (x @ magnitude.t() - dense).pow(2).sum()
    assert torch.equal(pruned != 0, keep)
    if granularity == "row":
        assert ((~keep).sum(1) == 16).all()
    else:
        assert int((~keep).sum()) == 24 * 16


def test_exact_count_when_blocks_do_not_divide_it():
    x = correlated_inputs(d=30)
    w = torch.randn(7, 30, generator=torch.Generator().manual_seed(2))
    keep = sparsegpt_prune_(w, x.t() @ x, 0.3, block_size=8)
    assert int((~keep).sum()) == round(0.3 * 7 * 30)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_pattern(nm):
    x = correlated_inputs()
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    keep = sparsegpt_prune_(w, x.t() @ x, 0.5, nm=nm, block_size=16)
    assert (keep.reshape(8, -1, nm[1]).sum(-1) == nm[0]).all()
    assert torch.equal(w != 0, keep)


def test_sparsegpt_pruner_on_a_model(tiny_llama, tokenizer):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (6, 12), generator=g)
    calib = Calibration(ids, torch.ones_like(ids))
    masks = SparseGPTPruner(n_calibration=6, block_size=16).prune(tiny_llama, calib, 0.5)
    for layer in prunable_layers(tiny_llama):
        w = layer.module.weight
        assert int((w == 0).sum()) == w.numel() // 2
        assert torch.equal(masks[layer.param_name], w != 0)
    with pytest.raises(ValueError, match="calibration"):
        SparseGPTPruner().prune(tiny_llama, None, 0.5)


@pytest.mark.parametrize("granularity", ["layer", "row"])
def test_dead_features_are_pruned_first_whatever_the_activations_scale(granularity):
    """Input features no calibration token reaches (H_jj = 0) rank first, as the reference's
    zeroed weights do; neither the mask nor the reconstruction depends on how large the live
    activations are (with H_jj = 1 in the unscaled Hessian, small inputs left dead weights in
    and pruned live ones instead)."""
    dead = torch.arange(0, 32, 4)  # 8 of 32 features never active
    w = torch.randn(24, 32, generator=torch.Generator().manual_seed(4))
    results = []
    for scale in (1.0, 0.01, 100.0):
        x = correlated_inputs() * scale
        x[:, dead] = 0
        pruned = w.clone()
        keep = sparsegpt_prune_(pruned, x.t() @ x, 0.5, granularity=granularity, block_size=8)
        results.append((keep, pruned))
    keep, pruned = results[0]
    assert not keep[:, dead].any()  # 192 dead weights, 384 pruned: every dead one goes
    for other_keep, other_pruned in results[1:]:
        assert torch.equal(other_keep, keep)
        assert torch.allclose(other_pruned, pruned, rtol=1e-3, atol=1e-5)


def test_dead_features_go_smallest_first_when_the_budget_is_short():
    """Fewer pruned than dead weights: the dead ones go by |w| (an unrouted expert, all dead,
    is magnitude pruning)."""
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(5))
    h = torch.zeros(16, 16)
    keep = sparsegpt_prune_(w.clone(), h, 0.5, block_size=16)
    assert torch.equal(keep, layer_mask(w.abs(), 0.5))


def test_nm_needs_whole_groups():
    with pytest.raises(ValueError, match="input size 10 is not a multiple of M=4"):
        sparsegpt_prune_(torch.randn(4, 10), torch.eye(10), 0.5, nm=(2, 4), block_size=8)


@pytest.mark.parametrize("pruner", ["sparsegpt", "wanda"])
def test_nm_width_is_refused_before_calibration(pruner, tokenizer):
    """A weight whose inputs do not fall into whole groups of M is named before any block
    runs (it used to fail, or with SparseGPT silently over-prune, mid-way)."""
    from sparse_merge.models.toy import toy_llama
    from sparse_merge.pruning.wanda import WandaPruner

    model = toy_llama(tokenizer, seed=0, hidden_size=32, intermediate_size=66)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    ids = torch.randint(3, len(tokenizer), (2, 8), generator=torch.Generator().manual_seed(0))
    calib = Calibration(ids, torch.ones_like(ids))
    p = SparseGPTPruner(nm="2:4", block_size=16) if pruner == "sparsegpt" else WandaPruner(nm="2:4")
    with pytest.raises(ValueError, match=r"down_proj.*input size 66 is not a multiple of M=4"):
        p.prune(model, calib, 0.5)
    assert calls == []
