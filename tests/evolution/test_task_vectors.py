"""The task-vector search space: genome layout, the models genomes stand for, pruning gene."""

import pytest
import torch

from sparse_merge.evolution.llm import LLMProblem
from sparse_merge.evolution.task_vectors import TaskVectorProblem, layer_groups
from sparse_merge.merging.linear import Linear
from sparse_merge.merging.task_arithmetic import TaskArithmetic


@pytest.fixture
def problem(based_problem):
    return TaskVectorProblem(based_problem, TaskArithmetic(), groups="block")


def test_block_groups_follow_decoder_blocks():
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.norm.weight",
    ]
    index, groups = layer_groups(names, "block")
    assert groups == ["block0", "block1", "other"]
    assert index == [2, 0, 1, 0, 2]
    assert layer_groups(names, "model") == ([0] * 5, ["model"])
    assert layer_groups(names, "tensor")[1] == names


def test_layout_and_initial_genomes_stand_for_base_parents_and_their_sum(problem):
    inner = problem.inner
    assert problem.n_groups == 3 and problem.numel == 2 * 3 + 1
    init = problem.initial()
    assert list(init) == ["base", "a", "b", "task_arithmetic"]
    assert torch.equal(problem.weights(init["base"]), inner.base)
    for name in ("a", "b"):
        assert torch.allclose(problem.weights(init[name]), inner.parents[name], atol=1e-6)
    total = inner.parents["a"] + inner.parents["b"] - inner.base
    assert torch.allclose(problem.weights(init["task_arithmetic"]), total, atol=1e-6)


def test_a_coefficient_of_one_group_moves_only_that_group(problem):
    inner = problem.inner
    genome = problem.initial()["base"]
    problem.coefficients(genome)[0, 0] = 1.0  # parent a's task vector in block 0 only
    w = problem.weights(genome)
    for slot, group in zip(inner.space.slots, problem.group_of):
        got = w[slot.offset : slot.stop]
        want = (inner.parents["a"] if group == 0 else inner.base)[slot.offset : slot.stop]
        assert torch.allclose(got, want, atol=1e-6), slot.name


def test_pruning_gene_gives_the_exact_sparsity_of_the_final_weights(problem):
    genome = problem.initial()["task_arithmetic"]
    assert problem.sparsity(genome) == 0.0
    problem.prune_(genome, 0.5)
    assert float(genome[-1]) == 0.5
    assert problem.sparsity(genome) == pytest.approx(0.5, abs=1e-9)
    # the scorer sees the same model the selection scores come from
    w = problem.weights(genome)
    assert problem.inner.sparsity(w) == problem.sparsity(genome)


def test_rebuilt_after_the_live_model_was_overwritten(problem):
    genome = problem.initial()["a"]
    first = problem.weights(genome)
    problem.inner.evaluate(problem.inner.base)  # loads the base into the live model
    assert torch.equal(problem.materialize(genome), first)


def test_mutation_moves_every_coefficient_but_not_the_pruning_gene(problem):
    genome = problem.initial()["base"]
    genome[-1] = 0.3
    n = problem.mutate_(genome, 0.1, torch.Generator().manual_seed(0))
    assert n == 6 and bool((genome[:-1] != 0).all()) and float(genome[-1]) == 0.3


def test_needs_a_base_and_a_task_vector_method(tiny_llama, tokenizer, problem):
    inner = problem.inner
    with pytest.raises(ValueError, match="task-vector merge method"):
        TaskVectorProblem(inner, Linear())
    no_base = LLMProblem(inner.space, tokenizer, inner.parents, inner.tasks)
    with pytest.raises(ValueError, match="base"):
        TaskVectorProblem(no_base, TaskArithmetic())
