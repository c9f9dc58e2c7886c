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
