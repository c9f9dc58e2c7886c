"""Merge pipeline: load the parents (and the base), build the ``Problem``, run the evolver,
optionally search the classic merges at the same budget, evaluate on the held-out split, report,
save.

The evolver picks its results on the selection split only (``EvolutionResult.picks``, headline
first: Natural Niches' ``best`` and ``sparse``, the one-shot merge's ``merged``). Held-out data
is used here, after the picks, for the report: one table with the base, each parent, each of
them pruned to the target, each baseline and the picks -- held-out score per task, mean, exact
sparsity, selection mean and the selection evaluations each row cost. ``accuracy`` and
``sparsity`` in the summary are the headline pick's. ``sparsity`` is always the exact zero
count; ``sparsity_epsilon`` states the near-zero threshold selection used (``scorer.epsilon``),
and when it is above 0 every row also gives ``sparsity_eps`` (``|w| <= epsilon``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sparse_merge.config import settings_of, shaping_settings
from sparse_merge.errors import ConfigError
from sparse_merge.evolution.baselines import Baselines
from sparse_merge.evolution.distributed import ShardedScorer
from sparse_merge.evolution.llm import LLMProblem
from sparse_merge.evolution.memory import plan_merge
from sparse_merge.evolution.problem import (
    EvolutionResult,
    Evolver,
    column_weights,
    selection_mean,
)
from sparse_merge.evolution.scoring import SparsityAwareScorer
from sparse_merge.evolution.search import WeightSearch
from sparse_merge.hardware import Hardware
from sparse_merge.models.hf import load_causal_lm, load_genome, load_tokenizer, save_causal_lm
from sparse_merge.models.paramspace import ParamSpace
from sparse_merge.models.source import ModelSource
from sparse_merge.pruning.base import Calibration, Pruner, uses_calibration
from sparse_merge.pruning.settings import CalibrationSettings
from sparse_merge.tasks.suite import TaskSuite
from sparse_merge.tracking.io import is_main_process, lock_run_dir, write_csv, write_json
from sparse_merge.tracking.logger import RunLogger
from sparse_merge.tracking.report import format_table

log = logging.getLogger("sparse_merge")

ARCHIVE_CSV = "archive.csv"
MULTI_PROCESS = True  # each process scores its shard under a launch (app.check_processes)


def _row(
    problem: LLMProblem, name: str, weights: torch.Tensor, epsilon: float = 0.0, **extra: Any
) -> dict[str, Any]:
    """A report row: held-out score per task, mean, exact sparsity of ``weights`` [P] (and,
    for ``epsilon > 0``, ``sparsity_eps``: the fraction with ``|w| <= epsilon``)."""
    held = problem.heldout(weights)
    scores = {k: held[k] for k in [*problem.task_names, "mean"]}
    near = {"sparsity_eps": problem.sparsity(weights, epsilon)} if epsilon > 0 else {}
    return {"model": name, **scores, "sparsity": problem.sparsity(weights), **near, **extra}


def reference_rows(
    problem: LLMProblem, target: float, epsilon: float = 0.0
) -> list[dict[str, Any]]:
    """The base and each parent, as they are and pruned to ``target`` with the run's pruner."""
    models = {**({"base": problem.base} if problem.base is not None else {}), **problem.parents}
    rows = [_row(problem, name, g, epsilon, selection=None, evals=0) for name, g in models.items()]
    if problem.pruner is not None and target > 0:
        for name, genome in models.items():
            pruned = genome.clone()
            problem.prune_(pruned, target)
            rows.append(
                _row(problem, f"{name}@{target:g}", pruned, epsilon, selection=None, evals=0)
            )
    return rows


def archive_rows(problem, result: EvolutionResult, scorer: SparsityAwareScorer) -> list[dict]:
    """Held-out report of every final archive member (for ``archive.csv`` and the Pareto plot;
    the picks never look at these numbers). ``sparsity`` is exact; with ``scorer.epsilon > 0``
    the archive holds what selection saw, given as ``sparsity_eps``."""
    archive = result.archive
    if archive is None:
        return []
    weights = column_weights(problem)
    scorer = scorer.weighing(weights)  # as the search scored them
    total = scorer.total(archive.scores, archive.sparsity, archive.valid)
    rows = []
    for slot in archive.occupied():
        genome = archive.genomes[slot]
        held = problem.heldout(genome)
        ident = int(archive.ids[slot])
        seen = float(archive.sparsity[slot])  # what selection saw
        exact = problem.sparsity(genome) if scorer.epsilon > 0 else seen
        rows.append(
            {
                "id": ident,
                "slot": slot,
                "name": result.lineage.get(ident, {}).get("name", f"child-{ident}"),
                **held,
                "accuracy": held["mean"],
                "sparsity": exact,
                **({"sparsity_eps": seen} if scorer.epsilon > 0 else {}),
                "selection_mean": selection_mean(archive.scores[slot], weights),
                "total": float(total[slot]),
            }
        )
    return rows


