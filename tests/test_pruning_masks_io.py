import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sparse_merge.models.blocks import prunable_layers
from sparse_merge.pruning.magnitude import MagnitudePruner
from sparse_merge.pruning.mask_io import (
    MASKS_FILE,
    METADATA_FIELDS,
    METADATA_KEY,
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


def random_mask(shape, seed=0, p=0.5):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p


@pytest.mark.parametrize(
    "mask",
    [
        random_mask((13,)),  # 1-D, numel not a multiple of 8
        random_mask((7, 9), seed=1),  # 2-D, 63 entries
        random_mask((3, 5, 11), seed=2),  # 3-D, 165 entries
        random_mask((8, 16), seed=3),  # whole bytes
        torch.ones(5, 3, dtype=torch.bool),
        torch.zeros(17, dtype=torch.bool),
        torch.ones(1, dtype=torch.bool),
        torch.zeros(0, 4, dtype=torch.bool),  # empty
        torch.tensor(True),  # 0-D
    ],
    ids=["1d-13", "2d-7x9", "3d-3x5x11", "2d-8x16", "all-true", "all-false", "one", "empty", "0d"],
)
def test_packed_masks_round_trip_exactly(tmp_path, mask):
    save_masks(tmp_path / "m", {"w": mask, "other": ~mask}, {"method": "test"})
    loaded, metadata = load_masks(tmp_path / "m")
    assert loaded.keys() == {"w", "other"}
    assert loaded["w"].dtype == torch.bool and loaded["w"].shape == mask.shape
    assert torch.equal(loaded["w"], mask) and torch.equal(loaded["other"], ~mask)
    assert metadata["method"] == "test" and "mask_format" not in metadata
    with safe_open(str(tmp_path / "m" / MASKS_FILE), framework="pt") as f:
        header = f.metadata()
        stored = f.get_tensor("w")
    assert header["mask_format"] == "packbits-v1"
    assert json.loads(header["mask_shapes"])["w"] == list(mask.shape)
    assert stored.dtype == torch.uint8 and stored.shape == ((mask.numel() + 7) // 8,)


def test_packed_file_is_about_one_bit_per_weight(tmp_path):
    mask = random_mask((1000, 1000))  # 1e6 entries: 125,000 bytes packed, 1e6 as bool
    save_masks(tmp_path / "packed", {"w": mask}, {})
    save_file({"w": mask}, str(tmp_path / "bool.safetensors"))
    packed = (tmp_path / "packed" / MASKS_FILE).stat().st_size
    unpacked = (tmp_path / "bool.safetensors").stat().st_size
    assert 125_000 <= packed < 126_000 and packed < unpacked / 6


def test_old_bool_mask_files_still_load(tmp_path, tiny_llama):
    """A directory as the pre-packing ``save_masks`` wrote it: bool tensors, metadata only."""
    info = meta(tiny_llama)
    masks = MagnitudePruner().prune(tiny_llama, None, 0.5)
    masks["odd.weight"] = random_mask((3, 5, 7))
    old = tmp_path / "old"
    old.mkdir()
    text = json.dumps({"date": "2024-01-01T00:00:00+00:00", **info}, sort_keys=True)
    save_file(
        {k: v.contiguous() for k, v in masks.items()}, str(old / MASKS_FILE), {METADATA_KEY: text}
    )
    loaded, metadata = load_masks(old)
    assert loaded.keys() == masks.keys()
    assert all(loaded[k].dtype == torch.bool and torch.equal(loaded[k], masks[k]) for k in masks)
    assert metadata == json.loads(text)


def rewrite_header(path, **changes):
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(path), {**header, **changes})


def test_a_recorded_shape_that_does_not_fit_the_bytes_is_a_clear_error(tmp_path):
    out = save_masks(tmp_path / "m", {"layers.0.w": random_mask((4, 10))}, {})
    rewrite_header(out / MASKS_FILE, mask_shapes=json.dumps({"layers.0.w": [4, 11]}))
    with pytest.raises(ValueError, match=r"'layers\.0\.w'.*masks\.safetensors.*\(4, 11\).*6 bytes"):
        load_masks(out)
    rewrite_header(out / MASKS_FILE, mask_shapes=json.dumps({"other": [4, 10]}))  # no shape for it
    with pytest.raises(ValueError, match="layers.0.w"):
        load_masks(out)
    rewrite_header(out / MASKS_FILE, mask_format="packbits-v9")
    with pytest.raises(ValueError, match="packbits-v9"):
        load_masks(out)


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


def test_every_sparsity_has_its_own_mask_folder(tmp_path):
    """Rounded to whole percents, 0.5 and 0.504 (or 0 and 0.005) shared a folder, and saving
    the second set replaced the first."""
    sparsities = (0.0, 0.005, 0.05, 0.1, 0.12, 0.125, 0.3, 0.5, 0.504, 0.7, 0.9)
    names = [mask_dir(tmp_path, "m", s, "wanda").name for s in sparsities]
    assert len(set(names)) == len(sparsities)
    assert names[:4] == [
        "sparsity00_wanda",
        "sparsity00.5_wanda",
        "sparsity05_wanda",
        "sparsity10_wanda",
    ]
    assert names[5:9] == [
        "sparsity12.5_wanda",
        "sparsity30_wanda",
        "sparsity50_wanda",
        "sparsity50.4_wanda",
    ]
