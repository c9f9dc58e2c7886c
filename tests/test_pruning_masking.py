import copy
import weakref

import pytest
import torch

from sparse_merge.errors import ConfigError
from sparse_merge.models.blocks import head_dim, prunable_layers
from sparse_merge.pruning import base as pruning_base
from sparse_merge.pruning.base import Calibration, keep_smallest_out
from sparse_merge.pruning.importance import (
    GradientImportance,
    MagnitudeImportance,
    RandomImportance,
    TaylorImportance,
    WandaImportance,
    lm_labels,
)
from sparse_merge.pruning.magnitude import MagnitudePruner
from sparse_merge.pruning.masking import (
    channel_mask,
    global_masks,
    layer_mask,
    nm_mask,
    parse_nm,
    row_mask,
)
from sparse_merge.pruning.scored import ScorePruner
from sparse_merge.pruning.sparsegpt import SparseGPTPruner
from sparse_merge.pruning.sparsity import measure_sparsity
from sparse_merge.pruning.wanda import WandaPruner


def calib(vocab: int, n: int = 4, t: int = 10) -> Calibration:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, vocab, (n, t), generator=g)
    attn = torch.ones(n, t, dtype=torch.long)
    attn[-1, 7:] = 0
    return Calibration(ids, attn)


def test_row_and_layer_masks_are_exact_even_with_ties():
    scores = torch.ones(3, 8)  # all tied
    assert ((~row_mask(scores, 0.5)).sum(1) == 4).all()
    assert (~row_mask(scores, 0.5))[:, :4].all()  # ties go to the lower index
    keep = layer_mask(scores, 0.3)
    assert int((~keep).sum()) == round(0.3 * 24)
    assert (~keep).flatten()[:7].all() and keep.flatten()[7:].all()


def test_global_mask_is_one_threshold_with_an_exact_count():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(4, 6, generator=g), "b": torch.rand(5, 3, generator=g) * 0.5}
    keep = global_masks(scores, 0.4)
    total = 24 + 15
    assert sum(int((~k).sum()) for k in keep.values()) == round(0.4 * total)
    pruned_max = max(scores[n][~keep[n]].max() for n in scores)
    kept_min = min(scores[n][keep[n]].min() for n in scores)
    assert pruned_max <= kept_min
    # the layer with smaller scores loses more
    assert (~keep["b"]).float().mean() > (~keep["a"]).float().mean()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_has_n_kept_in_every_group(n, m):
    scores = torch.rand(6, 16, generator=torch.Generator().manual_seed(1))
    keep = nm_mask(scores, n, m)
    groups = keep.reshape(6, -1, m)
    assert (groups.sum(-1) == n).all()
    # the kept ones are the largest of their group
    s = scores.reshape(6, -1, m)
    assert (
        s.masked_fill(~groups, float("inf")).min(-1).values
        >= s.masked_fill(groups, -1).max(-1).values
    ).all()


def test_parse_nm_rejects_bad_patterns():
    assert parse_nm("nm", "2:4") == (2, 4)
    assert parse_nm("nm", None) is None
    for bad in ("4:2", "2-4", "0:4", "a:b"):
        with pytest.raises(ConfigError, match="nm"):
            parse_nm("nm", bad)


def test_channel_and_head_masks_remove_whole_units():
    scores = torch.arange(8 * 5, dtype=torch.float).reshape(8, 5)
    keep = channel_mask(scores, 0.25)  # 2 of 8 rows, the lowest
    assert keep[:2].logical_not().all() and keep[2:].all()
    heads = channel_mask(scores.flip(0), 0.5, unit=2)  # 2 of 4 heads of 2 rows
    assert heads[4:].logical_not().all() and heads[:4].all()


