"""Merge pipeline: load the parents, run the evolver, evaluate, report, save.

The evolver's ``run(ctx)`` returns the genomes to report by name, headline first (one-shot:
``merged``; Natural Niches: ``best`` by held-out mean and ``sparse``, the sparsest archive
member within a tolerance of it). The report table compares them with the parents (held-out
score per task, mean, exact sparsity); ``accuracy`` and ``sparsity`` in the summary are the
headline model's.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from sparse_merge.evolution.context import MergeContext
from sparse_merge.evolution.distributed import ShardedScorer
from sparse_merge.evolution.llm import HeldoutEvaluator
from sparse_merge.evolution.scoring import SparsityAwareScorer
from sparse_merge.hardware import Hardware
from sparse_merge.models.hf import load_causal_lm, load_genome, load_tokenizer, save_causal_lm
from sparse_merge.models.paramspace import ParamSpace
from sparse_merge.models.source import ModelSource
from sparse_merge.pruning.base import Calibration, Pruner
from sparse_merge.pruning.sparsity import measure_sparsity
from sparse_merge.tasks.suite import TaskSuite
from sparse_merge.tracking.io import write_json
from sparse_merge.tracking.logger import RunLogger
from sparse_merge.tracking.report import format_table

log = logging.getLogger("sparse_merge")

DEFAULT_CALIBRATION = 64  # sequences when the pruner does not say (``n_calibration``)


def evaluate_genomes(
    space: ParamSpace,
    genomes: dict[str, torch.Tensor],
    tasks: TaskSuite,
    tokenizer: PreTrainedTokenizerBase,
    known: dict[str, dict[str, float]] | None = None,
    evaluate_heldout: HeldoutEvaluator | None = None,
) -> list[dict[str, object]]:
    """One row per genome: held-out score per task, their weighted mean, and exact sparsity
    (``known`` held-out results are reused instead of evaluated again; ``evaluate_heldout``
    replaces ``tasks.evaluate_heldout``, e.g. split over processes)."""
    evaluate_heldout = evaluate_heldout or tasks.evaluate_heldout
    rows = []
    for name, genome in genomes.items():
        model = space.load(genome)
        acc = (known or {}).get(name) or evaluate_heldout(model, tokenizer)
        acc = {k: acc[k] for k in [*tasks.names, "mean"]}
        rows.append({"model": name, **acc, "sparsity": measure_sparsity(model).overall})
    return rows


def build_calibration(
    tokenizer: PreTrainedTokenizerBase, tasks: TaskSuite, pruner: Pruner | None, seed: int
) -> Calibration | None:
    """Calibration sequences for the pruner from the tasks' training examples (never from the
    selection or held-out splits): ``pruner.n_calibration`` of them, interleaved over tasks."""
    if pruner is None:
        return None
    n = int(getattr(pruner, "n_calibration", DEFAULT_CALIBRATION))
    return Calibration.from_tasks(tokenizer, tasks, n, seed)


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
    scorer: SparsityAwareScorer | None = None,
    resume: bool = False,
) -> float:
    """Merge the source's parents with ``evolver``; returns the held-out mean of its headline
    result (what a sweeper optimises)."""
    tokenizer = load_tokenizer(source.tokenizer())
    paths = source.parents()
    first = next(iter(paths.values()))
    device = hardware.torch_device
    sharded = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # accelerate launch / torchrun
        sharded = ShardedScorer(tasks)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    main = sharded is None or sharded.is_main
    model = load_causal_lm(first, device, hardware.torch_dtype)
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
        calibration=build_calibration(tokenizer, tasks, pruner, seed),
        scorer=scorer,
        resume=resume,
        is_main=main,
    )
    heldout = None
    if sharded is not None:  # every process scores its shard of each evaluation
        heldout = ShardedScorer(tasks, split="heldout").evaluate
        ctx.extra.update(score_selection=sharded, evaluate_heldout=heldout)
    results = evolver.run(ctx)
    headline = next(iter(results))

    known = ctx.extra.get("heldout", {})
    rows = evaluate_genomes(space, {**parents, **results}, tasks, tokenizer, known, heldout)
    if not main:  # the processes evaluated together; one reports and writes
        return float(next(r for r in rows if r["model"] == headline)["mean"])
    columns = ["model", *tasks.names, "mean", "sparsity"]
    print("\n" + format_table(rows, columns) + "\n")
    archive_rows = ctx.extra.get("archive_rows", [])
    if archive_rows:
        print(format_table(archive_rows, ["id", "name", *tasks.names, "mean", "sparsity"]) + "\n")
    top = next(r for r in rows if r["model"] == headline)
    metrics = {"accuracy": top["mean"], "sparsity": top["sparsity"], "target_sparsity": sparsity}
    if archive_rows:
        metrics["archive_sparsity"] = sum(r["sparsity"] for r in archive_rows) / len(archive_rows)
        metrics["archive_size"] = len(archive_rows)
    write_json(
        run_dir / "results.json",
        {
            "seed": seed,
            "target_sparsity": sparsity,
            "headline": headline,
            **metrics,
            "models": rows,
            "archive": archive_rows,
        },
    )
    logger.summary(
        {
            **metrics,
            **{f"{r['model']}/{k}": v for r in rows for k, v in r.items() if k != "model"},
        }
    )
    if save_models:
        for name, genome in results.items():
            space.load(genome)
            out = save_causal_lm(model, run_dir / "models" / name, tokenizer)
            log.info("saved %s to %s", name, out)
    return float(top["mean"])


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
        scorer=parts.get("scorer"),
        resume=bool(cfg.get("resume", False)),
    )
