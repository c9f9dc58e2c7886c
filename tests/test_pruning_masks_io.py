import copy
import json

import pytest
import torch

from sparse_merge.models.blocks import prunable_layers
from sparse_merge.pruning.magnitude import MagnitudePruner
from sparse_merge.pruning.mask_io import (
    METADATA_FIELDS,
    apply_masks,
    load_masks,
    mask_dir,
    model_hash,
    save_masks,
)
from sparse_merge.pruning.stats import mask_stats, overall_sparsity, plot_mask_stats
from sparse_merge.pruning.validate import validate_masks, write_report


def meta(model):
    return {
        "method": "magnitude",
        "importance": "magnitude",
        "sparsity": 0.5,
        "granularity": "layer",
        "model": "tiny-llama",
        "source_hash": model_hash(model),
    }


def test_masks_round_trip_bit_exactly_with_metadata(tmp_path, tiny_llama):
    info = meta(tiny_llama)
    masks = MagnitudePruner().prune(tiny_llama, None, 0.5)
    # a non-contiguous mask (as GPT-2 Conv1D masks are) saves too
    masks["extra.weight"] = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)).t() > 0.5
    out = save_masks(mask_dir(tmp_path, "org/tiny", 0.5, "magnitude"), masks, info)
    assert out == tmp_path / "org--tiny" / "sparsity50_magnitude"
    loaded, metadata = load_masks(out)
    assert loaded.keys() == masks.keys()
    assert all(loaded[k].dtype == torch.bool and torch.equal(loaded[k], masks[k]) for k in masks)
    assert set(METADATA_FIELDS) <= set(metadata)
    assert {k: metadata[k] for k in info} == info
    assert json.loads((out / "metadata.json").read_text()) == metadata
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary directory left


def test_model_hash_tells_models_apart(tiny_llama, tokenizer):
    from sparse_merge.models.toy import toy_llama

    other = toy_llama(tokenizer, seed=1, hidden_size=32, intermediate_size=64)
    assert model_hash(tiny_llama) == model_hash(copy.deepcopy(tiny_llama))
    assert model_hash(tiny_llama) != model_hash(other)


def test_apply_masks_reproduces_the_pruned_model(tmp_path, tiny_llama):
    dense = copy.deepcopy(tiny_llama)
    masks = MagnitudePruner("row").prune(tiny_llama, None, 0.6)
    save_masks(tmp_path / "m", masks, meta(dense))
    loaded, _ = load_masks(tmp_path / "m")
    apply_masks(dense, loaded)
    for (n, a), (_, b) in zip(dense.named_parameters(), tiny_llama.named_parameters()):
        assert torch.equal(a, b), n
    with pytest.raises(KeyError):
        apply_masks(dense, {"nope.weight": torch.ones(2, 2, dtype=torch.bool)})


def test_validation_catches_a_single_nonzero_masked_weight(tmp_path, tiny_llama):
    masks = MagnitudePruner().prune(tiny_llama, None, 0.5)
    report = validate_masks(tiny_llama, masks, expected_sparsity=0.5, tolerance=1e-3)
    assert report["ok"] and report["nonzero_masked"] == 0
    assert report["mask_sparsity"] == pytest.approx(0.5, abs=1e-3)
    name = prunable_layers(tiny_llama)[3].param_name
    assert report["layers"][name]["mask_sparsity"] == 0.5
    w = dict(tiny_llama.named_parameters())[name]
    idx = (~masks[name]).nonzero()[0]
    with torch.no_grad():
        w[tuple(idx)] = 1e-30  # one tiny non-zero is still a violation
    bad = validate_masks(tiny_llama, masks)
    assert not bad["ok"] and bad["nonzero_masked"] == 1
    assert bad["layers"][name]["nonzero_masked"] == 1
    assert name in bad["problems"][0]
    assert not validate_masks(tiny_llama, masks, expected_sparsity=0.7)["ok"]
    path = write_report(tmp_path / "validation.json", bad)
    assert json.loads(path.read_text())["nonzero_masked"] == 1


def test_stats_and_plots(tmp_path, tiny_llama):
    masks = MagnitudePruner("row").prune(tiny_llama, None, 0.25)
    stats = mask_stats(masks)
    assert len(stats) == len(masks)
    assert all(r["sparsity"] == 0.25 and r["row_sparsity_max"] == 0.25 for r in stats)
    assert overall_sparsity(masks) == 0.25
    paths = plot_mask_stats(stats, tmp_path, "tiny")
    assert [p.name for p in paths] == ["sparsity_histogram.png", "sparsity_by_layer.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