@pytest.mark.parametrize("kv_heads", [None, 2])  # multi-head, grouped-query (2 groups of 2)
def test_structured_pruner_removes_whole_heads_and_channels(tokenizer, kv_heads):
    """LLM-Pruner's coupled structures: a removed head loses its query, key and value rows and
    its o_proj input columns (a key/value group at a time under GQA); a removed MLP channel its
    gate and up rows and its down_proj input column; the residual stream's rows stay. Each
    layer used to rank its own rows: q, k and v kept different heads, o_proj and down_proj lost
    residual dimensions, and gate and up different channels."""
    from sparse_merge.models.toy import toy_llama

    arch = {"num_attention_heads": 4} | ({"num_key_value_heads": kv_heads} if kv_heads else {})
    model = toy_llama(tokenizer, seed=0, hidden_size=32, intermediate_size=64, **arch)
    ScorePruner(MagnitudeImportance(), "head").prune(model, None, 0.5)
    hd = head_dim(model)
    for block in model.model.layers:
        att, mlp = block.self_attn, block.mlp
        dead_q = (att.q_proj.weight == 0).all(1).view(-1, hd).all(1)  # [heads]
        kept_q = (att.q_proj.weight != 0).all(1).view(-1, hd).all(1)
        assert (dead_q ^ kept_q).all() and int(dead_q.sum()) == 2
        dead_o = (att.o_proj.weight == 0).all(0).view(-1, hd).all(1)
        assert torch.equal(dead_o, dead_q) and not (att.o_proj.weight == 0).all(1).any()
        groups = (att.k_proj.weight == 0).all(1).view(-1, hd).all(1)  # [kv heads]
        assert torch.equal((att.v_proj.weight == 0).all(1).view(-1, hd).all(1), groups)
        assert torch.equal(dead_q, groups.repeat_interleave(4 // groups.numel()))
        channels = (mlp.gate_proj.weight == 0).all(1)
        assert int(channels.sum()) == 32 and torch.equal((mlp.up_proj.weight == 0).all(1), channels)
        assert torch.equal((mlp.down_proj.weight == 0).all(0), channels)
        assert not (mlp.down_proj.weight == 0).all(1).any()
    assert measure_sparsity(model).overall == pytest.approx(0.5)


def test_random_masks_are_reproducible_by_seed(tiny_llama):
    a = ScorePruner(RandomImportance(seed=3), "layer").prune(copy.deepcopy(tiny_llama), None, 0.5)
    b = ScorePruner(RandomImportance(seed=3), "layer").prune(copy.deepcopy(tiny_llama), None, 0.5)
    c = ScorePruner(RandomImportance(seed=4), "layer").prune(copy.deepcopy(tiny_llama), None, 0.5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert all(int((~v).sum()) == v.numel() // 2 for v in a.values())


def reference_grads(model, cal: Calibration, n_batches: int, batch_size: int, labels=None):
    model = copy.deepcopy(model)
    batches = cal.batches(batch_size)[:n_batches]
    for i, (ids, attn) in enumerate(batches):
        lab = lm_labels(ids, attn) if labels is None else labels[i * batch_size :][:batch_size]
        out = model(input_ids=ids, attention_mask=attn, labels=lab)
        (out.loss / len(batches)).backward()
    return {layer.param_name: layer.module.weight.grad for layer in prunable_layers(model)}


def test_gradient_and_taylor_scores_match_a_hand_computed_backward(tiny_llama, tokenizer):
    cal = calib(len(tokenizer), n=6)
    ref = reference_grads(tiny_llama, cal, n_batches=2, batch_size=2)
    grad = GradientImportance(n_batches=2, batch_size=2).compute(tiny_llama, cal)
    taylor = TaylorImportance(n_batches=2, batch_size=2).compute(tiny_llama, cal)
    for layer in prunable_layers(tiny_llama):
        g = ref[layer.param_name]
        assert torch.allclose(grad[layer.param_name], g.abs(), atol=1e-7)
        assert torch.allclose(taylor[layer.param_name], (layer.weight * g).abs(), atol=1e-7)
    # nothing left behind: no grads, requires_grad restored
    assert all(p.grad is None and p.requires_grad for p in tiny_llama.parameters())


def test_gradient_scores_never_fall_back_to_magnitude(tiny_llama, tokenizer):
    with pytest.raises(ValueError, match="calibration"):
        GradientImportance().compute(tiny_llama, None)
    with pytest.raises(ValueError, match="calibration"):
        ScorePruner(TaylorImportance()).prune(tiny_llama, None, 0.5)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        TaylorImportance().compute(tiny_llama, calib(len(tokenizer)))
    assert not (prunable_layers(tiny_llama)[0].weight == 0).any()  # nothing was pruned


def test_gradient_scores_refuse_a_loss_without_target_tokens(tiny_llama, tokenizer):
    """Answer-only labels whose answers the calibration length cut off: the loss is 0, every
    score 0, and the masks went by index (the first half of every row); now an error."""
    from sparse_merge.tasks.base import Example

    examples = [Example("rev:" + "abcdefghij"[i % 10] * 16 + "=", "xyz") for i in range(16)]
    calib = Calibration.from_examples(tokenizer, examples, 16, answers_only=True)
    with pytest.raises(ValueError, match="calibration.length"):
        ScorePruner(TaylorImportance(2, 8), granularity="row").prune(tiny_llama, calib, 0.5)


def test_gradient_taylor_magnitude_give_different_masks(tiny_llama, tokenizer):
    cal = calib(len(tokenizer))
    masks = {
        imp.name: ScorePruner(imp, "row").prune(copy.deepcopy(tiny_llama), cal, 0.5)
        for imp in (
            MagnitudeImportance(),
            GradientImportance(),
            TaylorImportance(),
            WandaImportance(),
        )
    }
    key = "model.layers.1.mlp.up_proj.weight"
    names = list(masks)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.equal(masks[a][key], masks[b][key]), (a, b)


def test_score_pruner_exact_per_granularity(tiny_llama):
    for gran, unit in (("row", "row"), ("layer", "layer")):
        model = copy.deepcopy(tiny_llama)
        ScorePruner(MagnitudeImportance(), gran).prune(model, None, 0.3)
        for layer in prunable_layers(model):
            w = layer.weight
            if unit == "row":
                assert ((w == 0).sum(1) == round(0.3 * w.shape[1])).all()
            else:
                assert int((w == 0).sum()) == round(0.3 * w.numel())
    model = copy.deepcopy(tiny_llama)
    ScorePruner(MagnitudeImportance(), "global").prune(model, None, 0.3)
    layers = prunable_layers(model)
    total = sum(layer.weight.numel() for layer in layers)
    assert sum(int((layer.weight == 0).sum()) for layer in layers) == round(0.3 * total)


def test_answer_only_labels_change_the_gradient(tiny_llama, tokenizer):
    from sparse_merge.tasks.base import Example

    examples = [Example("12+3=", "15"), Example("rev:abcd=", "dcba")]
    full = Calibration.from_examples(tokenizer, examples)
    answers = Calibration.from_examples(tokenizer, examples, answers_only=True)
    assert full.labels is None and torch.equal(answers.input_ids, full.input_ids)
    assert answers.labels[0].tolist()[:5] == [-100] * 5  # the prompt "12+3=" is skipped
    assert (answers.labels[0, 5:7] == full.input_ids[0, 5:7]).all()  # the answer "15" is kept
    assert (answers.labels[1, 9:] == answers.input_ids[1, 9:]).all()
    assert answers.head(1).labels.shape[0] == 1
    a = GradientImportance(1, 2).compute(tiny_llama, full)
    b = GradientImportance(1, 2).compute(tiny_llama, answers)
    ref = reference_grads(tiny_llama, answers, 1, 2, labels=answers.labels)
    key = prunable_layers(tiny_llama)[0].param_name
    assert not torch.allclose(a[key], b[key])
    assert torch.allclose(b[key], ref[key].abs(), atol=1e-7)


def _stable_sort_keep(scores, n_prune):
    """The reference: the ``n_prune`` first entries of a stable ascending argsort go."""
    order = torch.argsort(scores, dim=-1, stable=True)
    return torch.ones_like(scores, dtype=torch.bool).scatter_(-1, order[..., :n_prune], False)


@pytest.mark.parametrize("kind", ["continuous", "few_values", "constant", "mixed"])
@pytest.mark.parametrize("rows", ["sorted", "selected"])
def test_selection_masks_equal_a_stable_sort_bit_for_bit(kind, rows, monkeypatch):
    if rows == "selected":  # every row takes the path of long rows (one row per layer)
        monkeypatch.setattr(pruning_base, "SORT_ROWS", 0)
    g = torch.Generator().manual_seed(0)
    for shape in [(7, 13), (5, 3, 8), (100,), (64, 4)]:
        scores = {
            "continuous": torch.randn(shape, generator=g),
            "few_values": torch.randint(0, 3, shape, generator=g).float(),  # many ties
            "constant": torch.zeros(shape),
            # rows with ties at the cut next to rows without (a pruned weight's zeros)
            "mixed": torch.randn(shape, generator=g).abs()
            * (torch.rand(shape[:-1] + (1,), generator=g) < 0.5)
            * (torch.rand(shape, generator=g) < 0.6),
        }[kind]
        for dtype in (torch.float32, torch.bfloat16):
            s = scores.to(dtype)
            for n in range(shape[-1] + 1):
                assert torch.equal(keep_smallest_out(s, n), _stable_sort_keep(s, n)), (shape, n)


@pytest.mark.parametrize("zeros", [0.0, 0.5])
def test_long_rows_of_a_pruned_bfloat16_weight_keep_a_stable_sorts_mask(zeros):
    # rows longer than SORT_ROWS are selected, not sorted; with half of them zeros (a pruned
    # weight) the threshold is found among the other entries, or is the zeros themselves
    g = torch.Generator().manual_seed(1)
    n = pruning_base.SORT_ROWS + 4_464
    w = (torch.randn(2, n, generator=g) * 0.02).to(torch.bfloat16).abs().float()
    w *= torch.rand(2, n, generator=g) >= zeros
    for k in (1, n // 4, n // 2 - 7, n // 2, n // 2 + 9, 3 * n // 4, n - 1):
        assert torch.equal(keep_smallest_out(w, k), _stable_sort_keep(w, k)), k


def _in_place_pruners(model, cal):
    """Every pruner here, by name (``LayerMasks``)."""
    return {
        "magnitude, layer": MagnitudePruner(),
        "magnitude, row": MagnitudePruner("row"),
        "magnitude, global": MagnitudePruner("global"),
        "magnitude, 2:4": MagnitudePruner(nm="2:4"),
        "random, head": ScorePruner(RandomImportance(), "head"),
        "wanda importance, channel": ScorePruner(WandaImportance(), "channel"),
        "wanda": WandaPruner(n_calibration=4, batch_size=2),
        "wanda, in the loop": WandaPruner(n_calibration=4, batch_size=2).reference([model], cal),
        "sparsegpt": SparseGPTPruner(n_calibration=4, batch_size=2, block_size=16),
    }


IN_PLACE = [
    "magnitude, layer", "magnitude, row", "magnitude, global", "magnitude, 2:4", "random, head",
    "wanda importance, channel", "wanda", "wanda, in the loop", "sparsegpt",
]  # fmt: skip


@pytest.mark.parametrize("name", IN_PLACE)
def test_pruning_in_place_zeroes_what_prune_zeroes_holding_one_mask_at_a_time(
    name, tiny_llama, tokenizer
):
    """``prune_`` (a search's loop) prunes as ``prune`` does, and keeps no layer's mask once
    the next is handed over (the global ranking, which makes every mask first, aside)."""
    cal = calib(len(tokenizer))
    first, second = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    sparsity = 0.5
    masks = _in_place_pruners(tiny_llama, cal)[name].prune(first, cal, sparsity)
    pruning_base.prune_in_place(_in_place_pruners(tiny_llama, cal)[name], second, cal, sparsity)
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters()))
    assert all(torch.equal(masks[layer.param_name], layer.parameter != 0)
               for layer in prunable_layers(first))  # fmt: skip
    alive = []  # weak references to the masks handed over so far

    def record(param_name: str, keep: torch.Tensor) -> None:
        if name != "magnitude, global":
            assert all(ref() is None for ref in alive), "an earlier layer's mask is still held"
        alive.append(weakref.ref(keep))

    third = copy.deepcopy(tiny_llama)
    assert _in_place_pruners(tiny_llama, cal)[name]._prune(third, cal, sparsity, record)
    assert len(alive) == len(prunable_layers(third))
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), third.parameters()))


def test_a_pruner_without_prune_in_place_is_pruned_with_prune(tiny_llama):
    calls = []

    class Plain:  # the Pruner protocol alone
        def prune(self, model, calib, sparsity):
            calls.append(sparsity)
            return MagnitudePruner().prune(model, calib, sparsity)

    pruning_base.prune_in_place(Plain(), tiny_llama, None, 0.25)
    assert calls == [0.25]
    layers = prunable_layers(tiny_llama)
    zeros = sum(int((layer.parameter == 0).sum()) for layer in layers)
    assert zeros == sum(round(0.25 * layer.parameter.numel()) for layer in layers)
