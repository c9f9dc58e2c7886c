"""Digits pipeline (``pipeline: digits``): search methods on the M2N2 digits problem.

With ``evolver=m2n2_digits`` (``experiment=m2n2_digits``) the evolver is a ``Comparison``:
every method of every panel for every seed, then a figure (test accuracy against forward
passes, mean +- standard error) and a markdown table of final accuracies. With a single method
(``evolver=map_elites``, ``cma_es``, ``brute_force``, ``natural_niches``, ``ga``, ...) it runs
that method once from the ``model`` group's parents with ``seed`` for ``budget`` forward passes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sparse_merge.analysis.curves import mean_se, write_report
from sparse_merge.errors import ConfigError
from sparse_merge.evolution.budgeted import NaturalNichesMethod
from sparse_merge.evolution.comparison import Comparison, Panel
from sparse_merge.evolution.natural_niches import NaturalNiches
from sparse_merge.models.digits import DigitsParents
from sparse_merge.tasks.digits import DigitsTask
from sparse_merge.tracking.io import write_json

log = logging.getLogger("sparse_merge")

REPORT = "m2n2_digits"  # file stem of the figure and the table
CONTINUES_IN_PLACE = True  # a rerun in its run directory reuses the job files of its settings


def as_comparison(
    evolver, parents: DigitsParents, seed: int, budget: int, scorer=None
) -> Comparison:
    """The comparison to run: ``evolver`` itself, or a one-job comparison around a method (the
    engine's evolver runs with the ``scorer`` group, e.g. ``evolver=ga``'s alpha 0)."""
    if isinstance(evolver, Comparison):
        return evolver
    if isinstance(evolver, NaturalNiches):  # the Natural Niches engine (ga, nn_* too)
        evolver = NaturalNichesMethod(evolver, scorer, test_every_step=False)
    if not callable(getattr(evolver, "run", None)):
        raise ConfigError(
            "evolver",
            type(evolver).__name__,
            "a digits method (natural_niches, ga, nn_no_crossover, nn_no_split, nn_no_matchmaker, "
            "map_elites, cma_es, brute_force) or a comparison (m2n2_digits)",
        )
    name = type(getattr(evolver, "evolver", evolver)).__name__.lower()
    panel = Panel(parents.name, budget, parents, {name: evolver})
    return Comparison({parents.init: panel}, [seed], points=min(budget, 250))


def run_digits(
    comparison: Comparison, task: DigitsTask, run_dir: Path
) -> tuple[float, dict[str, Path]]:
    """Run every job (or reuse its file), write the report; returns the mean final test
    accuracy of the first panel's first method, and the report's paths."""
    if not isinstance(task, DigitsTask):
        raise ConfigError("task", type(task).__name__, "the digits task (task=digits)")
    out = Path(comparison.results_dir) if comparison.results_dir else Path(run_dir)
    results = comparison.run(task, out)
    titles = {name: panel.title for name, panel in comparison.panels.items()}
    paths = write_report(results, titles, comparison.paper, comparison.notes, out, REPORT)
    if out != Path(run_dir):
        write_report(results, titles, comparison.paper, comparison.notes, run_dir, REPORT)
    print("\n" + paths["table"].read_text())
    first = results[0]
    mean, _ = mean_se(
        [
            r["final_test"]
            for r in results
            if (r["panel"], r["method"]) == (first["panel"], first["method"])
        ]
    )
    write_json(Path(run_dir) / "results.json", {"metric": mean, "runs": len(results)})
    log.info("figure %s, table %s", paths["figure"], paths["table"])
    return mean, paths


def run(cfg, parts: dict, run_dir: Path) -> float:
    """Pipeline entry: the evolver group (a comparison or one method), the digits task."""
    comparison = as_comparison(
        parts["evolver"], parts["model"], int(cfg.seed), int(cfg.budget), parts.get("scorer")
    )
    metric = run_digits(comparison, parts["task"], run_dir)[0]
    # the standard name the sweep analysis reads (summary.json), as every pipeline writes it
    parts["logger"].summary({"accuracy": metric})
    return metric
