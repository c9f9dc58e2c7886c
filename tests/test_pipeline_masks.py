"""The masks pipeline end to end on tiny settings, through the same execute(cfg) the CLI calls."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparse_merge.app import execute
from sparse_merge.pruning.mask_io import METADATA_FIELDS, apply_masks, load_masks
from sparse_merge.pruning.validate import validate_masks

from .conftest import compose_cfg

SMALL = [
    "model.name=toy-llama-smoke",
    "model.arch={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2}",
    "model.base_steps=30",
    "model.child_steps=20",
    "model.batch_size=16",
    "task.tasks.reversal.n_heldout=16",
    "masks.n_calibration=16",
]


@pytest.fixture(scope="module")
def masks_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("masks")
    cfg = compose_cfg(["experiment=masks", "pruner=wanda", "sparsity=0.5", *SMALL], tmp)
    metric = execute(cfg)
    return tmp / "run", metric, cfg


def test_masks_pipeline_saves_validated_masks_and_reports(masks_run):
    run_dir, metric, cfg = masks_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert summary["perplexity"] == metric and metric > 1.0
    assert summary["dense_perplexity"] > 1.0
    out = Path(summary["masks_dir"])
    assert out == run_dir / "masks" / "toy-llama-smoke" / "sparsity50_wanda_row"
    masks, meta = load_masks(out)
    assert set(METADATA_FIELDS) <= set(meta)
    assert meta["method"] == "wanda" and meta["sparsity"] == 0.5 and meta["n_calibration"] == 16
    report = json.loads((out / "validation.json").read_text())
    assert report["ok"] and report["nonzero_masked"] == 0
    assert {p.name for p in out.glob("*.png")} == {
        "sparsity_histogram.png",
        "sparsity_by_layer.png",
    }
    assert len(json.loads((out / "stats.json").read_text())) == len(masks) == 14


def test_saved_masks_reprune_the_base_exactly(masks_run):
    run_dir, _, cfg = masks_run
    summary = json.loads((run_dir / "summary.json").read_text())
    masks, meta = load_masks(summary["masks_dir"])
    base = AutoModelForCausalLM.from_pretrained(meta["source"])
    assert not validate_masks(base, masks)["ok"]  # dense base: masked weights are not zero
    apply_masks(base, masks)
    report = validate_masks(base, masks, expected_sparsity=0.5)
    assert report["ok"] and report["weight_sparsity"] == pytest.approx(0.5, abs=1e-3)
    row = base.model.layers[0].self_attn.q_proj.weight
    assert ((row == 0).sum(1) == row.shape[1] // 2).all()  # Wanda: exact per row
    assert torch.isfinite(base(torch.tensor([[5, 6, 7]])).logits).all()


def test_bad_masks_value_fails_before_work(tmp_path):
    cfg = compose_cfg(["experiment=masks", "masks.n_calibration=0", *SMALL[:-1]], tmp_path)
    with pytest.raises(Exception, match="masks.n_calibration"):
        execute(cfg)


@pytest.mark.slow
def test_multirun_grid(tmp_path):
    """python run.py -m experiment=masks sparsity=0.3,0.6 pruner=magnitude,random (tiny model)."""
    root = Path(__file__).resolve().parents[1]
    args = [f"{o.split('=', 1)[0]}={o.split('=', 1)[1]}" for o in SMALL]
    cmd = [
        sys.executable,
        "run.py",
        "-m",
        "experiment=masks",
        "sparsity=0.3,0.6",
        "pruner=magnitude,random",
        f"model.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *args,
    ]
    subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True)
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert len(summaries) == 4
    got = sorted(round(json.loads(s.read_text())["sparsity"], 2) for s in summaries)
    assert got == [0.3, 0.3, 0.6, 0.6]
