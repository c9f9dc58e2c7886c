"""LLMProblem: the Problem protocol over a tiny Llama in a ParamSpace."""

import pytest
import torch

from sparse_merge.evolution.llm import LLMProblem
from sparse_merge.evolution.problem import Problem, is_workspace
from sparse_merge.models.paramspace import ParamSpace
from sparse_merge.pruning.magnitude import MagnitudePruner
from sparse_merge.pruning.sparsity import measure_sparsity
from sparse_merge.tasks.suite import TaskSuite
from sparse_merge.tasks.toy import AdditionTask, ReversalTask


@pytest.fixture
def problem(tiny_llama, tokenizer):
    space = ParamSpace(tiny_llama)
    g = torch.Generator().manual_seed(0)
    a = space.genome()
    b = a + 0.01 * torch.randn(a.shape, generator=g)
    tasks = TaskSuite(
        {
            "addition": AdditionTask(1, 1, n_select=6, n_heldout=5),
            "reversal": ReversalTask(1, 3, n_select=4, n_heldout=5),
        }
    )
    return LLMProblem(space, tokenizer, {"a": a, "b": b}, tasks, MagnitudePruner())


def test_is_a_problem_with_the_suite_layout(problem):
    assert isinstance(problem, Problem)
    assert problem.n_datapoints == 10 and problem.numel == problem.space.numel
    assert problem.task_names == ["addition", "reversal"]
    assert set(problem.initial()) == {"a", "b"}
    assert is_workspace(problem, problem.workspace)
    assert not is_workspace(problem, problem.initial()["a"])


def test_evaluate_workspace_equals_evaluate_copy(problem):
    b = problem.initial()["b"]
    from_copy = problem.evaluate(b)
    assert from_copy.shape == (10,) and from_copy.dtype == torch.float32
    problem.workspace.copy_(b)
    assert torch.equal(problem.evaluate(problem.workspace), from_copy)
    held = problem.heldout(b)
    assert set(held) == {"addition", "reversal", "mean"}


def test_sparsity_and_prune_of_a_stored_genome(problem):
    a = problem.initial()["a"].clone()
    assert problem.sparsity(a) == 0.0
    problem.prune_(a, 0.5)  # a genome outside the workspace: pruned in place
    assert abs(problem.sparsity(a) - 0.5) < 0.005
    problem.space.load(a)
    assert problem.sparsity(a) == measure_sparsity(problem.model).overall
    # the non-prunable parameters (embeddings, norms) are untouched
    before = problem.initial()["a"]
    emb = problem.space.slot("model.embed_tokens.weight")
    assert torch.equal(a[emb.offset : emb.stop], before[emb.offset : emb.stop])
    problem.prune_(a, 0.0)  # a no-op
    assert abs(problem.sparsity(a) - 0.5) < 0.005


def test_calibration_comes_from_training_examples(tokenizer):
    from sparse_merge.pruning.base import Calibration
    from sparse_merge.pruning.settings import CalibrationSettings

    tasks = TaskSuite(
        {
            "addition": AdditionTask(1, 2, n_select=8, n_heldout=8),
            "reversal": ReversalTask(1, 4, n_select=8, n_heldout=8),
        }
    )
    settings = CalibrationSettings(n=5, length=6)
    calib = Calibration.from_settings(tokenizer, tasks, settings, run_seed=0)
    assert calib.input_ids.shape == (5, 6)  # n sequences cut to `length` tokens
    texts = tokenizer.batch_decode(calib.input_ids, skip_special_tokens=True)
    evaluated = {
        e.prompt
        for t in tasks.tasks.values()
        for split in (t.selection, t.heldout)
        for e in split.examples
    }
    assert not any(any(text.startswith(p) for p in evaluated) for text in texts)
    assert any("rev:" in t for t in texts) and any("+" in t for t in texts)  # both tasks


