"""Everything an evolver needs for one run, in one object."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from sparse_merge.evolution.scoring import SparsityAwareScorer
from sparse_merge.models.paramspace import ParamSpace
from sparse_merge.pruning.base import Calibration, Pruner
from sparse_merge.tasks.suite import TaskSuite
from sparse_merge.tracking.logger import RunLogger


@dataclass
class MergeContext:
    """The live model's ParamSpace, the parents' genomes, tasks, pruner and run services."""

    space: ParamSpace
    tokenizer: PreTrainedTokenizerBase
    parents: dict[str, torch.Tensor]  # name -> genome [P]
    tasks: TaskSuite
    pruner: Pruner | None
    sparsity: float
    logger: RunLogger
    run_dir: Path
    seed: int = 0
    calibration: Calibration | None = None
    scorer: SparsityAwareScorer | None = None  # archive scores -> selection weights (evolvers)
    resume: bool = False  # continue from the checkpoint in run_dir
    is_main: bool = True  # the process that logs and writes files (multi-process runs)
    extra: dict[str, object] = field(default_factory=dict)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A fresh seeded generator (``offset`` separates independent streams)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + offset)
