"""The classic merges as baselines at an equal budget: every method's hyper-parameters are
searched on the selection split, each candidate pruned to the run's target sparsity with the
run's pruner, and the best candidate (by selection mean) is what the report shows.

A method's grid is the product of its settings' value lists; ``weight`` is special: its list is
the per-parent weight, so the grid takes every combination of weights over the parents (``t``:
SLERP's interpolation weight between two parents). When
the grid has more points than the budget, a seeded random subset of ``budget`` points is
evaluated (random search over the grid); otherwise the whole grid is, and the report says how
many evaluations each method used.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from sparse_merge.errors import ConfigError, check_positive
from sparse_merge.evolution.llm import LLMProblem
from sparse_merge.evolution.problem import Pick, column_weights
from sparse_merge.merging.base import MergeMethod

log = logging.getLogger("sparse_merge")

MethodFactory = Callable[..., MergeMethod]  # settings -> a merge method (a Hydra _partial_)


@dataclass
class BaselineResult:
    """The best candidate of one method's search."""

    name: str
    pick: Pick  # its weights [P] and selection scores
    settings: dict[str, Any]  # the chosen hyper-parameters (weights per parent, density, ...)
    evaluations: int  # selection evaluations spent
    grid_size: int


def grid_points(grid: Mapping[str, Sequence[Any]], parents: Sequence[str]) -> list[dict[str, Any]]:
    """Every point of ``grid`` as method settings plus ``weights``: a ``weight`` list expands
    to one weight per parent (every combination), a ``t`` list to ``[1 - t, t]`` (two parents,
    SLERP's interpolation weight)."""
    if "t" in grid and len(parents) != 2:
        raise ConfigError("grid.t", list(grid["t"]), "a grid for exactly two parents")
    keys = list(grid)
    axes = []
    for key in keys:
        values = list(grid[key])
        if not values:
            raise ConfigError(f"grid.{key}", values, "a non-empty list of values")
        if key == "weight":
            values = [list(v) for v in itertools.product(values, repeat=len(parents))]
        elif key == "t":
            values = [[1.0 - float(t), float(t)] for t in values]
        axes.append(values)
    points = []
    for combo in itertools.product(*axes):
        point = {}
        for key, value in zip(keys, combo):
            point["weights" if key in ("weight", "t") else key] = value
        points.append(point)
    return points


class Baselines:
    """Classic merges (task arithmetic, TIES, DARE, ...) searched at an equal budget.

    Args:
        methods: name -> ``{method: <merge method factory>, grid: {setting: [values]}}``; the
            factory is called with each grid point's settings (``weight`` is per parent and
            goes to the merge call instead). A method set to ``None`` is left out (a config
            that extends another drops methods that way).
        budget: selection evaluations per method (``None``: the evolution's own count).
        prune: prune every candidate to the run's target sparsity with the run's pruner.
    """

    def __init__(
        self,
        methods: Mapping[str, Mapping[str, Any]],
        budget: int | None = None,
        prune: bool = True,
    ) -> None:
        methods = {k: v for k, v in methods.items() if v is not None}  # null: left out
        if not methods:
            raise ConfigError("methods", dict(methods), "at least one baseline method")
        self.methods: dict[str, tuple[MethodFactory, dict[str, list[Any]]]] = {}
        for name, spec in methods.items():
            if not callable(spec.get("method")):
                raise ConfigError(
                    f"methods.{name}.method", spec.get("method"), "a merge method (_partial_)"
                )
            grid = {k: list(v) for k, v in dict(spec.get("grid") or {}).items()}
            settings = {k: v[0] for k, v in grid.items() if k not in ("weight", "t") and v}
            try:  # cheap constructor: a bad setting fails here, before any model is loaded
                spec["method"](**settings)
            except TypeError as exc:
                raise ConfigError(f"methods.{name}.grid", sorted(grid), str(exc)) from None
            self.methods[str(name)] = (spec["method"], grid)
        self.budget = None if budget is None else int(check_positive("budget", budget))
        self.prune = bool(prune)

    def describe(self) -> dict[str, Any]:
        """Methods and their grids (for results.json)."""
        return {name: {"grid": grid} for name, (_, grid) in self.methods.items()}

    def run(
        self, problem: LLMProblem, budget: int, target: float, seed: int
    ) -> list[BaselineResult]:
        """Search every method with ``self.budget`` (or ``budget``) selection evaluations."""
        budget = self.budget or int(budget)
        out = []
        for i, (name, (factory, grid)) in enumerate(self.methods.items()):
            points = grid_points(grid, list(problem.parents))
            chosen = points
            if len(points) > budget:  # random search over the grid, seeded per method
                gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + 101 + i)
                keep = sorted(torch.randperm(len(points), generator=gen)[:budget].tolist())
                chosen = [points[k] for k in keep]
            best: tuple[float, Pick, dict[str, Any]] | None = None
            for point in tqdm(chosen, desc=f"baseline {name}", leave=False):
                pick = self._candidate(problem, factory, point, target, seed)
                if best is None or pick.selection_mean > best[0]:
                    best = (pick.selection_mean, pick.detached(), point)
            _, pick, point = best
            log.info("%s: best %s, selection mean %.3f", name, point, pick.selection_mean)
            out.append(BaselineResult(name, pick, point, len(chosen), len(points)))
        return out

    @torch.no_grad()
    def _candidate(
        self,
        problem: LLMProblem,
        factory: MethodFactory,
        point: dict[str, Any],
        target: float,
        seed: int,
    ) -> Pick:
        """Merge (into the live model), prune, score on selection; the genome is the workspace."""
        settings = {k: v for k, v in point.items() if k != "weights"}
        n = len(problem.parents)
        rng = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7)
        ws = problem.merge_(factory(**settings), point.get("weights", [1.0 / n] * n), rng=rng)
        if self.prune and target > 0:
            problem.prune_(ws, target)
        scores, sparsity = problem.evaluate(ws), problem.sparsity(ws)
        return Pick(ws, scores, sparsity, -1, weights=column_weights(problem))
