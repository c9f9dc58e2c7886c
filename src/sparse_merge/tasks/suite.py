"""Several benchmarks evaluated as one: aligned per-datapoint columns and per-task weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from sparse_merge.errors import ConfigError
from sparse_merge.tasks.base import Benchmark, Example


class TaskSuite:
    """Benchmarks by name; selection columns are concatenated in name order, held-out scored per task.

    ``weights`` scale each task's columns so that a task's total weight is its weight,
    whatever its number of datapoints (default 1 per task).
    """

    def __init__(
        self, tasks: Mapping[str, Benchmark], weights: Mapping[str, float] | None = None
    ) -> None:
        if not tasks:
            raise ConfigError("tasks", dict(tasks), "at least one task")
        for name, task in tasks.items():
            if isinstance(task, Mapping | Sequence | int | float):  # a node without _target_
                raise ConfigError(
                    f"tasks.{name}", task, "a benchmark (a node with a _target_ building one)"
                )
        self.tasks = dict(tasks)
        weights = dict(weights or {})
        unknown = set(weights) - set(self.tasks)
        if unknown:
            raise ConfigError("weights", sorted(unknown), f"names among {sorted(self.tasks)}")
        self.weights = {n: float(weights.get(n, 1.0)) for n in self.tasks}
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ConfigError("weights", self.weights, "non-negative weights with a positive sum")

    def prepare(self, training: bool = False) -> None:
        """Draw every task's selection and held-out datapoints (loading their data), so that
        missing or too-small data fails here, before a pipeline loads any model; with
        ``training``, also refuse a dataset task with no training row left (``pool``)."""
        for name, task in self.tasks.items():
            len(task.selection), len(task.heldout)
            pool = getattr(task, "pool", None) if training else None
            if pool is not None and not pool():
                raise ConfigError(
                    f"{name}.n_select",
                    getattr(task, "sizes", {}).get("selection"),
                    "a smaller n_select or n_heldout: no training row is left outside the "
                    "selection and held-out rows, and training takes its examples from there",
                )

    @property
    def names(self) -> list[str]:
        """Task names in column order."""
        return list(self.tasks)

    def spans(self) -> dict[str, slice]:
        """Where each task's columns lie in the selection score vector."""
        out, start = {}, 0
        for name, task in self.tasks.items():
            out[name] = slice(start, start + len(task.selection))
            start += len(task.selection)
        return out

    @property
    def n_selection(self) -> int:
        """Number of selection datapoints (columns) D."""
        return sum(len(t.selection) for t in self.tasks.values())

    def selection_weights(self) -> torch.Tensor | None:
        """[D] float64 weight per selection column, ``weight * D / (n_task * sum of weights)``:
        mean 1, so that a benchmark's share of the selection mean and of the competition
        fitness is its weight whatever its size. None when every column weighs 1 (the
        benchmarks' weights and sizes are equal): the unweighted sums then apply unchanged."""
        total = sum(self.weights[n] for n in self.tasks)
        d = self.n_selection
        if d == 0:
            return None
        weights = torch.cat(
            [
                torch.full((len(t.selection),), self.weights[n] * d / (len(t.selection) * total))
                for n, t in self.tasks.items()
                if len(t.selection)
            ]
        ).double()
        return None if bool((weights == 1).all()) else weights

    def score_selection(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        """[D] float scores on every selection datapoint, in the fixed column order."""
        columns = []
        for name, task in self.tasks.items():
            scores = task.selection.score(model, tokenizer).float().reshape(-1)
            if scores.numel() != len(task.selection):
                raise ValueError(
                    f"task {name!r} gave {scores.numel()} scores for "
                    f"{len(task.selection)} selection datapoints"
                )
            columns.append(scores)
        return torch.cat(columns)

    def score_heldout(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Per task, its held-out scores [N]; and, for each text-corpus task, the corpus
        perplexity over every held-out token (``<task>/perplexity``), from the same pass."""
        scores, perplexities = {}, {}
        for name, task in self.tasks.items():
            held = task.heldout
            if hasattr(held, "score_with_perplexity"):
                scores[name], perplexities[f"{name}/perplexity"] = held.score_with_perplexity(
                    model, tokenizer
                )
            else:
                scores[name] = held.score(model, tokenizer)
        return {n: s.float().cpu().reshape(-1) for n, s in scores.items()}, perplexities

    def evaluate_heldout(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase
    ) -> dict[str, float]:
        """Mean held-out score per task, ``mean`` (weighted over tasks), and the corpus
        perplexity of each text-corpus task (``<task>/perplexity``)."""
        scores, perplexities = self.score_heldout(model, tokenizer)
        means = {n: s.mean().item() if s.numel() else float("nan") for n, s in scores.items()}
        return {**self.summarize(means), **perplexities}

    def summarize(self, per_task: dict[str, float]) -> dict[str, float]:
        """``per_task`` mean scores plus ``mean``, their weighted mean over tasks."""
        total = sum(self.weights.values())
        return {**per_task, "mean": sum(self.weights[n] * a for n, a in per_task.items()) / total}

    def train_examples(self, n: int, seed: int) -> list[Example]:
        """``n`` training examples per task, interleaved."""
        per_task = [t.train_examples(n, seed) for t in self.tasks.values()]
        return [e for group in zip(*per_task) for e in group]
