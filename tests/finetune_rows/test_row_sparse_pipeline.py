"""``lora=row_sparse`` through the fine-tuning pipeline (the same run(cfg) the CLI calls)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sparse_merge.app import execute
from sparse_merge.errors import ConfigError
from sparse_merge.finetune.row_sparse import load_row_update
from sparse_merge.models.hf import load_causal_lm, load_tokenizer
from sparse_merge.tasks.mt_bench import generate_answers, load_questions, write_answers

from ..conftest import compose_cfg

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SMOKE = ["experiment=finetune_smoke", "hardware.num_threads=1", "lora.n_batches=1"]


def _run(tmp_path_factory, name: str, overrides: list[str]):
    tmp = tmp_path_factory.mktemp(name)
    cfg = compose_cfg([*SMOKE, "lora=row_sparse", *overrides], tmp)
    return tmp / "run", execute(cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {
        "taylor": _run(tmp_path_factory, "taylor", []),
        "nf4": _run(
            tmp_path_factory,
            "nf4",
            ["lora.importance=zo_taylor", "lora.n_estimate=4", "lora.quantize=nf4"]
            + ["lora.init=residual", "lora.block_size=32", "sparsity=0.0"],
        ),
    }


def test_pruned_base_keeps_every_masked_weight_zero(runs):
    run_dir, metric = runs["taylor"]
    results = json.loads((run_dir / "results.json").read_text())
    report = json.loads((run_dir / "mask_report.json").read_text())
    assert report["ok"] and report["masked"] > 0 and results["masked_nonzeros"] == 0
    assert results["sparsity"] == pytest.approx(0.5, abs=0.005)
    assert results["method"] == "row_sparse_taylor" and metric == results["accuracy"]


def test_summary_has_the_comparison_keys(runs):
    for run_dir, _ in runs.values():
        summary = json.loads((run_dir / "summary.json").read_text())
        for key in ("accuracy", "train_seconds", "peak_memory_mb", "throughput"):
            assert isinstance(summary[key], float), key
        assert summary["trainable_params"] > 0 and summary["steps"] == 6


def test_saved_update_holds_the_trained_rows_and_reproduces_the_merged_model(runs):
    run_dir, _ = runs["nf4"]
    update = run_dir / "adapter" / "row_update.safetensors"
    tensors = load_file(str(update))
    summary = json.loads((run_dir / "summary.json").read_text())
    deltas = sum(t.numel() for k, t in tensors.items() if k.endswith(".delta"))
    assert deltas == summary["trainable_params"] and summary["method"] == "row_sparse_zo_taylor"
    cache = run_dir.parent.parent / "model_cache"
    base_dir = next(p.parent for p in cache.rglob("config.json") if p.parent.name == "base")
    base = load_causal_lm(base_dir, torch.device("cpu"), torch.float32)
    load_row_update(base, update)
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "models" / "finetuned")
    tuned = dict(merged.named_parameters())
    assert all(torch.equal(p, tuned[n]) for n, p in base.named_parameters())


def test_bad_row_sparse_value_fails_before_any_model_is_loaded(tmp_path):
    cfg = compose_cfg([*SMOKE, "lora=row_sparse", "lora.importance=fisher"], tmp_path)
    with pytest.raises(ConfigError) as err:
        execute(cfg)
    assert err.value.key == "lora.importance"


def test_merged_model_answers_mt_bench_questions(runs, tmp_path):
    run_dir, _ = runs["taylor"]
    model_dir = run_dir / "models" / "finetuned"
    model = load_causal_lm(model_dir, torch.device("cpu"), torch.float32)
    tokenizer = load_tokenizer(model_dir)
    questions = load_questions(FIXTURES / "mt_bench_questions.jsonl")
    answers = generate_answers(model, tokenizer, questions, "row_sparse", max_new_tokens=4)
    path = write_answers(answers, tmp_path / "model_answer" / "row_sparse.jsonl")
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["question_id"] for x in lines] == sorted(q["question_id"] for q in questions)
    for line, q in zip(lines, sorted(questions, key=lambda q: q["question_id"])):
        assert len(line["choices"][0]["turns"]) == len(q["turns"])  # every turn answered
