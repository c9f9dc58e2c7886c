"""Masks pipeline: prune the configured model, save, validate and plot its masks, and measure
perplexity before and after (``python run.py experiment=masks pruner=wanda sparsity=0.5``).

Calibration sequences come from the task suite's training examples (the ``calibration``
settings). Perplexity is measured on the suite's held-out split by ``tasks.perplexity``: every
token of a text corpus's passages (``task=python_docs``, ``task=wikitext``), or the
``answer + eos`` tokens of prompt/answer tasks (the toy tasks: prompts are random and never
learned). The dense model's perplexity is cached by the hash of its weights and of the held-out
data, so a grid of masks runs measures it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from sparse_merge.config import settings_of
from sparse_merge.errors import ConfigError
from sparse_merge.hardware import Hardware
from sparse_merge.models.hf import load_causal_lm, load_tokenizer
from sparse_merge.models.source import ModelSource
from sparse_merge.pruning.base import Calibration, Pruner, sequences_read, uses_calibration
from sparse_merge.pruning.mask_io import mask_dir, model_hash, save_masks
from sparse_merge.pruning.settings import CalibrationSettings, MasksSettings
from sparse_merge.pruning.sparsity import measure_sparsity
from sparse_merge.pruning.stats import mask_stats, overall_sparsity, plot_mask_stats
from sparse_merge.pruning.validate import validate_masks, write_report
from sparse_merge.tasks.perplexity import perplexity, task_nlls
from sparse_merge.tasks.suite import TaskSuite
from sparse_merge.tracking.io import write_json
from sparse_merge.tracking.logger import RunLogger
from sparse_merge.tracking.report import format_table

log = logging.getLogger("sparse_merge")


def heldout_perplexity(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, tasks: TaskSuite
) -> float:
    """Perplexity over every scored held-out token of every task (``tasks.perplexity``)."""
    nlls = []
    for task in tasks.tasks.values():
        nlls += task_nlls(task.heldout, model, tokenizer)
    return perplexity(nlls)


def heldout_key(tasks: TaskSuite, model: nn.Module) -> str:
    """What a held-out perplexity depends on besides the weights: the held-out datapoints (text
    and examples), the corpus windowing, the model's dtype."""
    h = hashlib.sha256()
    for name, task in tasks.tasks.items():
        held = task.heldout
        windowing = held.windowing(model) if hasattr(held, "windowing") else None
        data = getattr(held, "texts", None) or [
            (e.prompt, e.answer) for e in getattr(held, "examples", ())
        ]
        h.update(json.dumps([name, windowing, data], default=str).encode())
    h.update(str(next(model.parameters()).dtype).encode())
    return h.hexdigest()[:16]


def dense_perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: TaskSuite,
    cache: Path | None,
    weights_hash: str,
) -> float:
    """The dense model's held-out perplexity, from ``cache`` when it holds one for the same
    weights and data (written after measuring)."""
    path = None
    if cache is not None:
        path = cache / f"{weights_hash}-{heldout_key(tasks, model)}.json"
        if path.is_file():
            value = json.loads(path.read_text())["perplexity"]
            log.info("dense perplexity %.4g reused from %s", value, path)
            return value
    value = heldout_perplexity(model, tokenizer, tasks)
    if path is not None:
        write_json(path, {"perplexity": value})
    return value


def describe(pruner: Pruner) -> dict[str, str]:
    """Method, importance and granularity of ``pruner`` (its ``describe()`` when it has one)."""
    if hasattr(pruner, "describe"):
        return dict(pruner.describe())
    name = type(pruner).__name__.removesuffix("Pruner").lower()
    return {"method": name, "importance": name, "granularity": "unknown"}


def method_label(info: dict[str, str]) -> str:
    """Directory-safe label: ``wanda_row``, ``magnitude_layer``, ``sparsegpt_2of4``."""
    return f"{info['method']}_{info['granularity'].replace(':', 'of')}"


