"""Answers to MT-Bench style questions, written in the format FastChat's judge reads.

Questions: JSONL lines ``{"question_id", "category", "turns": [str, ...]}`` (FastChat's
``question.jsonl``). Answers: JSONL lines ``{"question_id", "answer_id", "model_id",
"choices": [{"index": 0, "turns": [str, ...]}], "tstamp"}``, as
``fastchat/llm_judge/gen_model_answer.py`` writes them to ``model_answer/<model_id>.jsonl``.
Turn ``t`` of a question is answered with the conversation so far (earlier questions and the
model's own answers) as context, greedily; every question's turn ``t`` is generated in one batch.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from sparse_merge.tasks.generation import greedy_generate
from sparse_merge.tracking.io import write_atomic

Generate = Callable[[nn.Module, PreTrainedTokenizerBase, Sequence[str], int], list[str]]


def load_questions(path: str | Path) -> list[dict[str, Any]]:
    """Questions from a JSONL file (blank lines skipped)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    questions = [json.loads(line) for line in lines if line.strip()]
    for q in questions:
        if not q.get("turns"):
            raise ValueError(f"question {q.get('question_id')!r} in {path} has no turns")
    return questions


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The prompt for the next assistant turn: the tokenizer's chat template when it has one,
    else a plain ``User:``/``Assistant:`` transcript (whose answers stop at the next
    ``\nUser:``)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


PLAIN_STOP = ("\nUser:",)  # the next turn of the plain transcript: the answer ends before it


def _greedy(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], n: int
) -> list[str]:
    stop = () if getattr(tokenizer, "chat_template", None) else PLAIN_STOP
    return greedy_generate(model, tokenizer, prompts, max_new_tokens=n, batch_size=8, stop=stop)


def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[dict[str, Any]],
    model_id: str,
    max_new_tokens: int = 1024,
    generate: Generate = _greedy,
) -> list[dict[str, Any]]:
    """One answer record per question, every turn answered in conversation."""
    messages: list[list[dict[str, str]]] = [[] for _ in questions]
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max(len(q["turns"]) for q in questions)):
        active = [i for i, q in enumerate(questions) if turn < len(q["turns"])]
        for i in active:
            messages[i].append({"role": "user", "content": questions[i]["turns"][turn]})
        outputs = generate(
            model, tokenizer, [chat_prompt(tokenizer, messages[i]) for i in active], max_new_tokens
        )
        for i, text in zip(active, outputs):
            text = text.strip()
            answers[i].append(text)
            messages[i].append({"role": "assistant", "content": text})
    return [
        {
            "question_id": q["question_id"],
            "answer_id": uuid.uuid4().hex,
            "model_id": model_id,
            "choices": [{"index": 0, "turns": turns}],
            "tstamp": time.time(),
        }
        for q, turns in zip(questions, answers)
    ]


def write_answers(answers: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write answer records as JSONL, sorted by question id (as FastChat does), atomically."""
    body = "".join(json.dumps(a) + "\n" for a in sorted(answers, key=lambda a: a["question_id"]))
    return write_atomic(path, lambda tmp: tmp.write_text(body, encoding="utf-8"))
