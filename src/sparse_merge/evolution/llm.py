"""The ``Problem`` of merging causal LMs: genomes are ParamSpace rows, scores come from a
TaskSuite's selection split, pruning is the run's Pruner on the live model."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from sparse_merge.evolution.problem import is_workspace
from sparse_merge.models.blocks import prunable_layers
from sparse_merge.models.paramspace import ParamSpace
from sparse_merge.pruning.base import Calibration, Pruner
from sparse_merge.tasks.suite import TaskSuite

# scores [D] of the live model on the selection split; the default is the suite's own scoring
SelectionScorer = Callable[[nn.Module, PreTrainedTokenizerBase], torch.Tensor]
# held-out mean per task plus ``mean``; the default is TaskSuite.evaluate_heldout
HeldoutEvaluator = Callable[[nn.Module, PreTrainedTokenizerBase], dict[str, float]]


class LLMProblem:
    """Parents of one architecture in a ``ParamSpace``; the workspace is its flat buffer.

    ``score_selection`` replaces the suite's single-process scoring (the multi-process
    evaluator passes its own); it must return the same [D] scores in the same order.
    ``evaluate_heldout`` likewise replaces ``TaskSuite.evaluate_heldout``.
    """

    def __init__(
        self,
        space: ParamSpace,
        tokenizer: PreTrainedTokenizerBase,
        parents: dict[str, torch.Tensor],
        tasks: TaskSuite,
        pruner: Pruner | None = None,
        calibration: Calibration | None = None,
        score_selection: SelectionScorer | None = None,
        evaluate_heldout: HeldoutEvaluator | None = None,
    ) -> None:
        if not parents:
            raise ValueError("LLMProblem needs at least one parent genome")
        for name, g in parents.items():
            if g.shape != space.flat.shape:
                raise ValueError(
                    f"parent {name!r} has shape {tuple(g.shape)}, expected {tuple(space.flat.shape)}"
                )
        self.space, self.tokenizer, self.tasks = space, tokenizer, tasks
        self.parents = dict(parents)
        self.pruner, self.calibration = pruner, calibration
        self._score = score_selection or tasks.score_selection
        self._heldout = evaluate_heldout or tasks.evaluate_heldout
        self.numel = space.numel
        self.n_datapoints = tasks.n_selection
        self.task_names = tasks.names
        # (offset, stop) of every prunable weight in the genome: sparsity without a model load
        self._prunable = [
            (s.offset, s.stop)
            for s in (space.slot(layer.param_name) for layer in prunable_layers(space.model))
        ]
        self._prunable_total = sum(b - a for a, b in self._prunable)

    @property
    def workspace(self) -> torch.Tensor:
        """The live model's flat parameter buffer [P]."""
        return self.space.flat

    @property
    def model(self) -> nn.Module:
        """The live model (its parameters are views into the workspace)."""
        return self.space.model

    def initial(self) -> dict[str, torch.Tensor]:
        """The parent genomes by name."""
        return dict(self.parents)

    def _load(self, genome: torch.Tensor) -> nn.Module:
        if not is_workspace(self, genome):
            self.space.load(genome)
        return self.space.model

    def evaluate(self, genome: torch.Tensor) -> torch.Tensor:
        """[D] float scores on the suite's selection split (column order fixed by the suite)."""
        return self._score(self._load(genome), self.tokenizer).float().cpu()

    def heldout(self, genome: torch.Tensor) -> dict[str, float]:
        """Held-out score per task and their weighted ``mean``."""
        return self._heldout(self._load(genome), self.tokenizer)

    @torch.no_grad()
    def sparsity(self, genome: torch.Tensor) -> float:
        """Exact fraction of zeros over the prunable weights (decoder-block linears)."""
        zeros = sum(int((genome[a:b] == 0).sum()) for a, b in self._prunable)
        return zeros / max(self._prunable_total, 1)

    def prune_(self, genome: torch.Tensor, target: float) -> None:
        """Prune ``genome`` in place with the run's pruner (no-op without one or at 0)."""
        if self.pruner is None or target <= 0:
            return
        model = self._load(genome)
        self.pruner.prune(model, self.calibration, target)
        if not is_workspace(self, genome):
            genome.copy_(self.space.flat)
