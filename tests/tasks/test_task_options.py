"""Every benchmark works in the merge pipeline by switching ``task=`` (local fixture files)."""

from __future__ import annotations

import json
import math

import pytest

from sparse_merge.app import execute

from ..conftest import compose_cfg
from .conftest import FIXTURES

SMALL_MODEL = [  # the smoke experiment's tiny toy parents
    "model.name=toy-llama-smoke",
    "model.arch={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2}",
    "model.base_steps=30",
    "model.child_steps=20",
    "model.batch_size=16",
]
OPTIONS = {
    "gsm8k": [
        f"task.tasks.gsm8k.data_files={{train: {FIXTURES}/gsm8k_train.jsonl, test: {FIXTURES}/gsm8k_test.jsonl}}",
        "task.tasks.gsm8k.n_select=3",
        "task.tasks.gsm8k.n_heldout=2",
        "task.tasks.gsm8k.num_fewshot=1",
        "task.tasks.gsm8k.max_new_tokens=4",
    ],
    "mbpp": [
        f"task.tasks.mbpp.data_files={FIXTURES}/mbpp.jsonl",
        "task.tasks.mbpp.n_select=2",
        "task.tasks.mbpp.n_heldout=2",
        "task.tasks.mbpp.num_fewshot=1",
        "task.tasks.mbpp.max_new_tokens=4",
    ],
    "humaneval": [
        f"task.tasks.humaneval.data_files={FIXTURES}/humaneval.jsonl",
        "task.tasks.humaneval.n_select=2",
        "task.tasks.humaneval.n_heldout=2",
        "task.tasks.humaneval.max_new_tokens=4",
    ],
    "boolq": [
        f"task.tasks.boolq.data_files={{train: {FIXTURES}/boolq_train.parquet, validation: {FIXTURES}/boolq_validation.parquet}}",
        "task.tasks.boolq.n_select=3",
        "task.tasks.boolq.n_heldout=2",
    ],
    "hellaswag": [
        f"task.tasks.hellaswag.data_files={FIXTURES}/hellaswag.jsonl",
        "task.tasks.hellaswag.n_select=3",
        "task.tasks.hellaswag.n_heldout=2",
    ],
    "bfcl": [
        f"task.tasks.bfcl.questions={FIXTURES}/bfcl_simple.json",
        f"task.tasks.bfcl.answers={FIXTURES}/bfcl_simple_answers.json",
        "task.tasks.bfcl.n_select=2",
        "task.tasks.bfcl.n_heldout=2",
        "task.tasks.bfcl.max_new_tokens=4",
    ],
    "wikitext": [
        f"task.tasks.wikitext.data_files={FIXTURES}/corpus.txt",
        "task.tasks.wikitext.chunk_chars=100",
        "task.tasks.wikitext.n_select=3",
        "task.tasks.wikitext.n_heldout=2",
    ],
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_merge_pipeline_runs_with_the_task(option, tmp_path):
    cfg = compose_cfg(
        [f"task={option}", *SMALL_MODEL, *OPTIONS[option], "evolver=one_shot", "save_models=false"],
        tmp_path,
    )
    metric = execute(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(results["models"]) >= 3  # both parents and the merged model
    for row in results["models"]:
        assert 0.0 <= row[option] <= 1.0 and row["mean"] == pytest.approx(row[option])
    headline = next(r for r in results["models"] if r["model"] == results["headline"])
    assert metric == pytest.approx(headline["mean"]) == pytest.approx(results["accuracy"])


@pytest.mark.parametrize("option", ["boolq", "gsm8k", "wikitext"])
def test_finetune_pipeline_runs_with_the_task(option, tmp_path):
    from omegaconf import open_dict

    # long enough for every fixture example: a longer one loses its answer to truncation
    overrides = [
        "experiment=finetune_smoke",
        f"task={option}",
        *OPTIONS[option],
        "finetune.max_length=512",
        "calibration.n=4",  # the fixture files hold a handful of training rows
    ]
    cfg = compose_cfg([*overrides, "save_models=false", "hardware.num_threads=1"], tmp_path)
    with open_dict(cfg):  # the smoke experiment sizes the toy tasks, which are not in this suite
        for toy in ("addition", "reversal"):
            cfg.task.tasks.pop(toy, None)
    execute(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in (f"accuracy/{option}", f"accuracy_before/{option}"):
        assert 0.0 <= results[key] <= 1.0
    assert math.isfinite(results["loss"])


def test_evaluate_pipeline_keeps_per_datapoint_scores(tmp_path):
    cfg = compose_cfg(
        ["pipeline=evaluate", "task=math_code", *SMALL_MODEL, *OPTIONS["gsm8k"], *OPTIONS["mbpp"]],
        tmp_path,
    )
    metric = execute(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    scores = json.loads((tmp_path / "run" / "scores.json").read_text())
    assert [r["model"] for r in results["models"]] == ["base", "math", "code"]
    for row in results["models"]:
        per = scores[row["model"]]
        assert len(per["gsm8k"]) == 2 and len(per["mbpp"]) == 2
        assert row["gsm8k"] == pytest.approx(sum(per["gsm8k"]) / 2)
        assert row["mean"] == pytest.approx((row["gsm8k"] + row["mbpp"]) / 2)
    assert metric == pytest.approx(results["models"][0]["mean"])
    # the standard names the sweep analysis reads from summary.json: the first model's
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["accuracy"] == results["models"][0]["mean"]
    assert summary["sparsity"] == results["models"][0]["sparsity"]


def test_masks_pipeline_runs_with_the_task(tmp_path):
    overrides = ["experiment=masks", "task=boolq", *SMALL_MODEL, *OPTIONS["boolq"]]
    cfg = compose_cfg([*overrides, "calibration.n=4", "masks.plots=false"], tmp_path)
    assert math.isfinite(execute(cfg))


@pytest.mark.parametrize("pipeline", ["merge", "finetune", "evaluate"])
def test_too_little_data_fails_before_any_model_loads(pipeline, tmp_path, monkeypatch):
    from sparse_merge.errors import ConfigError

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(f"sparse_merge.pipelines.{pipeline}.load_causal_lm", never)
    overrides = [*OPTIONS["wikitext"][:-1], "task.tasks.wikitext.n_heldout=500"]
    cfg = compose_cfg([f"pipeline={pipeline}", "task=wikitext", *SMALL_MODEL, *overrides], tmp_path)
    with pytest.raises(ConfigError, match="wikitext.n_heldout=500"):
        execute(cfg)
