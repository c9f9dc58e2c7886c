"""BFCL: parsing generated calls and matching them with the possible answers."""

from __future__ import annotations

import pytest

from sparse_merge.errors import ConfigError
from sparse_merge.tasks.bfcl import BFCL, calls_match, parse_calls, reference_call

from .conftest import FIXTURES

FILES = dict(
    questions=str(FIXTURES / "bfcl_simple.json"), answers=str(FIXTURES / "bfcl_simple_answers.json")
)
TRIANGLE = [{"calculate_triangle_area": {"base": [10], "height": [5], "unit": ["units", ""]}}]


def test_parse_calls():
    assert parse_calls("[f(a=1, b='x'), m.g(c=[1, 2])]") == [
        ("f", {"a": 1, "b": "x"}),
        ("m.g", {"c": [1, 2]}),
    ]
    assert parse_calls("```python\nf(a=-1.5)\n```") == [("f", {"a": -1.5})]
    for bad in ("f(1)", "[f(a=x)]", "hello", "[f(**k)]", "", "[1, 2]"):
        assert parse_calls(bad) is None, bad


@pytest.mark.parametrize(
    ("reply", "ok"),
    [
        ("[calculate_triangle_area(base=10, height=5)]", True),
        ("[calculate_triangle_area(height=5, base=10, unit='units')]", True),
        ("[calculate_triangle_area(base=10.0, height=5)]", True),  # int allowed as float
        ("[calculate_triangle_area(base=10, height=5, unit='Units')]", True),  # BFCL string norm
        ("[calculate_triangle_area(base=10, height=6)]", False),
        ("[calculate_triangle_area(base=10)]", False),  # required argument missing
        ("[calculate_triangle_area(base=10, height=5, colour='red')]", False),
        ("[triangle_area(base=10, height=5)]", False),
        ("[calculate_triangle_area(base=True, height=5)]", False),
        (
            "[calculate_triangle_area(base=10, height=5), calculate_triangle_area(base=10, height=5)]",
            False,
        ),
    ],
)
def test_simple_matching(reply, ok):
    assert calls_match(parse_calls(reply), TRIANGLE) is ok


def test_parallel_calls_match_in_any_order():
    gt = [{"f": {"x": [1]}}, {"f": {"x": [2]}}, {"g": {"s": ["a b"]}}]
    assert calls_match(parse_calls("[g(s='A B'), f(x=2), f(x=1)]"), gt)
    assert not calls_match(parse_calls("[g(s='a'), f(x=2), f(x=1)]"), gt)
    assert not calls_match(parse_calls("[f(x=1), f(x=1), g(s='a b')]"), gt)


def test_reference_calls_score_one_and_wrong_calls_zero(monkeypatch):
    bench = BFCL(**FILES, n_select=3, n_heldout=4)
    task = bench.heldout
    right = [reference_call(r["ground_truth"]) for r in task.rows]
    monkeypatch.setattr(task, "predict", lambda m, t: right)
    assert task.score(None, None).tolist() == [1.0] * 4
    monkeypatch.setattr(task, "predict", lambda m, t: ["[nothing()]", "I cannot", "", right[0]])
    assert task.score(None, None).tolist() == [0.0, 0.0, 0.0, 0.0]
    ids = {r["id"] for r in bench.selection.rows} | {r["id"] for r in task.rows}
    train = bench.train_examples(3, seed=0)
    assert len(ids) == 7 and all(parse_calls(e.answer) for e in train)
    assert "[func_name1(params_name1=params_value1" in train[0].prompt


def test_chat_prompt_has_the_functions(chat_tokenizer, tokenizer):
    task = BFCL(**FILES, n_select=1, n_heldout=1).heldout
    chat = task.prompts(chat_tokenizer)[0]
    assert chat.startswith("<system>You are an expert in composing functions.") and chat.endswith(
        "<assistant>"
    )
    assert task.rows[0]["function"][0]["name"] in chat
    assert task.prompts(tokenizer)[0].endswith("\nAnswer: ")


def test_config_errors():
    with pytest.raises(ConfigError, match="category"):
        BFCL(category="live_simple")
    with pytest.raises(ConfigError, match="answers"):
        BFCL(questions=FILES["questions"])


def test_runs_on_the_toy_model(tiny_llama, tokenizer):
    task = BFCL(**FILES, n_select=2, n_heldout=2, max_new_tokens=4).selection
    assert task.score(tiny_llama, tokenizer).tolist() == [0.0, 0.0]
