"""The masks pipeline end to end on tiny settings, through the same execute(cfg) the CLI calls."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
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
    assert summary["valid"] is True
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
    from hydra.errors import ConfigCompositionException

    cfg = compose_cfg(["experiment=masks", "masks.n_calibration=0", *SMALL[:-1]], tmp_path)
    with pytest.raises(Exception, match="masks.n_calibration"):
        execute(cfg)
    with pytest.raises(ConfigCompositionException, match="n_calibraton"):  # a misspelt key
        compose_cfg(["experiment=masks", "masks.n_calibraton=8"], tmp_path)


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
    summaries = sorted((tmp_path / "sweep").rglob("summary.json"))  # subdirs hold "/"
    assert len(summaries) == 4
    got = sorted(round(json.loads(s.read_text())["sparsity"], 2) for s in summaries)
    assert got == [0.3, 0.3, 0.6, 0.6]


def test_perplexity_on_a_text_file(masks_run, tmp_path):
    """masks.text_file: sliding-window perplexity of a text instead of the held-out answers."""
    text = tmp_path / "heldout.txt"
    text.write_text("12+34=46\nrev:abc=cba\n" * 20, encoding="utf-8")
    cfg = compose_cfg(
        ["experiment=masks", "pruner=magnitude", f"masks.text_file={text}", *SMALL], tmp_path
    )
    with open_dict(cfg):  # the same model cache as the first run
        cfg.model.cache_dir = masks_run[2].model.cache_dir
    metric = execute(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["perplexity"] == metric and summary["dense_perplexity"] > 1.0


def test_answer_perplexity_matches_one_sequence_at_a_time(tiny_llama, tokenizer):
    """Batched, padded scoring of answer + eos tokens equals token_nlls on each example alone."""
    import math

    from sparse_merge.pipelines.masks import answer_perplexity
    from sparse_merge.tasks.base import Example
    from sparse_merge.tasks.perplexity import token_nlls

    examples = [Example("12+3=", "15"), Example("rev:abcd=", "dcba"), Example("7+8=", "15")]
    nlls = []
    for e in examples:
        prompt = tokenizer(e.prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(e.answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([*prompt, *answer, tokenizer.eos_token_id])
        nll = token_nlls(tiny_llama, ids, window=ids.numel() + 1, stride=ids.numel())
        nlls.append(nll[-(len(answer) + 1) :])
    expected = math.exp(torch.cat(nlls).double().mean().item())
    got = answer_perplexity(tiny_llama, tokenizer, examples, batch_size=2)
    assert got == pytest.approx(expected, rel=1e-5)
