"""What the evolution searches over (the ``search`` config group): model weights, or
coefficients on the parents' task vectors. Each option builds the ``Problem`` from the model
problem the merge pipeline loads (``LLMProblem``: parents, base, tasks, pruner)."""

from __future__ import annotations

from sparse_merge.errors import check_choice, check_fraction
from sparse_merge.evolution.llm import LLMProblem
from sparse_merge.evolution.problem import Problem
from sparse_merge.evolution.task_vectors import GROUPINGS, TaskVectorProblem
from sparse_merge.merging.base import MergeMethod


class WeightSearch:
    """Genomes are whole models (the M2N2 setting): the initial archive is the parents, plus
    the base model with ``include_base``."""

    name = "weights"

    def __init__(self, include_base: bool = False) -> None:
        self.include_base = bool(include_base)

    @property
    def needs_base(self) -> bool:
        """Whether the base model must be loaded."""
        return self.include_base

    def build(self, problem: LLMProblem, seed: int) -> Problem:
        """The model problem itself."""
        return problem

    def describe(self) -> dict[str, object]:
        """Settings for reports."""
        return {"search": self.name, "include_base": self.include_base}


class TaskVectorSearch:
    """Genomes are task-vector coefficients per task and layer group plus a pruning sparsity
    (``evolution.task_vectors``); ``method`` merges them (task arithmetic, TIES, DARE, ...)."""

    name = "task_vectors"
    needs_base = True
    include_base = False  # the base is in the initial archive as all-zero coefficients

    def __init__(self, method: MergeMethod, groups: str = "block", max_sparsity: float = 0.95):
        self.method = method
        self.groups = check_choice("groups", groups, GROUPINGS)
        self.max_sparsity = check_fraction("max_sparsity", max_sparsity)

    def build(self, problem: LLMProblem, seed: int) -> Problem:
        """A ``TaskVectorProblem`` over ``problem``."""
        return TaskVectorProblem(problem, self.method, self.groups, self.max_sparsity, seed)

    def describe(self) -> dict[str, object]:
        """Settings for reports."""
        return {"search": self.name, "method": self.method.describe(), "groups": self.groups}
