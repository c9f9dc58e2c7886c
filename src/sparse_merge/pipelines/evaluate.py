"""Evaluate pipeline (``pipeline=evaluate``): score the source's models on every task's held-out
split and keep the per-datapoint scores.

``python run.py pipeline=evaluate model=hf model.base=/models/m task=gsm8k`` evaluates the base
model (and the parents when two or more are given); with the toy source, its base and children.
``results.json`` holds one row per model (held-out mean per task, the weighted mean, the corpus
perplexity ``<task>/perplexity`` of each text-corpus task, exact sparsity of the prunable
weights); ``scores.json`` the score of every held-out datapoint, by model and task, in the
tasks' fixed order.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sparse_merge.errors import ConfigError
from sparse_merge.hardware import Hardware
from sparse_merge.models.hf import load_causal_lm, load_tokenizer
from sparse_merge.models.source import ModelSource
from sparse_merge.pruning.sparsity import measure_sparsity
from sparse_merge.tasks.suite import TaskSuite
from sparse_merge.tracking.io import write_json
from sparse_merge.tracking.logger import RunLogger
from sparse_merge.tracking.report import format_table

log = logging.getLogger("sparse_merge")


def models_of(source: ModelSource) -> dict[str, str | Path]:
    """The base (if the source has one) and the parents (if it has two or more), by name."""
    models: dict[str, str | Path] = {}
    for name, get in (("base", lambda: {"base": source.base()}), ("parents", source.parents)):
        try:
            models.update(get())
        except ConfigError:  # a source may give only a base, or only parents
            log.info("no %s to evaluate", name)
    if not models:
        raise ConfigError("model.base", None, "a model to evaluate (model.base or model.parents)")
    return models


def run_evaluate(
    source: ModelSource,
    tasks: TaskSuite,
    hardware: Hardware,
    logger: RunLogger,
    run_dir: Path,
) -> float:
    """Evaluate every model of ``source``; returns the first model's weighted held-out mean."""
    tokenizer = load_tokenizer(source.tokenizer())
    tasks.prepare()  # data drawn (and checked) before any model loads
    rows, scores = [], {}
    for name, path in models_of(source).items():
        model = load_causal_lm(path, hardware.torch_device, hardware.torch_dtype)
        per_task, perplexities = tasks.score_heldout(model, tokenizer)
        means = {n: s.mean().item() if s.numel() else float("nan") for n, s in per_task.items()}
        row = {**tasks.summarize(means), **perplexities}
        rows.append({"model": name, **row, "sparsity": measure_sparsity(model).overall})
        scores[name] = {n: s.tolist() for n, s in per_task.items()}
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    columns = ["model", *tasks.names, "mean", *[k for k in rows[0] if k.endswith("/perplexity")]]
    print("\n" + format_table(rows, [*columns, "sparsity"]) + "\n")
    write_json(run_dir / "results.json", {"models": rows})
    write_json(run_dir / "scores.json", scores)
    first = rows[0]  # the standard names the sweep analysis reads: the first model's
    logger.summary(
        {
            "accuracy": first["mean"],
            "sparsity": first["sparsity"],
            **{f"{r['model']}/{k}": v for r in rows for k, v in r.items() if k != "model"},
        }
    )
    return float(rows[0]["mean"])


def run(cfg, parts: dict, run_dir: Path) -> float:
    """Pipeline entry (``pipeline: evaluate``)."""
    return run_evaluate(parts["model"], parts["task"], parts["hardware"], parts["logger"], run_dir)
