"""BoolQ: yes/no questions about a passage, by the log-likelihood of `` no`` and `` yes``.

Rows as in ``google/boolq`` (``question``, ``passage``, ``answer``: bool) or SuperGLUE's
``boolq`` (``label``: 0/1 instead of ``answer``). Context, as in lm-evaluation-harness:
``{passage}\\nQuestion: {question}?\\nAnswer:``.
"""

from __future__ import annotations

from sparse_merge.errors import check_choice, check_positive
from sparse_merge.tasks.base import Example
from sparse_merge.tasks.choice import LENGTH_NORMS, Choice, MultipleChoiceTask
from sparse_merge.tasks.data import DataFiles, DatasetBenchmark, Row

OPTIONS = (" no", " yes")


def context(row: Row) -> str:
    """The prompt before the option."""
    return f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"


def label(row: Row) -> int:
    """1 for yes, 0 for no."""
    value = row["answer"] if "answer" in row else row["label"]
    return int(bool(value))


class BoolQ(DatasetBenchmark):
    """BoolQ (``google/boolq``): selection and training rows from ``train`` (disjoint),
    held-out rows from ``validation`` (the test split has no labels)."""

    name = "boolq"
    hub_path = "google/boolq"
    hub_name = None

    def __init__(
        self,
        data_files: DataFiles = None,
        selection_split: str = "train",
        heldout_split: str = "validation",
        train_split: str = "train",
        n_select: int | None = 200,
        n_heldout: int | None = 1000,
        length_norm: str = "none",
        batch_size: int = 16,
        data_seed: int = 0,
        selection_seed: int = 0,
        hub_path: str | None = None,
        hub_name: str | None = None,
    ) -> None:
        check_choice("length_norm", length_norm, LENGTH_NORMS)
        check_positive("batch_size", batch_size)
        super().__init__(
            data_files,
            selection_split,
            heldout_split,
            train_split,
            n_select,
            n_heldout,
            data_seed,
            selection_seed,
            hub_path,
            hub_name,
        )
        self.length_norm, self.batch_size = length_norm, batch_size

    def key(self, row: Row) -> str:
        """Question and passage."""
        return f"{row['question']}\n{row['passage']}"

    def example(self, row: Row) -> Example:
        """The context and the right option."""
        return Example(context(row), OPTIONS[label(row)])

    def make_task(self, name: str, rows: list[Row]) -> MultipleChoiceTask:
        """Two options per row: `` no`` and `` yes``."""
        items = [Choice(context(r), OPTIONS, label(r)) for r in rows]
        return MultipleChoiceTask(name, items, self.length_norm, self.batch_size)
