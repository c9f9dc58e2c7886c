"""Magnitude pruning: drop the smallest ``|W|`` (no calibration data)."""

from __future__ import annotations

from sparse_merge.pruning.importance import MagnitudeImportance
from sparse_merge.pruning.scored import ScorePruner


class MagnitudePruner(ScorePruner):
    """Unstructured magnitude pruning with exactly ``round(sparsity * n)`` zeros per layer
    (``granularity='layer'``), per output row (``'row'``) or over all layers (``'global'``);
    ``nm='2:4'`` for N:M. ``ScorePruner`` with ``MagnitudeImportance``; MoE routers only with
    ``prune_router``."""

    def __init__(
        self, granularity: str = "layer", nm: str | None = None, prune_router: bool = False
    ) -> None:
        super().__init__(MagnitudeImportance(), granularity, nm, prune_router)
