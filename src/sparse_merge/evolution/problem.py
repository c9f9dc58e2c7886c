"""What an evolver searches over, independent of LLMs: the ``Problem`` protocol.

A problem fixes a genome layout (a flat tensor of ``numel`` values), the starting genomes, an
ordered selection set of ``n_datapoints`` datapoints every genome is scored on (the aligned
score columns of Natural Niches), a held-out evaluation for reports, and the sparsity and
pruning of a genome. Evolvers (Natural Niches, GA, MAP-Elites, CMA-ES, brute force) only talk
to this interface, so the same engine evolves LLMs (``evolution.llm.LLMProblem``) and small
MLPs alike.

The **workspace** is the live buffer the problem evaluates from (for a model in a
``ParamSpace``, its flat parameter buffer). An evolver writes a child straight into it
(crossover with ``out=workspace``) and calls ``evaluate(workspace)``: no copy is made. Any
other genome is first copied into the workspace, so ``evaluate``, ``heldout`` and ``prune_``
on a genome other than the workspace overwrite the workspace's content.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Problem(Protocol):
    """Genomes [numel], scores [n_datapoints] on a fixed ordered selection set, held-out reports."""

    numel: int  # genome length P
    n_datapoints: int  # number of selection datapoints D (score columns)
    task_names: list[str]  # names of the held-out report entries (besides "mean")

    @property
    def workspace(self) -> torch.Tensor:
        """The live buffer [P] evaluated without a copy (crossover writes children into it)."""
        ...

    def initial(self) -> dict[str, torch.Tensor]:
        """The starting genomes by name (e.g. the parent models), each [P]."""
        ...

    def evaluate(self, genome: torch.Tensor) -> torch.Tensor:
        """Float scores [D] in [0, 1] on the selection datapoints, same order every call."""
        ...

    def heldout(self, genome: torch.Tensor) -> dict[str, float]:
        """Held-out score per task plus ``mean`` (what reports and the final choice use)."""
        ...

    def sparsity(self, genome: torch.Tensor) -> float:
        """Exact fraction of zero prunable weights of ``genome`` (no evaluation needed)."""
        ...

    def prune_(self, genome: torch.Tensor, target: float) -> None:
        """Prune ``genome`` in place to ``target`` sparsity (may use the workspace as scratch)."""
        ...


def is_workspace(problem: Problem, genome: torch.Tensor) -> bool:
    """Whether ``genome`` is the problem's workspace buffer itself (same storage and shape)."""
    ws = problem.workspace
    return genome.data_ptr() == ws.data_ptr() and genome.shape == ws.shape
