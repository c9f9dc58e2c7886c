"""Natural Niches (and GA, and its ablations) run for a budget of forward passes, reporting the
same ``Curve`` as the baselines.

The engine (``NaturalNiches.evolve``) logs every step; ``CurveLogger`` listens to that log:
the child of a step is still in the problem's workspace when its record is logged, so the
logger evaluates it on the held-out set (one test forward pass per step), remembers the
selection mean and test score of the individual in each archive slot, and records the test
score of the slot with the best selection mean (the first such slot on ties), as the M2N2
reference reports the archive's best individual. With ``test_every_step=False`` only children
that enter the archive are evaluated on the held-out set: the curve is the same, the loop
faster.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from sparse_merge.evolution.curve import Curve
from sparse_merge.evolution.scoring import SparsityAwareScorer


class CurveLogger:
    """A ``RunLogger`` stand-in that turns the engine's step log into a ``Curve``."""

    def __init__(self, problem, curve: Curve, pop_size: int, test_every_step: bool = True) -> None:
        self.problem, self.curve = problem, curve
        self.test_every_step = bool(test_every_step)
        self.train = torch.full((pop_size,), -1.0, dtype=torch.float64)  # [pop], -1: empty
        self.test = torch.zeros(pop_size, dtype=torch.float64)  # [pop]
        self._initial: dict[str, torch.Tensor] | None = None
        self._n_initial = 0

    def _record(self, evals: int) -> None:
        best = int(self.train.argmax())
        self.curve.append(evals, float(self.train[best]), float(self.test[best]))

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Follow ``initial`` and ``step`` events (others are ignored)."""
        event = metrics.get("event")
        if event == "initial":
            if self._initial is None:
                self._initial = self.problem.initial()
            slot = self._n_initial  # the engine puts the i-th initial genome in slot i
            self._n_initial += 1
            genome = self._initial[metrics["name"]]
            self.train[slot] = float(metrics["mean"])
            self.test[slot] = self.problem.heldout(genome)["mean"]
        elif event == "step":
            if not self.curve.evals:
                self._record(0)
            test = None
            if self.test_every_step or metrics["entered"]:
                test = self.problem.heldout(self.problem.workspace)["mean"]
            if metrics["entered"]:
                self.train[metrics["slot"]] = float(metrics["child_mean"])
                self.test[metrics["slot"]] = test
            self._record(int(metrics["step"]) + 1)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        """Unused."""

    def close(self) -> None:
        """Unused."""


class NaturalNichesMethod:
    """The engine's evolver with its scorer (``alpha`` 1: Natural Niches, 0: GA), run for
    ``budget`` children (the evolver's ``iterations`` is set to the budget).
    ``test_every_step``: see ``CurveLogger``."""

    def __init__(
        self, evolver, scorer: SparsityAwareScorer | None = None, test_every_step: bool = True
    ) -> None:
        self.evolver = evolver
        self.scorer = scorer if scorer is not None else SparsityAwareScorer()
        self.test_every_step = bool(test_every_step)

    def run(self, problem, budget: int, seed: int, curve: Curve) -> dict[str, torch.Tensor]:
        """Evolve for ``budget`` forward passes; returns the archive's best by selection mean."""
        evolver = copy.copy(self.evolver)
        evolver.iterations = int(budget)
        logger = CurveLogger(problem, curve, evolver.pop_size, self.test_every_step)
        result = evolver.evolve(problem, self.scorer, seed=seed, target=0.0, logger=logger)
        archive = result.archive
        means = torch.where(archive.valid, archive.scores.double().mean(1), -1.0)
        return {"best": archive.genomes[int(means.argmax())].clone()}
