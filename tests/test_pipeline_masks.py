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
    "calibration.n=16",
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


def test_results_and_masks_table_report_the_measured_sparsity(tmp_path):
    """Whole heads cannot hit 30 %: results.json and the masks table give the sparsity reached
    (as summary.json does), not the target (results.json's metadata used to overwrite it)."""
    from sparse_merge.analysis import masks_table

    cfg = compose_cfg(["experiment=masks", "pruner=structured", "sparsity=0.3", *SMALL], tmp_path)
    with open_dict(cfg):
        cfg.calibration.n = 8
    execute(cfg)
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(exist_ok=True)  # a run folder as Hydra leaves it
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\n")
    summary = json.loads((run_dir / "summary.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    measured = summary["sparsity"]
    assert abs(measured - 0.3) > 0.01  # the heads' granularity misses the target
    assert results["sparsity"] == measured and results["target_sparsity"] == 0.3
    (row,) = masks_table.gather(run_dir)
    assert row["sparsity"] == measured
    assert f"({measured:.3f})" in masks_table.markdown([row])


def test_bad_masks_value_fails_before_work(tmp_path):
    from hydra.errors import ConfigCompositionException

    cfg = compose_cfg(["experiment=masks", "calibration.n=0", *SMALL[:-1]], tmp_path)
    with pytest.raises(Exception, match="calibration.n"):
        execute(cfg)
    with pytest.raises(ConfigCompositionException, match="lenght"):  # a misspelt key
        compose_cfg(["experiment=masks", "calibration.lenght=8"], tmp_path)


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


def test_dense_row_is_measured_and_its_perplexity_reused(masks_run, tmp_path):
    """A second run on the same weights and data reads the dense perplexity from the cache."""
    run_dir, _, first_cfg = masks_run
    first = json.loads((run_dir / "results.json").read_text())
    assert first["dense_sparsity"] == 0.0 and first["wall_seconds"] > 0
    cfg = compose_cfg(["experiment=masks", "pruner=magnitude", "sparsity=0.3", *SMALL], tmp_path)
    with open_dict(cfg):  # the same model and dense-perplexity caches as the first run
        cfg.model.cache_dir = first_cfg.model.cache_dir
        cfg.masks.dense_cache = first_cfg.masks.dense_cache
    cached = list(Path(cfg.masks.dense_cache).glob("*.json"))
    assert len(cached) == 1
    # a planted value proves the second run reads the cache instead of measuring again
    cached[0].write_text(json.dumps({"perplexity": 123.5}))
    execute(cfg)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["dense_perplexity"] == 123.5


def test_corpus_perplexity_and_too_small_data(masks_run, tmp_path, monkeypatch):
    """task=wikitext on one local file: corpus perplexity over every held-out token; a file too
    small for the calibration set is refused before any model loads."""
    from sparse_merge.errors import ConfigError

    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"{i}+{i + 7}={2 * i + 7} rev:abc=cba\n" for i in range(160)))
    corpus = [
        "task=wikitext",
        f"task.tasks.wikitext.data_files={text}",
        "task.tasks.wikitext.chunk_chars=200",
        "task.tasks.wikitext.n_select=2",
        "task.tasks.wikitext.n_heldout=3",
        "task.tasks.wikitext.window=64",
    ]
    small = [o for o in SMALL if not o.startswith("task.")]
    cfg = compose_cfg(["experiment=masks", "pruner=wanda", *corpus, *small], tmp_path)
    with open_dict(cfg):
        cfg.model.cache_dir = masks_run[2].model.cache_dir
        cfg.calibration.n = 8
    metric = execute(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["perplexity"] == metric and results["dense_perplexity"] > 1.0
    # 3585 characters make 19 passages: 5 evaluated, 14 to train on, fewer than 64
    cfg = compose_cfg(["experiment=masks", "pruner=wanda", *corpus, *small], tmp_path / "b")
    with open_dict(cfg):
        cfg.model.cache_dir = masks_run[2].model.cache_dir
        cfg.calibration.n = 64

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("sparse_merge.pipelines.masks.load_causal_lm", never)
    with pytest.raises(ConfigError, match="calibration.n.*14 training rows"):
        execute(cfg)


def test_answer_perplexity_matches_one_sequence_at_a_time(tiny_llama, tokenizer):
    """Batched, padded scoring of answer + eos tokens equals token_nlls on each example alone."""
    from sparse_merge.tasks.base import Example
    from sparse_merge.tasks.perplexity import answer_nlls, perplexity, token_nlls

    examples = [Example("12+3=", "15"), Example("rev:abcd=", "dcba"), Example("7+8=", "15")]
    nlls = []
    for e in examples:
        prompt = tokenizer(e.prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(e.answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([*prompt, *answer, tokenizer.eos_token_id])
        nll = token_nlls(tiny_llama, ids, window=ids.numel() + 1, stride=ids.numel())
        nlls.append(nll[-(len(answer) + 1) :])
    got = answer_nlls(tiny_llama, tokenizer, examples, batch_size=2)
    assert [len(g) for g in got] == [len(n) for n in nlls]
    assert perplexity(got) == pytest.approx(perplexity(nlls), rel=1e-5)


def test_metadata_counts_the_calibration_sequences_the_pruner_reads():
    """A gradient score reads n_batches * batch_size sequences (32 by default), not all of
    calibration.n, which the metadata recorded."""
    from sparse_merge.pruning.base import Calibration, sequences_read
    from sparse_merge.pruning.importance import TaylorImportance
    from sparse_merge.pruning.magnitude import MagnitudePruner
    from sparse_merge.pruning.scored import ScorePruner
    from sparse_merge.pruning.wanda import WandaPruner

    ids = torch.ones(64, 4, dtype=torch.long)
    calib = Calibration(ids, torch.ones_like(ids))
    assert sequences_read(ScorePruner(TaylorImportance(), "row"), len(calib)) == 32
    assert sequences_read(WandaPruner(n_calibration=48), len(calib)) == 48
    assert sequences_read(WandaPruner(n_calibration=128), len(calib)) == 64
    assert sequences_read(MagnitudePruner(), len(calib)) == 0
