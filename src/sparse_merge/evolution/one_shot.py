"""One-shot merge and prune: SLERP two parents at a fixed weight, then prune the result."""

from __future__ import annotations

import torch

from sparse_merge.errors import ConfigError, check_fraction
from sparse_merge.evolution.context import MergeContext
from sparse_merge.evolution.crossover import slerp_


class OneShotMerge:
    """``merged = slerp(parent_a, parent_b, weight)`` written into the live model, then pruned
    with the run's pruner at the run's sparsity."""

    def __init__(self, weight: float = 0.5, split: float | None = None) -> None:
        self.weight = check_fraction("weight", weight, upper_open=False)
        self.split = None if split is None else check_fraction("split", split, upper_open=False)

    def run(self, ctx: MergeContext) -> dict[str, torch.Tensor]:
        """Returns ``{"merged": genome}``; the live model holds the merged, pruned weights."""
        if len(ctx.parents) != 2:
            raise ConfigError(
                "model.parents", list(ctx.parents), "exactly two parents for a one-shot merge"
            )
        a, b = ctx.parents.values()
        split = None if self.split is None else round(self.split * a.numel())
        slerp_(ctx.space.flat, a, b, self.weight, split)  # straight into the live buffer
        if ctx.pruner is not None and ctx.sparsity > 0:
            ctx.pruner.prune(ctx.space.model, ctx.calibration, ctx.sparsity)
        ctx.logger.log(
            {"event": "merged", "weight": self.weight, "split": split, "sparsity": ctx.sparsity}
        )
        return {"merged": ctx.space.genome()}