def test_a_model_reported_twice_is_evaluated_once(tiny_llama, tokenizer):
    space = ParamSpace(tiny_llama)
    a = space.genome()
    b = a * 0.5
    calls = []

    def heldout(model, tok):
        calls.append(1)
        return {"addition": float(len(calls)), "mean": float(len(calls))}

    tasks = TaskSuite({"addition": AdditionTask(1, 1, n_select=2, n_heldout=2)})
    problem = LLMProblem(space, tokenizer, {"a": a, "b": b}, tasks, evaluate_heldout=heldout)
    first = problem.heldout(a)
    assert problem.heldout(a.clone()) == first and len(calls) == 1  # same bytes, same report
    assert problem.heldout(b)["mean"] == 2.0 and len(calls) == 2


def test_in_loop_wanda_prunes_with_reference_norms_and_leaves_the_workspace_alone(problem):
    from sparse_merge.pruning.base import Calibration
    from sparse_merge.pruning.wanda import WandaPruner

    ids = torch.randint(3, 20, (4, 10), generator=torch.Generator().manual_seed(1))
    problem.calibration = Calibration(ids, torch.ones_like(ids))
    problem.pruner = WandaPruner(n_calibration=4, batch_size=2, in_loop="reference")
    ws = problem.workspace
    ws.copy_(problem.parents["b"])
    expected = problem.parents["b"].clone()
    norms = problem.pruner.reference(
        (problem._load(g.clone()) for g in problem.initial().values()), problem.calibration
    )
    problem._load(expected)
    norms.prune(problem.model, None, 0.5)
    expected = problem.workspace.clone()
    ws.copy_(problem.parents["b"])
    problem.prune_in_loop_(ws, 0.5)  # first use: norms measured on a and b, then b pruned
    assert torch.equal(ws, expected)
    exact = problem.parents["b"].clone()
    problem.prune_(exact, 0.5)  # full Wanda for reported models
    assert problem.sparsity(exact) == problem.sparsity(ws) == 0.5


def test_wanda_reference_norms_are_measured_once_before_the_first_step(
    problem, tmp_path, monkeypatch
):
    """The one-time norm pass is the search's setup (logged on its own, before the first step),
    not part of a step; measuring it up front changes nothing: the archive equals the one of a
    search that builds it on first use."""
    import json

    from sparse_merge.evolution.natural_niches import NaturalNiches
    from sparse_merge.evolution.scoring import SparsityAwareScorer
    from sparse_merge.pruning.base import Calibration
    from sparse_merge.pruning.wanda import WandaPruner
    from sparse_merge.tracking.logger import RunLogger

    ids = torch.randint(3, 20, (4, 10), generator=torch.Generator().manual_seed(1))
    problem.calibration = Calibration(ids, torch.ones_like(ids))

    def run(out):
        problem.pruner = WandaPruner(n_calibration=4, batch_size=2, in_loop="reference")
        problem._in_loop = None
        logger = RunLogger(console=False).start(out)
        engine = NaturalNiches(pop_size=3, iterations=6, checkpoint_every=0, final_prune=False)
        result = engine.evolve(problem, SparsityAwareScorer(), seed=0, target=0.5, logger=logger)
        logger.close()
        records = [json.loads(line) for line in (out / "log.jsonl").open()]
        events = [r["event"] for r in records]
        setup = [r for r in records if r["event"] == "setup"]
        assert len(setup) == 1 and events.index("setup") < events.index("step")
        archive = result.archive
        genomes = torch.stack([archive.genomes[s].clone() for s in archive.occupied()])
        return genomes, setup[0]["prepared_in_loop"]

    genomes, prepared = run(tmp_path / "up_front")
    assert prepared and problem._in_loop is not None
    monkeypatch.delattr(LLMProblem, "prepare_in_loop")  # a search that never prepares
    lazy, prepared = run(tmp_path / "on_first_use")
    assert not prepared
    assert torch.equal(genomes, lazy)
