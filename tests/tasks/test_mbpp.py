"""MBPP: prompts, code extraction and sandboxed asserts, on fixture rows in MBPP's format."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparse_merge.tasks.base import Benchmark, Task
from sparse_merge.tasks.mbpp import MBPP, extract_code

FIXTURE = Path(__file__).parents[1] / "fixtures" / "tasks" / "mbpp.jsonl"


@pytest.fixture
def mbpp():
    return MBPP(
        data_files=str(FIXTURE), n_select=3, n_heldout=3, num_fewshot=1, timeout_s=3.0, workers=3
    )


def test_splits_are_fixed_and_disjoint(mbpp):
    assert isinstance(mbpp, Benchmark) and isinstance(mbpp.selection, Task)
    sel, held = mbpp.selection.rows, mbpp.heldout.rows
    keys = lambda rows: {r["task_id"] for r in rows}  # noqa: E731
    assert len(sel) == len(held) == 3 and not keys(sel) & keys(held)
    shot = mbpp.selection.shots[0]["task_id"]
    assert shot not in keys(sel) | keys(held)
    again = MBPP(data_files=str(FIXTURE), n_select=3, n_heldout=3, num_fewshot=1)
    assert keys(again.heldout.rows) == keys(held) and keys(again.selection.rows) == keys(sel)
    zero = MBPP(data_files=str(FIXTURE), n_select=3, n_heldout=3, num_fewshot=0)
    assert keys(zero.heldout.rows) == keys(held)  # held-out is drawn before the exemplars
    other = MBPP(data_files=str(FIXTURE), n_select=3, n_heldout=3, num_fewshot=1, selection_seed=5)
    assert keys(other.heldout.rows) == keys(held)  # held-out does not depend on the run seed
    assert other.heldout.shots == mbpp.heldout.shots  # nor do the exemplars of its prompts
    train = {e.prompt for e in mbpp.train_examples(10, seed=0)}
    assert len(train) == 2 and not any(r["text"] in p for p in train for r in sel + held)


def test_prompt_has_the_papers_format(mbpp, tokenizer):
    prompt = mbpp.heldout.prompts(tokenizer)[0]
    row = mbpp.heldout.rows[0]
    assert prompt.endswith(f"{row['test_list'][-1]}\n[BEGIN]\n")
    assert prompt.count("[BEGIN]") == 2 and prompt.count("[DONE]") == 1  # one exemplar
    assert prompt.startswith("You are an expert Python programmer, and here is your task: ")


def test_extract_code():
    assert extract_code("def f():\n    return 1\n[DONE] trailing") == "def f():\n    return 1"
    assert extract_code("Sure!\n```python\ndef f(): return 2\n```\nDone.") == "def f(): return 2"
    assert extract_code("```\nx = 1\n") == "x = 1"


def test_correct_code_scores_one_and_wrong_code_zero(mbpp, monkeypatch):
    task = mbpp.heldout
    monkeypatch.setattr(task, "predict", lambda m, t: [r["code"] + "\n[DONE]" for r in task.rows])
    assert task.score(None, None).tolist() == [1.0, 1.0, 1.0]
    wrong = ["def nothing():\n    pass", "while True:\n    pass", "import os\nos.fork()"]
    monkeypatch.setattr(task, "predict", lambda m, t: wrong)
    assert task.score(None, None).tolist() == [0.0, 0.0, 0.0]
    assert [r.status for r in task.last_results] == ["failed", "timeout", "failed"]


def test_runs_on_the_toy_model(mbpp, tiny_llama, tokenizer):
    task = MBPP(data_files=str(FIXTURE), n_select=2, n_heldout=2, num_fewshot=0, max_new_tokens=4)
    scores = task.selection.score(tiny_llama, tokenizer)
    assert scores.shape == (2,) and scores.tolist() == [0.0, 0.0]  # a random model writes no code


@pytest.mark.parametrize("tag", ["python3", "Python3", "PYTHON", "py3", "python\r"])
def test_extract_code_from_a_fence_with_any_language_tag(tag):
    completion = f"Here it is:\n```{tag}\ndef f():\n    return 1\n```\nDone."
    assert extract_code(completion) == "def f():\n    return 1"
