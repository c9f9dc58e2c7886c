"""Masked LoRA: exact zeros after the merge, forward equivalence of wrapped and merged models,
gradients of the fused sparse-to-sparse layer against plain autograd."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel

from sparse_merge.errors import ConfigError
from sparse_merge.finetune.adapter import Adapter, count_parameters
from sparse_merge.finetune.lora import LoraAdapter, MaskedLoraLinear, masked_lora_linear
from sparse_merge.pruning.magnitude import MagnitudePruner

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def pruned(tiny_llama):
    masks = MagnitudePruner().prune(tiny_llama, None, 0.5)
    return tiny_llama, masks


def _randomise_b(model, seed=0):
    """LoRA starts with B = 0 (no update); give B values so the update is visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _wrap(model, masks, mode, **kw):
    adapter = LoraAdapter(mode=mode, target_modules=TARGETS, **kw)
    wrapped = adapter.wrap(copy.deepcopy(model), masks)
    _randomise_b(wrapped)
    return adapter, wrapped.eval()


def _masked_nonzeros(model, masks):
    params = dict(model.named_parameters())
    return sum(int((params[n][~m] != 0).sum()) for n, m in masks.items())


@pytest.mark.parametrize("mask_given", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
def test_fused_layer_gradients_match_autograd(weighted, mask_given):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 12, generator=gen, dtype=torch.float64)
    mask = torch.rand(10, 12, generator=gen) > 0.5
    w = w * mask
    a = torch.randn(4, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 5, 10, generator=gen, dtype=torch.float64)
    given = mask if mask_given else None  # None: the mask is read off the weight's zeros
    y = masked_lora_linear(x, w, a, b, given, 0.7, with_base=weighted)
    grads = torch.autograd.grad(y, (x, a, b), dy)
    ref_w = ((w if weighted else 0) + 0.7 * (b @ a)) * mask
    y_ref = F.linear(x, ref_w)
    refs = torch.autograd.grad(y_ref, (x, a, b), dy)
    torch.testing.assert_close(y, y_ref)
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r)
    assert (a.grad is None) and not torch.equal(grads[1], torch.zeros_like(a))


def test_lora_adapter_follows_protocol():
    adapter = LoraAdapter(mode="sparse_to_sparse")
    assert isinstance(adapter, Adapter) and adapter.name == "sparse_to_sparse"
    assert adapter.scaling == 2.0


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"mode": "sparse"}, "mode"), ({"r": 0}, "r"), ({"lora_dropout": 1.5}, "lora_dropout")],
)
def test_bad_values_raise_config_error(kwargs, key):
    with pytest.raises(ConfigError) as err:
        LoraAdapter(**kwargs)
    assert err.value.key == key


