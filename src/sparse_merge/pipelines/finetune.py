"""Fine-tuning pipeline: prune (or load masks, ``lora.mask_path``), evaluate, train an adapter,
merge, validate that the merged weights keep the mask (``mask_report.json``), evaluate again,
save the merged model, the adapter and the masks.

Runs on one process or data parallel under ``accelerate launch``; only the main process
evaluates and writes files, the others train and wait. The main process holds the run
directory's lock for the whole run (a second process in the same folder stops at once). A
resume removes what a killed run was writing (temporary files of atomic writes) and refuses,
before any model loads, a checkpoint made with other settings (``result_settings``: every
config value that shapes the result, by key).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from sparse_merge.config import settings_of, shaping_settings
from sparse_merge.errors import ConfigError
from sparse_merge.finetune.adapter import Adapter, count_parameters
from sparse_merge.finetune.lora import check_adapter_targets
from sparse_merge.finetune.settings import FinetuneSettings
from sparse_merge.finetune.trainer import Trainer
from sparse_merge.hardware import Hardware
from sparse_merge.models.hf import load_causal_lm, load_tokenizer, save_causal_lm
from sparse_merge.models.source import ModelSource
from sparse_merge.pipelines.masks import describe
from sparse_merge.pruning.base import Calibration, Masks, Pruner, uses_calibration
from sparse_merge.pruning.mask_io import (
    MASKS_FILE,
    apply_masks,
    check_mask_source,
    check_mask_sparsity,
    load_masks,
    model_hash,
    save_masks,
)
from sparse_merge.pruning.settings import CalibrationSettings
from sparse_merge.pruning.sparsity import measure_sparsity
from sparse_merge.pruning.validate import validate_masks, write_report
from sparse_merge.tasks.suite import TaskSuite
from sparse_merge.tracking.io import (
    is_main_process,
    lock_run_dir,
    remove_temp_files,
    write_json,
)
from sparse_merge.tracking.logger import RunLogger
from sparse_merge.tracking.report import format_table

log = logging.getLogger("sparse_merge")
MULTI_PROCESS = True  # data parallel under a launch (app.check_processes)


def _masks_from_file(path: str | None, sparsity: float) -> tuple[Masks | None, dict]:
    """Masks and metadata saved by ``save_masks`` (``lora.mask_path``), or (None, {}); masks
    whose sparsity is not the run's ``sparsity`` are refused (results would report a target
    the masks do not have)."""
    if not path:
        return None, {}
    if not (Path(path) / MASKS_FILE).exists():
        raise ConfigError("lora.mask_path", path, f"a directory holding {MASKS_FILE}")
    masks, meta = load_masks(path)
    check_mask_sparsity(masks, meta, sparsity, f"lora.mask_path={path!r}")
    return masks, meta


def _mask_metadata(pruner: Pruner, model: nn.Module, source, start: str, sparsity: float) -> dict:
    """Where masks computed in this run come from (saved with them, as the masks pipeline does)."""
    return {
        **describe(pruner),
        "sparsity": sparsity,
        "model": f"{getattr(source, 'name', 'model')}/{start}",
        "source_hash": model_hash(model),
    }


def _needs_calibration(pruner: Pruner | None, adapter: Adapter) -> bool:
    """Whether the run builds a calibration set: for a pruner that uses one (unless
    ``lora.mask_path`` supplies the masks) or for an adapter that scores on one."""
    from_pruner = not adapter.mask_path and uses_calibration(pruner)
    return from_pruner or getattr(adapter, "uses_calibration", False)


def _start_model(source: ModelSource, start: str):
    if start == "base":
        return source.base()
    parents = source.parents()
    if start not in parents:
        raise ConfigError("finetune.start", start, "'base' or one of " + ", ".join(parents))
    return parents[start]


def run_finetune(
    source: ModelSource,
    tasks: TaskSuite,
    pruner: Pruner | None,
    adapter: Adapter,
    hardware: Hardware,
    logger: RunLogger,
    settings: FinetuneSettings,
    *,
    seed: int,
    sparsity: float,
    run_dir: Path,
    save_models: bool = True,
    resume: bool = False,
    calibration: CalibrationSettings | None = None,
    run_settings: Mapping[str, Any] | None = None,
) -> float | None:
    """Fine-tune the source's ``settings.start`` model with ``adapter`` on ``tasks``' training
    split; returns the mean held-out score of the merged model (None on non-main processes).
    ``run_settings``: the config values that shape the result besides ``finetune.*``, ``seed``
    and ``sparsity`` (``result_settings``), stored in the checkpoint; a resume must match them."""
    began = time.perf_counter()
    trainer = Trainer(
        settings,
        hardware,
        logger,
        seed,
        checkpoint_dir=run_dir / "checkpoints",
        run_settings={"sparsity": sparsity, **(run_settings or {})},
    )
    main = trainer.is_main_process
    if resume:
        if main:
            remove_temp_files(run_dir)  # what a killed run was writing when it stopped
        trainer.check_resume()  # a checkpoint of other settings is refused before the model loads
    masks, mask_meta = _masks_from_file(adapter.mask_path, sparsity)
    path = _start_model(source, settings.start)
    tokenizer = load_tokenizer(source.tokenizer())
    tasks.prepare(training=True)  # data drawn (and checked) before the model loads
    calib: Calibration | None = None
    uses_calib = getattr(adapter, "uses_calibration", False)  # lora=row_sparse scores rows on it
    if _needs_calibration(pruner, adapter):  # before the model loads
        calib = Calibration.from_settings(tokenizer, tasks, calibration, seed)
    model = load_causal_lm(path, hardware.torch_device, hardware.torch_dtype)
    check_adapter_targets(adapter, model)  # lora.target_modules: refused before any pruning

    if masks is not None:
        if adapter.mask_check:  # masks of another model of the same shape pass every other check
            hint = ", or set lora.mask_check=false to apply them anyway"
            check_mask_source(
                mask_meta, model_hash(model), "lora.mask_path", adapter.mask_path, hint
            )
        apply_masks(model, masks)
    elif pruner is not None:
        mask_meta = _mask_metadata(pruner, model, source, settings.start, sparsity)
        masks = pruner.prune(model, calib, sparsity)
    pruned_sparsity = measure_sparsity(model).overall

    before = tasks.evaluate_heldout(model, tokenizer) if main else {}
    if main:
        logger.log({"event": "pruned", "sparsity": pruned_sparsity, **before}, console=True)

    per_task = settings.n_train or math.ceil(trainer.examples_needed() / len(tasks.names))
    examples = tasks.train_examples(per_task, seed)
    wrapped = adapter.wrap(model, masks, calib=calib) if uses_calib else adapter.wrap(model, masks)
    trainable = count_parameters(wrapped)
    result = trainer.train(wrapped, tokenizer, examples, resume=resume)
    inner = trainer.unwrap(wrapped)

    metric = None
    if main:
        if save_models:
            adapter.save(inner, run_dir / "adapter")
            if masks is not None:
                save_masks(run_dir / "masks", masks, mask_meta)
        merged = adapter.merge(inner)
        report = validate_masks(merged, masks) if masks is not None else None
        if report is not None:
            write_report(run_dir / "mask_report.json", report)
        after = tasks.evaluate_heldout(merged, tokenizer)
        achieved = measure_sparsity(merged).overall
        rows = [
            {"model": "pruned", **before, "sparsity": pruned_sparsity},
            {"model": f"tuned ({adapter.name})", **after, "sparsity": achieved},
        ]
        perplexities = [k for k in after if k.endswith("/perplexity")]
        columns = ["model", *tasks.names, "mean", *perplexities, "sparsity"]
        print("\n" + format_table(rows, columns) + "\n")
        metrics = {
            "accuracy": after["mean"],
            "accuracy_before": before["mean"],
            **{f"accuracy/{k}": after[k] for k in tasks.names},
            **{f"accuracy_before/{k}": before[k] for k in tasks.names},
            **{k: after[k] for k in perplexities},
            **{f"{k}_before": before[k] for k in perplexities},
            "loss": result.final_loss,
            "throughput": result.samples_per_s,
            "tokens_per_s": result.tokens_per_s,
            "peak_memory_mb": result.peak_memory_mb,
            "train_seconds": result.seconds,
            "wall_seconds": time.perf_counter() - began,
            "sparsity": achieved,
            "sparsity_before": pruned_sparsity,
            "masked_nonzeros": report["nonzero_masked"] if report else 0,
            "trainable_params": trainable,
            "steps": result.steps,
            "processes": trainer.accelerator.num_processes,
            "method": adapter.name,
        }
        write_json(run_dir / "results.json", {"seed": seed, "target_sparsity": sparsity, **metrics})
        logger.log({"event": "finetuned", **metrics}, console=True)
        logger.summary(metrics)
        if save_models:
            out = save_causal_lm(merged, run_dir / "models" / "finetuned", tokenizer)
            log.info("saved the merged model to %s", out)
        metric = float(after["mean"])
    trainer.accelerator.wait_for_everyone()
    return metric


def result_settings(cfg, parts: dict) -> dict[str, Any]:
    """The config values, by key, that shape a fine-tuning result besides ``finetune.*``,
    ``seed`` and ``sparsity`` (the trainer and ``run_finetune`` add those): the model, the
    tasks, the adapter (``lora``), the pruner (unless ``lora.mask_path`` supplies the masks),
    the calibration set (when the run builds one) and ``hardware.dtype``. Logging, threads, the
    device, output paths, ``save_models`` and the model cache are left out: a resumed run may
    change them."""
    groups = ["model", "task", "lora"]
    if not parts["lora"].mask_path:
        groups.append("pruner")
    if _needs_calibration(parts["pruner"], parts["lora"]):
        groups.append("calibration")
    return shaping_settings(cfg, groups, parts["model"])


def run(cfg, parts: dict, run_dir: Path) -> float | None:
    """Pipeline entry (``pipeline: finetune``)."""
    with lock_run_dir(run_dir, main=is_main_process()):  # one process per run directory
        settings = settings_of(cfg, "finetune", FinetuneSettings)
        calibration = settings_of(cfg, "calibration", CalibrationSettings)
        return run_finetune(
            parts["model"],
            parts["task"],
            parts["pruner"],
            parts["lora"],
            parts["hardware"],
            parts["logger"],
            settings,
            seed=cfg.seed,
            sparsity=cfg.sparsity,
            run_dir=run_dir,
            save_models=cfg.save_models,
            resume=cfg.resume,
            calibration=calibration,
            run_settings=result_settings(cfg, parts),
        )
