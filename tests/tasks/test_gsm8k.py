"""GSM8K: prompts, answer extraction and exact match on fixture rows in GSM8K's format."""

from __future__ import annotations

from decimal import Decimal

import pytest

from sparse_merge.tasks.gsm8k import GSM8K, extract_answer, gold_answer

from .conftest import FIXTURES

FILES = {"train": str(FIXTURES / "gsm8k_train.jsonl"), "test": str(FIXTURES / "gsm8k_test.jsonl")}


@pytest.fixture
def gsm8k():
    return GSM8K(data_files=FILES, n_select=3, n_heldout=4, num_fewshot=2, max_new_tokens=8)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("so 2+3 = 5.\n#### 1,000", "1000"),
        ("The answer is $18.", "18"),
        ("It drops to -7 degrees", "-7"),
        ("0.2 x 50 = 10 dollars", "10"),
        ("#### 70,000.00 and then 3", "70000"),
        ("no number here", None),
    ],
)
def test_extract_answer(completion, expected):
    value = extract_answer(completion)
    assert value == (Decimal(expected) if expected else None)


def test_gold_answer():
    assert gold_answer({"answer": "He made 70,000\n#### 70000"}) == 70000


def test_right_answers_score_one_wrong_answers_zero(gsm8k, monkeypatch):
    task = gsm8k.heldout
    assert [int(g) for g in task.golds] == [18, 3, 70000, 624]  # all of the test file, in order
    right = [f" The answer is\n#### {g}" for g in ["18", "3", "70,000", "624.0"]]
    monkeypatch.setattr(task, "predict", lambda m, t: right)
    assert task.score(None, None).tolist() == [1.0, 1.0, 1.0, 1.0]
    monkeypatch.setattr(task, "predict", lambda m, t: [" 17", " 3 bolts, not 4", "#### 7000", ""])
    assert task.score(None, None).tolist() == [0.0, 0.0, 0.0, 0.0]


def test_plain_few_shot_prompt(gsm8k, tokenizer):
    task = gsm8k.heldout
    prompt = task.prompts(tokenizer)[1]
    assert prompt.count("Question: ") == 3 and prompt.count("####") == 2  # 2 solved exemplars
    assert prompt.endswith(f"Question: {task.rows[1]['question']}\nAnswer:")
    assert all(
        s["question"] not in {r["question"] for r in gsm8k.selection.rows} for s in task.shots
    )


def test_chat_template_when_the_tokenizer_has_one(gsm8k, chat_tokenizer):
    prompt = gsm8k.heldout.prompts(chat_tokenizer)[0]
    assert prompt.count("<user>") == 3 and prompt.count("<assistant>") == 3
    assert prompt.endswith("<assistant>") and "Question:" not in prompt
    gsm8k.heldout.chat_template = "never"
    assert "<user>" not in gsm8k.heldout.prompts(chat_tokenizer)[0]


def test_runs_on_the_toy_model(gsm8k, tiny_llama, tokenizer):
    scores = gsm8k.selection.score(tiny_llama, tokenizer)
    assert scores.shape == (3,) and set(scores.tolist()) <= {0.0, 1.0}


def test_splits_expose_prompt_answer_examples(gsm8k):
    task = gsm8k.heldout
    assert len(task.examples) == len(task) == 4
    assert task.examples[0].prompt == f"Question: {task.rows[0]['question']}\nAnswer:"
    assert task.examples[0].answer.endswith("#### 18")


def test_exemplars_are_fixed_by_data_seed_and_never_selection_rows(tmp_path):
    """The exemplars every prompt holds do not move with the run's ``selection_seed`` (they
    were drawn after the selection rows, from what those left), and no selection row is one."""
    import json

    rows = [{"question": f"Q{i}: what is {i}+1?", "answer": f"#### {i + 1}"} for i in range(40)]
    for name, part in (("train", rows[:30]), ("test", rows[30:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    files = {s: str(tmp_path / f"{s}.jsonl") for s in ("train", "test")}
    shots = []
    for seed in range(4):
        bench = GSM8K(
            data_files=files, n_select=10, n_heldout=5, num_fewshot=5, selection_seed=seed
        )
        exemplars = [r["question"] for r in bench.heldout.shots]
        assert [r["question"] for r in bench.selection.shots] == exemplars
        assert not set(exemplars) & {r["question"] for r in bench.selection.rows}
        shots.append(exemplars)
    assert all(s == shots[0] for s in shots)