def _has_base(source: ModelSource) -> bool:
    """Whether the source names a base model (``_load_base`` then loads it)."""
    try:
        source.base()
    except ConfigError:
        return False
    return True


def _load_base(source: ModelSource, space: ParamSpace, required: str | None) -> torch.Tensor | None:
    """The base genome, or None when the source has none and nothing requires it."""
    try:
        path = source.base()
    except ConfigError:
        if required is not None:
            raise ConfigError("model.base", None, f"a base model ({required} needs one)") from None
        return None
    return load_genome(space, path).to(space.flat.device)


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
    search=None,
    baselines: Baselines | None = None,
    calibration: CalibrationSettings | None = None,
    run_settings: Mapping[str, Any] | None = None,
) -> float:
    """Merge the source's parents with ``evolver``; returns the held-out mean of its headline
    pick (what a sweeper optimises). ``run_settings``: the config values that shape the result
    besides the evolver's and scorer's own (``result_settings``), stored in the evolver's
    checkpoint; a resume must match them."""
    if not isinstance(evolver, Evolver):  # before anything loads
        raise ConfigError(
            "evolver",
            type(evolver).__name__,
            "an evolver of pipeline=merge (natural_niches, ga, nn_no_crossover, nn_no_split, "
            "nn_no_matchmaker, one_shot); map_elites, cma_es, brute_force and m2n2_digits run "
            "with pipeline=digits model=digits_mlp task=digits",
        )
    search = search if search is not None else WeightSearch()
    scorer = scorer if scorer is not None else SparsityAwareScorer()
    target = sparsity if pruner is not None else 0.0
    if resume:  # changed settings: refused before loading
        evolver.check_resume(run_dir, scorer, seed=seed, target=target, settings=run_settings)
    required = None
    if getattr(search, "needs_base", False):
        required = f"search={search.name}"
    elif baselines is not None:
        required = "baselines"
    if required is not None:
        source.base()  # a missing base fails here, before any model is loaded
    tokenizer = load_tokenizer(source.tokenizer())
    tasks.prepare()  # data drawn (and checked) before any model loads
    # the pruner's calibration set, from the tasks' training examples: built (and checked)
    # before any model is loaded
    calib = None
    if uses_calibration(pruner):
        calib = Calibration.from_settings(tokenizer, tasks, calibration, seed)
    paths = source.parents()
    evolver.check_parents(list(paths))  # e.g. one_shot's weights, one per parent
    first = next(iter(paths.values()))
    device = hardware.torch_device
    sharded = heldout = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # accelerate launch / torchrun
        sharded = ShardedScorer(tasks)
        heldout = ShardedScorer(tasks, split="heldout").evaluate
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    main = sharded is None or sharded.is_main
    # what each device will hold, from the config alone: refuse what cannot fit, before loading
    plan = plan_merge(
        first,
        evolver,
        pruner,
        tasks,
        tokenizer,
        device=device,
        dtype=hardware.torch_dtype,
        n_parents=len(paths),
        base=_has_base(source),
        target=sparsity if pruner is not None else 0.0,
        calibration=calibration or CalibrationSettings(),
        run_dir=run_dir,
        write=main,
        weights=isinstance(search, WeightSearch),
        save_models=save_models,
        baselines=len(baselines.methods) if baselines is not None else 0,
    )
    log.info("%s", plan.format())
    try:
        plan.check()
    except ConfigError as refusal:
        if hardware.memory_check == "refuse":
            raise ConfigError(
                refusal.key,
                refusal.value,
                f"{refusal.allowed}; or, to run it anyway, hardware.memory_check=warn",
            ) from None
        log.warning("%s (hardware.memory_check=warn: running anyway)", refusal)
    if hasattr(source, "check"):  # every parent's location, before the first one loads
        source.check()
    model = load_causal_lm(first, device, hardware.torch_dtype)
    space = ParamSpace(model)
    parents = {name: load_genome(space, path).to(space.flat.device) for name, path in paths.items()}
    base = _load_base(source, space, required)
    llm = LLMProblem(
        space,
        tokenizer,
        parents,
        tasks,
        pruner,
        calib,
        sharded,
        heldout,
        base=base,
        include_base=getattr(search, "include_base", False),
    )
    problem = search.build(llm, seed)
    result = evolver.evolve(
        problem,
        scorer,
        seed=seed,
        target=target,
        run_dir=run_dir,
        logger=logger if main else None,
        resume=resume,
        write=main,
        settings=run_settings,
    )

    epsilon = scorer.epsilon  # the near-zero threshold selection used; reports state it
    rows = reference_rows(llm, target, epsilon)
    found = []
    if baselines is not None:
        found = baselines.run(llm, result.evaluations, target, seed)
        for b in found:
            pick = b.pick
            rows.append(
                _row(
                    llm,
                    b.name,
                    pick.genome,
                    epsilon,
                    selection=pick.selection_mean,
                    evals=b.evaluations,
                    settings=b.settings,
                )
            )
    picks = {name: problem.weights(p.genome) for name, p in result.picks.items()}
    for name, pick in result.picks.items():
        rows.append(
            _row(
                llm,
                name,
                picks[name],
                epsilon,
                selection=pick.selection_mean,
                evals=result.evaluations,
            )
        )
    members = archive_rows(problem, result, scorer)
    if not main:  # the processes evaluated together; one reports and writes
        return float(next(r for r in rows if r["model"] == next(iter(picks)))["mean"])

    headline = next(iter(picks))
    near = ["sparsity_eps"] if epsilon > 0 else []
    columns = ["model", *tasks.names, "mean", "sparsity", *near, "selection", "evals"]
    print(f"\nheld-out scores; selection evaluations per row: {result.evaluations} (evolution)")
    counted = f" (selection counted |w| <= {epsilon:g} as zero: sparsity_eps)" if near else ""
    print(f"sparsity: exact zeros of the prunable weights; sparsity_epsilon: {epsilon:g}{counted}")
    print(format_table(rows, columns) + "\n")
    if members:
        member_columns = ["id", "name", *tasks.names, "mean", "sparsity", *near]
        print(format_table(members, member_columns) + "\n")
        write_csv(run_dir / ARCHIVE_CSV, members)
    top = next(r for r in rows if r["model"] == headline)
    metrics = {
        "accuracy": top["mean"],
        "sparsity": top["sparsity"],
        **({"sparsity_eps": top["sparsity_eps"]} if near else {}),
        "sparsity_epsilon": epsilon,
        "target_sparsity": sparsity,
        "evaluations": result.evaluations,
    }
    if members:
        metrics["archive_sparsity"] = sum(r["sparsity"] for r in members) / len(members)
        metrics["archive_size"] = len(members)
    described = {}
    if hasattr(problem, "describe"):
        described = {name: problem.describe(p.genome) for name, p in result.picks.items()}
    write_json(
        run_dir / "results.json",
        {
            "seed": seed,
            "target_sparsity": sparsity,
            "headline": headline,
            **metrics,
            "search": search.describe(),
            "models": rows,
            "archive": members,
            "picked": list(picks),  # the evolver's picks, headline first
            "picks": described,
            "baselines": baselines.describe() if baselines is not None else None,
        },
    )
    logger.summary(
        {
            **metrics,
            **{
                f"{r['model']}/{k}": v
                for r in rows
                for k, v in r.items()
                if k not in ("model", "settings") and v is not None
            },
        }
    )
    if save_models:
        for name, weights in picks.items():
            space.load(weights)
            out = save_causal_lm(model, run_dir / "models" / name, tokenizer)
            log.info("saved %s to %s", name, out)
    return float(top["mean"])


def result_settings(cfg, parts: dict) -> dict[str, Any]:
    """The config values, by key, that shape a merge besides ``evolver.*``, ``scorer.*``,
    ``seed`` and ``sparsity`` (the engine stores those itself): the model, the tasks, the search,
    the pruner, the calibration set (when the pruner uses one) and ``hardware.dtype``.
    Baselines, logging, threads, the device, output paths and the model cache are left out: a
    resumed run may change them."""
    groups = ["model", "task", "search", "pruner"]
    if uses_calibration(parts["pruner"]):
        groups.append("calibration")
    return shaping_settings(cfg, groups, parts["model"])


def run(cfg, parts: dict, run_dir: Path) -> float:
    """Pipeline entry (``pipeline: merge``): the built parts and the global knobs of ``cfg``;
    the main process holds the run directory's lock for the whole run."""
    with lock_run_dir(run_dir, main=is_main_process()):  # one process per run directory
        calibration = settings_of(cfg, "calibration", CalibrationSettings)
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
            search=parts.get("search"),
            baselines=parts.get("baselines"),
            calibration=calibration,
            run_settings=result_settings(cfg, parts),
        )
