"""Fixtures of the evolution tests."""

import pytest
import torch

from sparse_merge.evolution.llm import LLMProblem
from sparse_merge.models.paramspace import ParamSpace
from sparse_merge.pruning.magnitude import MagnitudePruner
from sparse_merge.tasks.suite import TaskSuite
from sparse_merge.tasks.toy import AdditionTask, ReversalTask


@pytest.fixture
def based_problem(tiny_llama, tokenizer) -> LLMProblem:
    """A tiny Llama as the base and two parents a little away from it (seeded), tiny toy
    tasks, magnitude pruning."""
    space = ParamSpace(tiny_llama)
    g = torch.Generator().manual_seed(1)
    base = space.genome()
    a = base + 0.02 * torch.randn(base.shape, generator=g)
    b = base + 0.02 * torch.randn(base.shape, generator=g)
    tasks = TaskSuite(
        {
            "addition": AdditionTask(1, 1, n_select=4, n_heldout=3),
            "reversal": ReversalTask(1, 3, n_select=4, n_heldout=3),
        }
    )
    return LLMProblem(space, tokenizer, {"a": a, "b": b}, tasks, MagnitudePruner(), base=base)
