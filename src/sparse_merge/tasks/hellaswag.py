"""HellaSwag: pick the ending of a short scene, by length-normalised log-likelihood.

Rows as in ``Rowan/hellaswag`` (``activity_label``, ``ctx_a``, ``ctx_b``, ``endings``: 4
strings, ``label``: "0".."3"). Context and endings are cleaned as in lm-evaluation-harness
(``[title]`` markers become ``. ``, other bracketed tags are dropped).
"""

from __future__ import annotations

import re

from sparse_merge.errors import check_choice, check_positive
from sparse_merge.tasks.base import Example
from sparse_merge.tasks.choice import LENGTH_NORMS, Choice, MultipleChoiceTask
from sparse_merge.tasks.data import DataFiles, DatasetBenchmark, Row


def clean(text: str) -> str:
    """lm-evaluation-harness's HellaSwag preprocessing."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def context(row: Row) -> str:
    """``activity: ctx_a Ctx_b``, cleaned."""
    return clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")


def options(row: Row) -> tuple[str, ...]:
    """The four endings, cleaned, each after a space."""
    return tuple(" " + clean(e) for e in row["endings"])


class HellaSwag(DatasetBenchmark):
    """HellaSwag (``Rowan/hellaswag``): selection and training rows from ``train`` (disjoint),
    held-out rows from ``validation`` (the test split has no labels)."""

    name = "hellaswag"
    hub_path = "Rowan/hellaswag"
    hub_name = None

    def __init__(
        self,
        data_files: DataFiles = None,
        selection_split: str = "train",
        heldout_split: str = "validation",
        train_split: str = "train",
        n_select: int | None = 200,
        n_heldout: int | None = 1000,
        length_norm: str = "char",
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
        """Context and endings."""
        return context(row) + "\n" + "\n".join(options(row))

    def example(self, row: Row) -> Example:
        """The context and the right ending."""
        return Example(context(row), options(row)[int(row["label"])])

    def make_task(self, name: str, rows: list[Row]) -> MultipleChoiceTask:
        """Four options per row."""
        items = [Choice(context(r), options(r), int(r["label"])) for r in rows]
        return MultipleChoiceTask(name, items, self.length_norm, self.batch_size)
