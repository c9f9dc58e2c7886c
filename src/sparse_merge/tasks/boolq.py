"""BoolQ: yes/no questions about a passage, by the log-likelihood of `` no`` and `` yes``.

Rows as in ``google/boolq`` (``question``, ``passage``, ``answer``: bool) or SuperGLUE's
``boolq`` (``label``: 0/1 instead of ``answer``). Context, as in lm-evaluation-harness:
``{passage}\\nQuestion: {question}?\\nAnswer:``.
"""

from __future__ import annotations

from sparse_merge.tasks.base import Example
from sparse_merge.tasks.choice import Choice, ChoiceBenchmark
from sparse_merge.tasks.data import Row

OPTIONS = (" no", " yes")


def context(row: Row) -> str:
    """The prompt before the option."""
    return f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"


def label(row: Row) -> int:
    """1 for yes, 0 for no."""
    value = row["answer"] if "answer" in row else row["label"]
    return int(bool(value))


class BoolQ(ChoiceBenchmark):
    """BoolQ (``google/boolq``): selection and training rows from ``train`` (disjoint),
    held-out rows from ``validation`` (the test split has no labels)."""

    name = "boolq"
    hub_path = "google/boolq"
    hub_name = None
    fields = ("question", "passage", "answer|label")
    default_length_norm = "none"

    def key(self, row: Row) -> str:
        """Question and passage."""
        return f"{row['question']}\n{row['passage']}"

    def example(self, row: Row) -> Example:
        """The context and the right option."""
        return Example(context(row), OPTIONS[label(row)])

    def choice(self, row: Row) -> Choice:
        """Two options per row: `` no`` and `` yes``."""
        return Choice(context(row), OPTIONS, label(row))