def run_masks(
    source: ModelSource,
    tasks: TaskSuite,
    pruner: Pruner,
    hardware: Hardware,
    logger: RunLogger,
    settings: MasksSettings,
    *,
    seed: int,
    sparsity: float,
    run_dir: Path,
    calibration: CalibrationSettings | None = None,
) -> float:
    """Prune the source's base model; returns the pruned model's perplexity."""
    if pruner is None:
        raise ConfigError("pruner", None, "a pruner (pruner=magnitude, wanda, sparsegpt, ...)")
    began = time.perf_counter()
    tokenizer = load_tokenizer(source.tokenizer())
    calib = None
    if uses_calibration(pruner):  # built (and checked) before the model loads
        calib = Calibration.from_settings(tokenizer, tasks, calibration, seed)
    tasks.prepare()  # data drawn (and checked) before the model loads
    model = load_causal_lm(source.base(), hardware.torch_device, hardware.torch_dtype)
    source_hash = model_hash(model)
    dense_sparsity = measure_sparsity(model).overall
    cache = Path(settings.dense_cache).expanduser() if settings.dense_cache else None
    dense_ppl = dense_perplexity(model, tokenizer, tasks, cache, source_hash)

    start = time.perf_counter()
    masks = pruner.prune(model, calib, sparsity)
    seconds = time.perf_counter() - start
    pruned_ppl = heldout_perplexity(model, tokenizer, tasks)

    info = describe(pruner)
    out = mask_dir(settings.root, settings.model_name, sparsity, method_label(info))
    metadata = {
        **info,
        "sparsity": sparsity,
        "achieved_sparsity": overall_sparsity(masks),
        "model": settings.model_name,
        "source": str(source.base()),
        "source_hash": source_hash,
        "seed": seed,
        "n_calibration": sequences_read(pruner, len(calib)) if calib is not None else 0,
        "calibration_length": calib.input_ids.shape[1] if calib is not None else 0,
    }
    save_masks(out, masks, metadata)
    report = validate_masks(model, masks, sparsity, settings.tolerance)
    write_report(out / "validation.json", report)
    stats = mask_stats(masks)
    write_json(out / "stats.json", stats)
    if settings.plots:
        plot_mask_stats(stats, out, f"{settings.model_name} {method_label(info)} {sparsity:.2f}")
    if report["nonzero_masked"] or len(report["layers"]) != len(masks):
        raise RuntimeError(f"mask validation failed: {report['problems'][:3]}")
    if not report["ok"]:  # e.g. whole heads cannot hit every target: reported, not fatal
        log.warning("masks: %s", "; ".join(report["problems"]))

    achieved = measure_sparsity(model).overall
    summary: dict[str, Any] = {
        "sparsity": achieved,
        "target_sparsity": sparsity,
        "perplexity": pruned_ppl,
        "dense_perplexity": dense_ppl,
        "dense_sparsity": dense_sparsity,
        "prune_seconds": seconds,
        "wall_seconds": time.perf_counter() - began,
        "masks_dir": str(out),
        "valid": report["ok"],
    }
    logger.log({"event": "masks", **summary, **info})
    logger.summary(summary)
    # the summary last: its `sparsity` is the measured one (the metadata's is the target, kept in
    # the masks' own metadata and as `target_sparsity`), as masks_table reports it
    write_json(run_dir / "results.json", {**metadata, **summary})
    rows = [
        {"model": "dense", "sparsity": dense_sparsity, "perplexity": dense_ppl},
        {"model": method_label(info), "sparsity": achieved, "perplexity": pruned_ppl},
    ]
    print("\n" + format_table(rows, ["model", "sparsity", "perplexity"]) + "\n")
    log.info("masks saved to %s (%.2f s to prune)", out, seconds)
    return pruned_ppl


def run(cfg, parts: dict, run_dir: Path) -> float:
    """Pipeline entry (``pipeline: masks``)."""
    settings = settings_of(cfg, "masks", MasksSettings)
    return run_masks(
        parts["model"],
        parts["task"],
        parts["pruner"],
        parts["hardware"],
        parts["logger"],
        settings,
        seed=cfg.seed,
        sparsity=cfg.sparsity,
        run_dir=run_dir,
        calibration=settings_of(cfg, "calibration", CalibrationSettings),
    )
