import torch

from sparse_merge.tasks.base import Benchmark, Example, Task
from sparse_merge.tasks.generation import ExactMatchTask
from sparse_merge.tasks.suite import TaskSuite
from sparse_merge.tasks.toy import AdditionTask, ReversalTask, is_eval_prompt


def test_same_seed_same_datapoints():
    a, b = (
        AdditionTask(2, 2, n_select=32, n_heldout=32),
        AdditionTask(2, 2, n_select=32, n_heldout=32),
    )
    assert a.selection.examples == b.selection.examples and a.heldout.examples == b.heldout.examples
    c = AdditionTask(2, 2, n_select=32, n_heldout=32, selection_seed=1)
    assert c.heldout.examples == a.heldout.examples  # held-out fixed across run seeds
    assert c.selection.examples != a.selection.examples


def test_splits_are_disjoint_and_training_never_sees_eval_prompts():
    t = ReversalTask(4, 6, n_select=64, n_heldout=64)
    sel = {e.prompt for e in t.selection.examples}
    held = {e.prompt for e in t.heldout.examples}
    assert not sel & held and len(sel) == len(held) == 64
    train = {e.prompt for e in t.train_examples(500, seed=0)}
    assert not train & (sel | held)
    assert all(is_eval_prompt(p) for p in sel | held) and not any(is_eval_prompt(p) for p in train)


def test_examples_are_correct():
    for e in AdditionTask(1, 3, n_select=20, n_heldout=0).selection.examples:
        a, b = e.prompt[:-1].split("+")
        assert int(e.answer) == int(a) + int(b)
    for e in ReversalTask(n_select=20, n_heldout=0).selection.examples:
        assert e.prompt == f"rev:{e.answer[::-1]}="


def test_protocols():
    t = AdditionTask(n_select=4, n_heldout=4)
    assert isinstance(t, Benchmark) and isinstance(t.selection, Task)


class _Oracle(torch.nn.Module):
    """Not a model: ExactMatchTask is tested through a stubbed predict."""


def test_exact_match_scores_in_order(monkeypatch):
    task = ExactMatchTask(
        "t", [Example("1+1=", "2"), Example("2+2=", "4"), Example("3+3=", "6")], 3
    )
    monkeypatch.setattr(task, "predict", lambda m, tok: ["2", " 5", "6\n"])
    assert task.score(None, None).tolist() == [True, False, True]


def test_suite_columns_and_weights(monkeypatch):
    suite = TaskSuite(
        {"a": AdditionTask(n_select=4, n_heldout=4), "b": ReversalTask(n_select=2, n_heldout=2)},
        weights={"a": 3.0},
    )
    assert suite.n_selection == 6 and suite.spans() == {"a": slice(0, 4), "b": slice(4, 6)}
    weights = suite.selection_weights()  # 3 * 6 / (4 * 4), 1 * 6 / (2 * 4): mean 1
    assert torch.allclose(weights, torch.tensor([1.125] * 4 + [0.75] * 2, dtype=torch.float64))
    equal = TaskSuite({"a": AdditionTask(n_select=2), "b": ReversalTask(n_select=2)})
    assert equal.selection_weights() is None  # every column weighs 1: the plain sums
    monkeypatch.setattr(
        suite.tasks["a"].selection, "score", lambda m, t: torch.tensor([1, 0, 1, 1]).bool()
    )
    monkeypatch.setattr(
        suite.tasks["b"].selection, "score", lambda m, t: torch.tensor([0, 1]).bool()
    )
    assert suite.score_selection(None, None).tolist() == [1, 0, 1, 1, 0, 1]


def test_greedy_generation_is_batched_consistently(tiny_llama, tokenizer):
    from sparse_merge.tasks.generation import greedy_generate

    prompts = ["1+2=", "rev:abcdef=", "33+44="]
    batched = greedy_generate(
        tiny_llama, tokenizer, prompts, max_new_tokens=4, batch_size=3, stop=()
    )
    single = [greedy_generate(tiny_llama, tokenizer, [p], 4, 1, stop=())[0] for p in prompts]
    assert batched == single  # left padding does not change greedy outputs
