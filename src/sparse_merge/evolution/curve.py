"""What a budgeted search run reports: the held-out score of its current best individual
against the number of forward passes (children evaluated on the selection set)."""

from __future__ import annotations

from typing import Protocol

import torch


class SearchProblem(Protocol):
    """The part of ``evolution.problem.Problem`` a budgeted search needs to report."""

    def heldout(self, genome: torch.Tensor) -> dict[str, float]:
        """Held-out score per task plus ``mean``."""
        ...


class Curve:
    """Held-out ``mean`` of the best individual (by selection score) after each record.

    A record evaluates the held-out set (one test forward pass), so a run that records every
    step pays for a test evaluation every step, as in the M2N2 reference code.
    """

    def __init__(self, problem: SearchProblem) -> None:
        self.problem = problem
        self.evals: list[int] = []  # forward passes so far
        self.train: list[float] = []  # mean selection score of the best individual
        self.test: list[float] = []  # its held-out mean score

    def record(self, evals: int, genome: torch.Tensor, train: float) -> float:
        """Append one point (``genome`` is the current best); returns its held-out score."""
        test = float(self.problem.heldout(genome)["mean"])
        self.append(evals, train, test)
        return test

    def append(self, evals: int, train: float, test: float) -> None:
        """Append one point whose held-out score is already known."""
        if self.evals and evals < self.evals[-1]:
            raise ValueError(f"records must not go back: {evals} after {self.evals[-1]}")
        self.evals.append(int(evals))
        self.train.append(float(train))
        self.test.append(float(test))

    def __len__(self) -> int:
        return len(self.evals)

    def at(self, evals: int) -> float:
        """Held-out score of the last record made at or before ``evals`` forward passes."""
        idx = torch.searchsorted(torch.tensor(self.evals), evals, right=True) - 1
        if idx < 0:
            raise ValueError(f"no record at or before {evals} forward passes")
        return self.test[int(idx)]

    def sampled(self, points: list[int]) -> list[float]:
        """``at`` for each of ``points`` (e.g. a common x-axis across runs)."""
        return [self.at(p) for p in points]
