"""``lora.mask_path``: masks of another model, or of another sparsity than ``sparsity``, are
refused with an error naming both values; ``lora.mask_check=false`` applies masks of another
model anyway."""

import json

import pytest
import torch
from hydra.utils import instantiate

from sparse_merge.app import execute
from sparse_merge.errors import ConfigError
from sparse_merge.models.hf import load_causal_lm
from sparse_merge.pipelines import finetune
from sparse_merge.pruning.magnitude import MagnitudePruner
from sparse_merge.pruning.mask_io import (
    check_mask_source,
    check_mask_sparsity,
    model_hash,
    save_masks,
)

from ..conftest import compose_cfg

SMOKE = ["experiment=finetune_smoke", "lora.mode=sparse_to_sparse", "save_models=false"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Mask directories of the smoke run's base model: 50 % and 70 % with its hash, and 50 %
    with the hash of another model (its weights plus one)."""
    tmp = tmp_path_factory.mktemp("mask_checks")
    base = instantiate(compose_cfg(SMOKE, tmp).model).base()
    out = {}
    for name, sparsity, other in (
        ("own50", 0.5, False),
        ("own70", 0.7, False),
        ("other50", 0.5, True),
    ):
        model = load_causal_lm(base, "cpu", torch.float32)
        if other:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        source_hash = model_hash(model)
        masks = MagnitudePruner().prune(model, None, sparsity)
        meta = {"method": "magnitude", "sparsity": sparsity, "source_hash": source_hash}
        out[name] = (save_masks(tmp / name, masks, meta), source_hash)
    return out


def test_mask_of_another_sparsity_is_refused_before_the_model_loads(saved, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the masks were checked")

    monkeypatch.setattr(finetune, "load_causal_lm", no_model)
    path, _ = saved["own70"]
    cfg = compose_cfg([*SMOKE, f"lora.mask_path={path}", "sparsity=0.5"], tmp_path)
    with pytest.raises(ConfigError) as err:
        execute(cfg)
    message = str(err.value)
    assert err.value.key == "sparsity" and err.value.value == 0.5
    assert "holds masks of sparsity 0.70" in message and "lora.mask_path" in message
    assert "\n" not in message
    assert "sparsity=0.7" in message  # what to set instead


def test_mask_of_another_model_is_refused(saved, tmp_path):
    path, other_hash = saved["other50"]
    _, own_hash = saved["own50"]
    cfg = compose_cfg([*SMOKE, f"lora.mask_path={path}"], tmp_path)
    with pytest.raises(ConfigError) as err:
        execute(cfg)
    message = str(err.value)
    assert err.value.key == "lora.mask_path" and "\n" not in message
    assert other_hash in message and own_hash in message and "lora.mask_check=false" in message
    assert not (tmp_path / "run" / "mask_report.json").exists()


def test_mask_check_false_applies_masks_of_another_model(saved, tmp_path):
    path, _ = saved["other50"]
    cfg = compose_cfg([*SMOKE, f"lora.mask_path={path}", "lora.mask_check=false"], tmp_path)
    execute(cfg)
    report = json.loads((tmp_path / "run" / "mask_report.json").read_text())
    assert report["ok"] and report["mask_sparsity"] == pytest.approx(0.5, abs=0.005)


def test_masks_of_this_model_at_this_sparsity_are_used(saved, tmp_path):
    path, _ = saved["own70"]
    cfg = compose_cfg([*SMOKE, f"lora.mask_path={path}", "sparsity=0.7"], tmp_path)
    execute(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    report = json.loads((tmp_path / "run" / "mask_report.json").read_text())
    assert report["ok"] and report["mask_sparsity"] == pytest.approx(0.7, abs=0.005)
    assert results["target_sparsity"] == 0.7


def test_check_mask_source():
    check_mask_source({"source_hash": "abc"}, "abc", "lora.mask_path", "m")
    check_mask_source({}, "abc", "lora.mask_path", "m")  # no recorded hash: nothing to compare
    with pytest.raises(ConfigError, match="source_hash 'abc'.*has hash 'def'"):
        check_mask_source({"source_hash": "abc"}, "def", "lora.mask_path", "m")


def test_check_mask_sparsity():
    masks = {"w": torch.tensor([[True, False, False, False]] * 2)}  # 6 of 8 masked: 0.75
    check_mask_sparsity(masks, {}, 0.75, "m")
    check_mask_sparsity(masks, {}, 0.745, "m")  # within the 0.01 tolerance
    with pytest.raises(ConfigError, match=r"sparsity=0.5 is not allowed.*sparsity 0.7500"):
        check_mask_sparsity(masks, {"sparsity": 0.75}, 0.5, "m")
