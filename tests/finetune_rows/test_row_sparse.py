import torch
from torch import nn

from sparse_merge.finetune.nf4 import NF4_LEVELS, NF4Linear, dequantize_nf4, quantize_nf4
from sparse_merge.finetune.row_selection import (
    random_rows,
    row_importance,
    rows_for_lora_rank,
    spsa_gradients,
    top_rows,
)
from sparse_merge.finetune.row_sparse import (
    RowSparseLinear,
    load_row_update,
    merge_row_sparse,
    save_row_update,
)


def _linear(out=6, inp=4, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(inp, out)


def test_rows_follow_hand_computed_importance():
    w = torch.tensor([[1.0, -1.0], [0.1, 0.2], [3.0, 0.0], [-0.5, 0.5], [0.0, 0.0]])
    x_norm = torch.tensor([1.0, 2.0])  # Wanda: |W| * ||X_j||
    wanda_rows = row_importance(w.abs() * x_norm)  # [3, 0.5, 3, 1.5, 0]
    assert torch.allclose(wanda_rows, torch.tensor([3.0, 0.5, 3.0, 1.5, 0.0], dtype=torch.float64))
    assert top_rows(wanda_rows, 2).tolist() == [0, 2]  # tie 0/2 both kept
    assert top_rows(row_importance(w.abs()), 2).tolist() == [0, 2]  # magnitude: 2, .3, 3, 1, 0
    assert top_rows(torch.tensor([1.0, 1.0, 1.0]), 1).tolist() == [0]  # ties: lower index


def test_random_rows_reproducible_and_budget():
    a = random_rows(100, 10, torch.Generator().manual_seed(3))
    assert (
        torch.equal(a, random_rows(100, 10, torch.Generator().manual_seed(3)))
        and a.unique().numel() == 10
    )
    assert rows_for_lora_rank(64, 32, 4) == 4 * (64 + 32) // 32  # 12 rows * 32 = 384 = 4 * 96
    assert rows_for_lora_rank(8, 32, 100) == 8


def test_forward_equals_dense_update_and_merge_is_exact(tmp_path):
    base = _linear()
    layer = RowSparseLinear(base, torch.tensor([4, 1]))
    with torch.no_grad():
        layer.delta.copy_(torch.randn(2, 4))
    x = torch.randn(3, 5, 4)
    dense = base.weight.detach().clone()
    dense[[1, 4]] += layer.delta.detach()[[0, 1]]  # rows are sorted: [1, 4]
    assert torch.allclose(layer(x), nn.functional.linear(x, dense, base.bias), atol=1e-6)
    model = nn.Sequential(layer)
    save_row_update(model, tmp_path / "update.safetensors")
    merged = merge_row_sparse(model)[0]
    assert isinstance(merged, nn.Linear) and torch.equal(merged.weight, dense)
    fresh = nn.Sequential(_linear())
    load_row_update(fresh, tmp_path / "update.safetensors")
    assert torch.equal(fresh[0].weight, dense)


def test_only_delta_trains():
    layer = RowSparseLinear(_linear(), torch.tensor([0, 2]))
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["delta"]
    layer(torch.randn(2, 4)).sum().backward()
    assert layer.delta.grad.shape == (2, 4)


def test_nf4_round_trip_and_residual_init():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    q = quantize_nf4(w, block_size=64)
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == w.numel() // 2
    deq = dequantize_nf4(q)
    scales = w.abs().amax(1, keepdim=True)  # one block per row here
    assert torch.isin((deq / scales).round(decimals=5), NF4_LEVELS.round(decimals=5)).all()
    assert torch.allclose(dequantize_nf4(quantize_nf4(deq)), deq, atol=1e-6)  # idempotent
    gaps = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2
    assert ((deq - w).abs() <= gaps * scales + 1e-6).all()

    base = nn.Linear(64, 8)
    with torch.no_grad():
        base.weight.copy_(w)
    qlin = NF4Linear.from_linear(base)
    layer = RowSparseLinear(qlin, torch.tensor([1, 5]), init="residual", full_weight=w)
    eff = qlin.dequantized_weight().clone()
    eff[layer.rows] += layer.delta.detach()
    assert torch.allclose(eff[[1, 5]], w[[1, 5]], atol=1e-6)  # selected rows: zero error at step 0
    assert not torch.allclose(eff[[0, 2]], w[[0, 2]])  # the others keep their error
    x = torch.randn(4, 64)
    assert torch.allclose(layer(x), nn.functional.linear(x, eff, base.bias), atol=1e-5)


def test_spsa_correlates_with_true_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))

    def loss():
        return nn.functional.cross_entropy(model(x), y)

    params = [model[0].weight]
    loss().backward()
    true = model[0].weight.grad.clone()
    before = model[0].weight.detach().clone()
    est = spsa_gradients(
        params, loss, n_estimate=400, eps=1e-3, generator=torch.Generator().manual_seed(0)
    )[0]
    assert torch.equal(model[0].weight, before)  # restored exactly
    cos = nn.functional.cosine_similarity(est.flatten(), true.flatten(), dim=0)
    assert cos > 0.6
    rows_true = row_importance((before * true).abs())
    rows_est = row_importance((before * est).abs())
    assert torch.corrcoef(torch.stack([rows_true, rows_est]))[0, 1] > 0.6