def test_only_adapters_train(pruned):
    model, masks = pruned
    _, wrapped = _wrap(model, masks, "sparse_to_sparse")
    r, d, inter, layers = 8, 32, 64, 2
    # q,o: d x d; k,v: d -> d/2 (2 of 4 heads for keys/values); gate, up: d -> inter; down back
    per_layer = r * ((d + d) * 2 + (d + d // 2) * 2 + (d + inter) * 3)
    assert count_parameters(wrapped) == layers * per_layer
    assert all("lora_" in n for n, p in wrapped.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("mode", ["sparse_to_dense", "sparse_to_sparse"])
def test_masked_modes_merge_to_exact_zeros(pruned, mode):
    model, masks = pruned
    adapter, wrapped = _wrap(model, masks, mode)
    merged = adapter.merge(wrapped)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert _masked_nonzeros(merged, masks) == 0
    params = dict(merged.named_parameters())
    kept_changed = sum(
        int((params[n][m] != dict(model.named_parameters())[n][m]).sum()) for n, m in masks.items()
    )
    assert kept_changed > 0.9 * sum(int(m.sum()) for m in masks.values())  # the update landed


def test_dense_baseline_breaks_the_zeros(pruned):
    model, masks = pruned
    adapter, wrapped = _wrap(model, masks, "dense")
    merged = adapter.merge(wrapped)
    total_masked = sum(int((~m).sum()) for m in masks.values())
    assert _masked_nonzeros(merged, masks) > 0.9 * total_masked


def test_sparse_to_dense_merge_formula(pruned):
    model, masks = pruned
    adapter, wrapped = _wrap(model, masks, "sparse_to_dense")
    layer = next(m for m in wrapped.modules() if isinstance(m, MaskedLoraLinear))
    w0 = layer.get_base_layer().weight.detach().clone()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    expected = (w0 + (b @ a) * adapter.scaling) * layer.keep()
    adapter.merge(wrapped)
    torch.testing.assert_close(layer.get_base_layer().weight, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_sparse_to_sparse_forward_equals_merged_model(pruned, dropout):
    model, masks = pruned
    adapter, wrapped = _wrap(model, masks, "sparse_to_sparse", lora_dropout=dropout)
    ids = torch.randint(3, 20, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = wrapped(input_ids=ids).logits
        merged = adapter.merge(wrapped)
        after = merged(input_ids=ids).logits
    if dropout == 0.0:
        assert torch.equal(before, after)  # one formula for both: bit-identical
    else:  # eval forward runs base and update as two matmuls: equal up to rounding
        torch.testing.assert_close(before, after, rtol=1e-5, atol=1e-5)


def test_sparse_to_dense_forward_differs_from_its_merge(pruned):
    """Sparse-to-dense trains with the dense update: the mask at the merge changes outputs."""
    model, masks = pruned
    adapter, wrapped = _wrap(model, masks, "sparse_to_dense")
    ids = torch.randint(3, 20, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = wrapped(input_ids=ids).logits
        after = adapter.merge(wrapped)(input_ids=ids).logits
    assert (before - after).abs().max() > 1e-3


def test_sparse_to_sparse_trains_through_the_mask(pruned):
    """The same start and batch give different adapter gradients in the two masked modes (the
    sparse forward hides the masked part of the update), and after training steps the
    sparse-to-sparse model still equals its merge."""
    model, masks = pruned
    ids = torch.randint(3, 20, (4, 9), generator=torch.Generator().manual_seed(2))
    grads = {}
    for mode in ("sparse_to_dense", "sparse_to_sparse"):
        adapter, wrapped = _wrap(model, masks, mode)
        wrapped.train()
        opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1)
        for step in range(3):
            loss = wrapped(input_ids=ids, labels=ids).loss
            loss.backward()
            if step == 0:
                grads[mode] = torch.cat(
                    [p.grad.flatten() for p in wrapped.parameters() if p.requires_grad]
                )
            opt.step()
            opt.zero_grad()
    assert (grads["sparse_to_dense"] - grads["sparse_to_sparse"]).abs().max() > 1e-4
    wrapped.eval()
    with torch.no_grad():
        before = wrapped(input_ids=ids).logits
        merged = adapter.merge(wrapped)
        assert torch.equal(before, merged(input_ids=ids).logits)
    assert _masked_nonzeros(merged, masks) == 0


def test_adapter_saved_in_peft_format(pruned, tmp_path):
    model, masks = pruned
    adapter, wrapped = _wrap(model, masks, "sparse_to_sparse")
    out = adapter.save(wrapped, tmp_path / "adapter")
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), str(out))
    got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    want = {n: p for n, p in wrapped.named_parameters() if "lora_" in n}
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in got)


def test_masked_mode_without_masks_fails(tiny_llama):
    with pytest.raises(ValueError, match="needs masks"):
        LoraAdapter(mode="sparse_to_dense").wrap(tiny_llama, None)


def test_fused_layer_under_bf16_autocast():
    """Mixed precision: the matmuls run in bf16, the fp32 adapter weights get fp32 gradients
    close to the fp32 ones."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 16, generator=gen)
    mask = torch.rand(12, 16, generator=gen) > 0.5
    w = torch.randn(12, 16, generator=gen) * mask
    a = torch.randn(4, 16, generator=gen).requires_grad_()
    b = torch.randn(12, 4, generator=gen).requires_grad_()
    ref = masked_lora_linear(x, w, a, b, mask, 0.5)
    ref_grads = torch.autograd.grad(ref.square().sum(), (a, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = masked_lora_linear(x, w, a, b, mask, 0.5)
    assert y.dtype == torch.bfloat16
    grads = torch.autograd.grad(y.float().square().sum(), (a, b))
    assert [g.dtype for g in grads] == [torch.float32, torch.float32]
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.3)
    for g, r in zip(grads, ref_grads):
        assert (g - r).norm() < 0.05 * r.norm()


def test_masks_equal_to_the_zero_pattern_are_not_stored(pruned):
    """The usual case costs no mask memory; a kept weight that is exactly zero makes the layer
    keep its mask, and that weight may then grow (it is kept, not pruned)."""
    model, masks = pruned
    name = "model.layers.0.mlp.up_proj.weight"
    masks = dict(masks)
    with torch.no_grad():
        weight = dict(model.named_parameters())[name]
        kept = masks[name].nonzero()[0]
        weight[tuple(kept)] = 0.0  # a kept weight that happens to be zero
    adapter, wrapped = _wrap(model, masks, "sparse_to_sparse")
    layers = {
        n.removeprefix("base_model.model.") + ".weight": m
        for n, m in wrapped.named_modules()
        if isinstance(m, MaskedLoraLinear)
    }
    assert layers[name].mask_source == "buffer" and layers[name].keep_mask is not None
    others = [m for n, m in layers.items() if n != name]
    assert all(m.mask_source == "weight" and m.keep_mask is None for m in others)
    merged = adapter.merge(wrapped)
    assert _masked_nonzeros(merged, masks) == 0
    assert dict(merged.named_parameters())[name][tuple(kept)] != 0


def test_mask_must_match_a_pruned_weight(tiny_llama):
    masks = {
        layer_name: torch.zeros_like(p, dtype=torch.bool)
        for layer_name, p in tiny_llama.named_parameters()
        if layer_name.endswith("q_proj.weight")
    }
    with pytest.raises(ValueError, match="not zero where the mask is False"):
        LoraAdapter(mode="sparse_to_sparse", target_modules=["q_proj"]).wrap(tiny_llama, masks)
