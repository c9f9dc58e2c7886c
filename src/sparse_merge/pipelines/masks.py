"""Masks pipeline: prune the configured model, save, validate and plot its masks, and measure
perplexity before and after (``python run.py experiment=masks pruner=wanda sparsity=0.5``).

Calibration sequences come from the task suite's training examples. Perplexity is measured on
the suite's held-out examples (the ``answer + eos`` tokens given each prompt, the tokens the
models were trained on) or on ``masks.text_file`` (``tasks.perplexity``: sliding window, every
token).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import PreTrainedTokenizerBase

from sparse_merge.errors import ConfigError
from sparse_merge.finetune.data import IGNORE_INDEX, encode_examples
from sparse_merge.hardware import Hardware
from sparse_merge.models.hf import load_causal_lm, load_tokenizer
from sparse_merge.models.source import ModelSource
from sparse_merge.pruning.base import Calibration, Pruner
from sparse_merge.pruning.mask_io import mask_dir, model_hash, save_masks
from sparse_merge.pruning.settings import MasksSettings
from sparse_merge.pruning.sparsity import measure_sparsity
from sparse_merge.pruning.stats import mask_stats, overall_sparsity, plot_mask_stats
from sparse_merge.pruning.validate import validate_masks, write_report
from sparse_merge.tasks.base import Example
from sparse_merge.tasks.perplexity import perplexity_of_file
from sparse_merge.tasks.suite import TaskSuite
from sparse_merge.tracking.io import write_json
from sparse_merge.tracking.logger import RunLogger
from sparse_merge.tracking.report import format_table

log = logging.getLogger("sparse_merge")


def heldout_examples(tasks: TaskSuite, per_task: int) -> list[Example]:
    """The held-out examples of every task (the first ``per_task`` of each; 0 = all)."""
    out = []
    for name, task in tasks.tasks.items():
        examples = getattr(task.heldout, "examples", None)
        if examples is None:
            raise ConfigError(
                "masks.text_file", None, f"a text file: task {name} has no held-out examples"
            )
        out.extend(examples[:per_task] if per_task else examples)
    return out


@torch.inference_mode()
def answer_perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    batch_size: int = 64,
) -> float:
    """exp(mean NLL) of the ``answer + eos`` tokens given their prompt, over all examples (the
    tokens the models learn; prompts are random and never trained on), in padded batches."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = encode_examples(tokenizer, examples[i : i + batch_size])
        ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        labels = batch["labels"][:, 1:].to(device)  # [b, T-1]: token t+1 predicted at t
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()  # [b, T-1, V]
        nll = nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += nll.item()
        count += int((labels != IGNORE_INDEX).sum())
    return math.exp(total / max(count, 1))


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
) -> float:
    """Prune the source's base model; returns the pruned model's perplexity."""
    if pruner is None:
        raise ConfigError("pruner", None, "a pruner (pruner=magnitude, wanda, sparsegpt, ...)")
    tokenizer = load_tokenizer(source.tokenizer())
    model = load_causal_lm(source.base(), hardware.torch_device, hardware.torch_dtype)

    def ppl() -> float:
        if settings.text_file is not None:
            window = settings.window or getattr(model.config, "max_position_embeddings", 256)
            stride = settings.stride or window // 2
            return perplexity_of_file(model, tokenizer, settings.text_file, window, stride)
        return answer_perplexity(model, tokenizer, heldout)

    heldout = [] if settings.text_file else heldout_examples(tasks, settings.heldout_examples)
    dense_ppl = ppl()
    source_hash = model_hash(model)
    calib = Calibration.from_tasks(
        tokenizer,
        tasks,
        settings.n_calibration,
        seed,
        settings.calibration_length,
        answers_only=settings.answer_loss,
    )
    start = time.perf_counter()
    masks = pruner.prune(model, calib, sparsity)
    seconds = time.perf_counter() - start
    pruned_ppl = ppl()

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
        "n_calibration": len(calib),
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
        "prune_seconds": seconds,
        "masks_dir": str(out),
        "valid": report["ok"],
    }
    logger.log({"event": "masks", **summary, **info})
    logger.summary(summary)
    write_json(run_dir / "results.json", {**summary, **metadata})
    rows = [
        {"model": "dense", "sparsity": 0.0, "perplexity": dense_ppl},
        {"model": method_label(info), "sparsity": achieved, "perplexity": pruned_ppl},
    ]
    print("\n" + format_table(rows, ["model", "sparsity", "perplexity"]) + "\n")
    log.info("masks saved to %s (%.2f s to prune)", out, seconds)
    return pruned_ppl


def run(cfg, parts: dict, run_dir: Path) -> float:
    """Pipeline entry (``pipeline: masks``)."""
    settings = MasksSettings(**OmegaConf.to_container(cfg.masks, resolve=True))
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
    )
