"""The Adapter protocol: what a ``lora=<option>`` builds and the trainer and pipeline rely on.

A fine-tuning method wraps a (possibly pruned) model so that only its own parameters train,
folds the trained update back into plain weights, and saves the update on its own. The
trainer only sees an ``nn.Module`` whose trainable parameters have ``requires_grad``; nothing
outside an adapter's own module assumes PEFT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from torch import nn

from sparse_merge.pruning.base import Masks


@runtime_checkable
class Adapter(Protocol):
    """Wraps a model for training, merges the update back, saves the update."""

    name: str  # short method name used in reports (dense, sparse_to_dense, ...)
    mask_path: str | None  # a saved mask directory to use instead of pruning on the fly
    mask_check: bool  # refuse masks from mask_path whose source_hash is not the model's

    def wrap(self, model: nn.Module, masks: Masks | None) -> nn.Module:
        """The model with the method's trainable parameters added (everything else frozen)."""
        ...

    def merge(self, model: nn.Module) -> nn.Module:
        """The plain model (same class as before ``wrap``) with the update folded in."""
        ...

    def save(self, model: nn.Module, directory: str | Path) -> Path:
        """Write the trained update (not the base weights) to ``directory``, atomically."""
        ...


def count_parameters(model: nn.Module, trainable: bool = True) -> int:
    """Number of (trainable, or all) parameter elements of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)
