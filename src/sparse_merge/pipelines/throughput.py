"""Throughput pipeline: training speed and memory of one adapter setting at one batch size.

Prunes the source's base model to ``sparsity`` with the configured pruner, wraps it with the
configured adapter (``lora.mode``: dense, sparse_to_dense, sparse_to_sparse), and runs the
fine-tuning trainer's own loop for ``throughput.warmup_steps + throughput.steps`` optimiser
steps at ``finetune.batch_size``; the last ``throughput.steps`` are timed
(``finetune/throughput.py`` says exactly what is measured). No evaluation, nothing saved but
``results.json``: samples/s, tokens/s, step time and peak memory. The sweep over batch sizes,
modes and sparsities is ``experiment=sweep_throughput``; ``python -m sparse_merge.analysis``
turns it into a CSV and one plot per mode.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from sparse_merge.config import settings_of
from sparse_merge.errors import ConfigError
from sparse_merge.finetune.adapter import Adapter, count_parameters
from sparse_merge.finetune.data import encode_examples
from sparse_merge.finetune.settings import FinetuneSettings
from sparse_merge.finetune.throughput import PeakRss, StepClock, Throughput, ThroughputSettings
from sparse_merge.finetune.trainer import Trainer
from sparse_merge.hardware import Hardware
from sparse_merge.models.hf import load_causal_lm, load_tokenizer
from sparse_merge.models.source import ModelSource
from sparse_merge.pruning.base import Calibration, Pruner, uses_calibration
from sparse_merge.pruning.settings import CalibrationSettings
from sparse_merge.pruning.sparsity import measure_sparsity
from sparse_merge.tasks.base import Example
from sparse_merge.tasks.suite import TaskSuite
from sparse_merge.tracking.io import write_json
from sparse_merge.tracking.logger import RunLogger
from sparse_merge.tracking.report import format_table

MULTI_PROCESS = True  # data parallel under a launch (app.check_processes)


def trainer_settings(finetune: FinetuneSettings, settings: ThroughputSettings) -> FinetuneSettings:
    """The fine-tuning settings with the measurement's step count, a clock tick every step and
    no checkpoints (file writes are not training)."""
    return dataclasses.replace(
        finetune,
        steps=settings.warmup_steps + settings.steps,
        log_every=1,
        checkpoint_every=0,
    )


def measure(
    trainer: Trainer,
    clock: StepClock,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    settings: ThroughputSettings,
) -> Throughput:
    """Train ``model`` with ``trainer`` (whose logger is ``clock``) and time its last
    ``settings.steps`` steps; samples and tokens are those of the timed steps' batches."""
    s, acc = trainer.settings, trainer.accelerator
    if s.steps != settings.warmup_steps + settings.steps or s.log_every != 1:
        raise ValueError("the trainer needs trainer_settings(...): one clock tick per step")
    device = acc.device
    rss = PeakRss()

    def warmed_up(done: int) -> None:  # memory is measured over the timed steps
        if done == settings.warmup_steps:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            else:
                rss.start()

    clock.on_step = warmed_up
    trainer.train(model, tokenizer, examples)
    rss.stop()
    if acc.is_main_process and len(clock.ends) != s.steps:  # the clock relies on the log call
        raise RuntimeError(f"the trainer logged {len(clock.ends)} of {s.steps} steps")
    samples = tokens = 0
    for step in range(settings.warmup_steps, s.steps):  # the batches the timed steps drew
        for micro in range(s.grad_accum):
            batch = encode_examples(
                tokenizer, trainer.batch_examples(examples, step, micro), s.max_length
            )
            samples += batch["input_ids"].shape[0]
            tokens += int(batch["attention_mask"].sum())
    counts = acc.reduce(torch.tensor([samples, tokens], device=device), "sum").tolist()
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:
        peak, kind = rss.delta_mb, "cpu_peak_rss_delta" if rss.delta_mb is not None else "none"
    return Throughput(
        batch_size=s.batch_size,
        warmup_steps=settings.warmup_steps,
        steps=settings.steps,
        samples=int(counts[0]),
        tokens=int(counts[1]),
        step_seconds=clock.step_seconds()[settings.warmup_steps - 1 :],
        peak_memory_mb=peak,
        memory_measure=kind,
    )


def run_throughput(
    source: ModelSource,
    tasks: TaskSuite,
    pruner: Pruner | None,
    adapter: Adapter,
    hardware: Hardware,
    logger: RunLogger,
    finetune: FinetuneSettings,
    settings: ThroughputSettings,
    *,
    seed: int,
    sparsity: float,
    run_dir: Path,
    calibration: CalibrationSettings | None = None,
) -> float | None:
    """Measure training throughput of ``adapter`` on the pruned base; returns samples/s (None
    on non-main processes)."""
    began = time.perf_counter()
    if adapter.mask_path:
        raise ConfigError("lora.mask_path", adapter.mask_path, "null: masks come from the pruner")
    clock = StepClock(logger)
    trainer = Trainer(trainer_settings(finetune, settings), hardware, clock, seed)
    tokenizer = load_tokenizer(source.tokenizer())
    tasks.prepare(training=True)
    uses_calib = getattr(adapter, "uses_calibration", False)  # lora=row_sparse scores rows on it
    calib: Calibration | None = None
    if uses_calibration(pruner) or uses_calib:
        calib = Calibration.from_settings(tokenizer, tasks, calibration, seed)
    model = load_causal_lm(source.base(), hardware.torch_device, hardware.torch_dtype)
    masks = pruner.prune(model, calib, sparsity) if pruner is not None else None
    pruned = measure_sparsity(model).overall
    per_task = trainer.settings.n_train or math.ceil(trainer.examples_needed() / len(tasks.names))
    examples = tasks.train_examples(per_task, seed)
    wrapped = adapter.wrap(model, masks, calib=calib) if uses_calib else adapter.wrap(model, masks)
    measured = measure(trainer, clock, wrapped, tokenizer, examples, settings)
    if not trainer.is_main_process:
        return None
    metrics = {
        "pipeline": "throughput",
        "mode": adapter.name,
        "model": getattr(source, "name", "model"),
        **measured.metrics(),
        "sparsity": pruned,
        "trainable_params": count_parameters(wrapped),
        "device": str(trainer.accelerator.device),
        "threads": torch.get_num_threads(),
        "processes": trainer.accelerator.num_processes,
        "wall_seconds": time.perf_counter() - began,
    }
    write_json(run_dir / "results.json", {"seed": seed, "target_sparsity": sparsity, **metrics})
    row = {k: metrics[k] for k in ("mode", "sparsity", "batch_size", "samples_per_s")}
    row |= {k: metrics[k] for k in ("tokens_per_s", "step_time_s", "peak_memory_mb")}
    print("\n" + format_table([row]) + "\n")
    logger.log({"event": "throughput", **metrics}, console=True)
    logger.summary(metrics)
    return measured.samples_per_s


def run(cfg, parts: dict, run_dir: Path) -> float | None:
    """Pipeline entry (``pipeline: throughput``)."""
    settings = settings_of(cfg, "throughput", ThroughputSettings)
    finetune = settings_of(cfg, "finetune", FinetuneSettings)
    return run_throughput(
        parts["model"],
        parts["task"],
        parts["pruner"],
        parts["lora"],
        parts["hardware"],
        parts["logger"],
        finetune,
        settings,
        seed=cfg.seed,
        sparsity=cfg.sparsity,
        run_dir=run_dir,
        calibration=settings_of(cfg, "calibration", CalibrationSettings),
    )
