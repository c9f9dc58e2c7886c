"""One-shot merge and prune: one merge method at fixed weights, then the run's pruner."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sparse_merge.errors import ConfigError, check_fraction, is_number
from sparse_merge.evolution.problem import EvolutionResult, Evolver, Pick, column_weights
from sparse_merge.merging.base import MergeMethod
from sparse_merge.merging.slerp import Slerp
from sparse_merge.tracking.logger import RunLogger


class OneShotMerge(Evolver):
    """``merged = method(base, parents, weights)`` written into the live model, then pruned
    with the run's pruner to the run's sparsity; one selection evaluation.

    Args:
        method: any merge method (default: SLERP with one angle over the whole genome).
        weights: one weight per parent (default: ``1 / n`` each for methods without a base,
            ``1`` each for task-vector methods, i.e. plain task arithmetic).
        split: a split point as a fraction of the genome (weights reversed after it), or None.
    """

    def __init__(
        self,
        method: MergeMethod | None = None,
        weights: Sequence[float] | None = None,
        split: float | None = None,
    ) -> None:
        self.method = method if method is not None else Slerp(granularity="genome")
        if weights is not None and (
            isinstance(weights, (str, bytes)) or not all(is_number(w, finite=True) for w in weights)
        ):
            raise ConfigError("weights", weights, "a list of finite numbers, one per parent")
        self.weights = None if weights is None else [float(w) for w in weights]
        self.split = None if split is None else check_fraction("split", split, upper_open=False)

    def check_parents(self, names: Sequence[str]) -> None:
        """Refuse ``weights`` that do not give one weight per parent (the merge pipeline calls
        this with the parents' names before any model loads)."""
        if self.weights is not None and len(self.weights) != len(names):
            raise ConfigError(
                "evolver.weights",
                self.weights,
                f"one weight per parent ({len(names)}: {', '.join(names)})",
            )

    def evolve(
        self,
        problem,
        scorer=None,
        *,
        seed: int = 0,
        target: float = 0.0,
        run_dir: str | Path | None = None,
        logger: RunLogger | None = None,
        resume: bool = False,
        write: bool = True,
        settings: Mapping[str, Any] | None = None,
    ) -> EvolutionResult:
        """Returns ``{"merged": ...}``; the live model holds the merged, pruned weights."""
        n = len(problem.parents)
        weights = self.weights
        if weights is None:
            weights = [1.0] * n if self.method.needs_base else [1.0 / n] * n
        if len(weights) != n:
            raise ConfigError("evolver.weights", weights, f"one weight per parent ({n})")
        split = None if self.split is None else round(self.split * problem.numel)
        rng = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7)
        ws = problem.merge_(self.method, weights, split=split, rng=rng)
        problem.prune_(ws, target)
        scores, sparsity = problem.evaluate(ws), problem.sparsity(ws)  # scored in place
        genome = ws.clone()
        if logger is not None:
            logger.log(
                {
                    "event": "merged",
                    "method": self.method.describe(),
                    "weights": weights,
                    "split": split,
                    "sparsity": sparsity,
                }
            )
        pick = Pick(genome, scores, sparsity, -1, weights=column_weights(problem))
        return EvolutionResult({"merged": pick}, evaluations=1)
