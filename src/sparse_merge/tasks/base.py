"""The Task protocol: a fixed, ordered list of datapoints, one score per datapoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Example:
    """A prompt and the answer a model should produce after it."""

    prompt: str
    answer: str


@runtime_checkable
class Task(Protocol):
    """A fixed, ordered list of datapoints; ``score`` gives one value per datapoint, same order."""

    name: str

    def __len__(self) -> int: ...

    def score(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        """Scores [len(self)] in [0, 1] (bool-valued for exact-match tasks)."""
        ...


@runtime_checkable
class Benchmark(Protocol):
    """What a ``task=`` option builds: a selection split (for evolution), a held-out split
    (for reporting) and training examples (for fine-tuning), all disjoint."""

    name: str
    selection: Task
    heldout: Task

    def train_examples(self, n: int, seed: int) -> list[Example]:
        """``n`` training examples, none of them in the selection or held-out splits."""
        ...
