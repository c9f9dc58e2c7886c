"""Merge pipeline: load the parents, run the evolver, evaluate, report, save."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sparse_merge.evolution.context import MergeContext
from sparse_merge.hardware import Hardware
from sparse_merge.models.hf import load_causal_lm, load_genome, load_tokenizer, save_causal_lm
from sparse_merge.models.paramspace import ParamSpace
from sparse_merge.models.source import ModelSource
from sparse_merge.pruning.base import Pruner
from sparse_merge.pruning.sparsity import measure_sparsity
from sparse_merge.tasks.suite import TaskSuite
from sparse_merge.tracking.io import write_json
from sparse_merge.tracking.logger import RunLogger
from sparse_merge.tracking.report import format_table

log = logging.getLogger("sparse_merge")


def evaluate_genomes(
    space: ParamSpace, genomes: dict[str, torch.Tensor], tasks: TaskSuite, tokenizer
) -> list[dict[str, object]]:
    """One row per genome: held-out score per task, their weighted mean, and exact sparsity."""
    rows = []
    for name, genome in genomes.items():
        model = space.load(genome)
        acc = tasks.evaluate_heldout(model, tokenizer)
        rows.append({"model": name, **acc, "sparsity": measure_sparsity(model).overall})
    return rows


def run_merge(
    source: ModelSource,
    tasks: TaskSuite,
    evolver,
    pruner: Pruner | None,
    hardware: Hardware,
    logger: RunLogger,
    *,
    seed: int,
    sparsity: float,
    run_dir: Path,
    save_models: bool = True,
) -> float:
    """Merge the source's parents with ``evolver``; returns the mean held-out score of the
    evolver's last result (what a sweeper optimises)."""
    tokenizer = load_tokenizer(source.tokenizer())
    paths = source.parents()
    first = next(iter(paths.values()))
    model = load_causal_lm(first, hardware.torch_device, hardware.torch_dtype)
    space = ParamSpace(model)
    parents = {name: load_genome(space, path).to(space.flat.device) for name, path in paths.items()}
    ctx = MergeContext(
        space=space,
        tokenizer=tokenizer,
        parents=parents,
        tasks=tasks,
        pruner=pruner,
        sparsity=sparsity,
        logger=logger,
        run_dir=run_dir,
        seed=seed,
    )
    results = evolver.run(ctx)

    rows = evaluate_genomes(space, {**parents, **results}, tasks, tokenizer)
    columns = ["model", *tasks.names, "mean", "sparsity"]
    print("\n" + format_table(rows, columns) + "\n")
    write_json(
        run_dir / "results.json", {"seed": seed, "target_sparsity": sparsity, "models": rows}
    )
    logger.summary({f"{r['model']}/{k}": v for r in rows for k, v in r.items() if k != "model"})
    if save_models:
        for name, genome in results.items():
            space.load(genome)
            out = save_causal_lm(model, run_dir / "models" / name, tokenizer)
            log.info("saved %s to %s", name, out)
    return float(rows[-1]["mean"])


def run(cfg, parts: dict, run_dir: Path) -> float:
    """Pipeline entry (``pipeline: merge``): the built parts and the global knobs of ``cfg``."""
    return run_merge(
        parts["model"],
        parts["task"],
        parts["evolver"],
        parts["pruner"],
        parts["hardware"],
        parts["logger"],
        seed=cfg.seed,
        sparsity=cfg.sparsity,
        run_dir=run_dir,
        save_models=cfg.save_models,
    )
