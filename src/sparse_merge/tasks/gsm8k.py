"""GSM8K: grade-school maths word problems; 1 when the final number matches.

Rows as in ``openai/gsm8k`` (``main``): ``question`` and ``answer`` (a worked solution ending in
``#### <number>``). Prompt: ``num_fewshot`` worked exemplars from the training split (fixed by
``data_seed``), then the question: plain ``Question: ...\\nAnswer:`` text, or chat turns through
the tokenizer's chat template when it has one (``chat_template``). Greedy generation stops at
the next ``Question:``. The prediction is the number after ``####`` when the completion has one,
else its last number; both sides are compared as numbers (``1,000`` = ``1000.00``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from sparse_merge.errors import check_choice, check_int
from sparse_merge.tasks.base import Example
from sparse_merge.tasks.data import DatasetBenchmark, Row, require_string
from sparse_merge.tasks.generation import (
    CHAT_MODES,
    FewShotTask,
)

NUMBER = re.compile(r"-?[$]?\d[\d,]*(?:\.\d+)?|-?\.\d+")
FINAL = re.compile(r"####\s*(" + NUMBER.pattern + ")")


def normalize_number(text: str) -> Decimal | None:
    """``text`` as a number (commas, ``$`` and a trailing ``.`` ignored), or ``None``."""
    cleaned = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def extract_answer(completion: str) -> Decimal | None:
    """The number after ``####`` if the completion has one, else its last number."""
    final = FINAL.search(completion)
    if final:
        return normalize_number(final.group(1))
    numbers = NUMBER.findall(completion)
    return normalize_number(numbers[-1]) if numbers else None


def gold_answer(row: Row) -> Decimal:
    """The reference number of a row (after ``####``); ``ValueError`` when there is none (the
    last number of the solution is not taken instead)."""
    answer = row["answer"]
    start = answer.rfind("####")
    final = FINAL.match(answer, start) if start >= 0 else None
    value = normalize_number(final.group(1)) if final else None
    if value is None:
        raise ValueError(
            f"field 'answer' has no final '#### <number>' (it ends {answer[-60:]!r}); "
            "a GSM8K answer is a worked solution ending in '#### <number>'"
        )
    return value


def solution(row: Row) -> str:
    """A row's worked solution with its ``#### <number>`` line."""
    return row["answer"].strip()


class GSM8KTask(FewShotTask):
    """GSM8K rows scored by exact numeric match of the extracted final answer."""

    def __init__(
        self,
        name: str,
        rows: Sequence[Row],
        fewshot: Sequence[Row],
        chat_template: str = "auto",
        max_new_tokens: int = 256,
        batch_size: int = 32,
    ) -> None:
        self.name, self.rows, self.shots = name, list(rows), list(fewshot)
        self.chat_template = chat_template
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.stop: tuple[str, ...] = ("\n\nQuestion:", "Question:")
        self.golds = [gold_answer(r) for r in self.rows]

    def question(self, row: Row) -> str:
        """The question text."""
        return row["question"]

    def answer(self, row: Row) -> str:
        """The worked solution."""
        return solution(row)

    def plain_prompt(self, row: Row) -> str:
        """``Question: ...\nAnswer: ...`` exemplars, then the row's question."""
        shots = "".join(f"Question: {s['question']}\nAnswer: {solution(s)}\n\n" for s in self.shots)
        return f"{shots}Question: {row['question']}\nAnswer:"

    def judge(self, predictions: list[str]) -> list[float]:
        """1.0 where the extracted number equals the reference."""
        return [float(extract_answer(p) == g) for p, g in zip(predictions, self.golds)]


class GSM8K(DatasetBenchmark):
    """GSM8K (``openai/gsm8k``, ``main``): selection and training rows from ``train`` (disjoint),
    held-out rows from ``test``."""

    name = "gsm8k"
    hub_path = "openai/gsm8k"
    hub_name = "main"
    fields = ("question", "answer")

    def __init__(
        self,
        num_fewshot: int = 5,
        chat_template: str = "auto",
        max_new_tokens: int = 256,
        batch_size: int = 32,
        **split_options: Any,
    ) -> None:
        check_int("num_fewshot", num_fewshot)
        check_int("max_new_tokens", max_new_tokens, minimum=1)
        check_int("batch_size", batch_size, minimum=1)
        check_choice("chat_template", chat_template, CHAT_MODES)
        super().__init__(**split_options)
        self.num_fewshot, self.chat_template = num_fewshot, chat_template
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def check_row(self, row: Row) -> None:
        """``question`` and ``answer`` strings, the answer ending in ``#### <number>``."""
        super().check_row(row)
        require_string(row, "question")
        require_string(row, "answer")
        gold_answer(row)

    def key(self, row: Row) -> str:
        """The question text."""
        return row["question"].strip()

    def example(self, row: Row) -> Example:
        """``Question: ...\\nAnswer:`` and the worked solution."""
        return Example(f"Question: {row['question']}\nAnswer:", " " + solution(row))

    def make_task(self, name: str, rows: list[Row]) -> GSM8KTask:
        """A ``GSM8KTask`` over ``rows`` with this benchmark's exemplars."""
        return GSM8KTask(
            name,
            rows,
            self.fewshot(),
            self.chat_template,
            self.max_new_tokens,
            self.batch_size,
        )
