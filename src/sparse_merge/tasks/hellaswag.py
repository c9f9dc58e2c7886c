"""HellaSwag: pick the ending of a short scene, by length-normalised log-likelihood.

Rows as in ``Rowan/hellaswag`` (``activity_label``, ``ctx_a``, ``ctx_b``, ``endings``: 4
strings, ``label``: "0".."3"). Context and endings are cleaned as in lm-evaluation-harness
(``[title]`` markers become ``. ``, other bracketed tags are dropped).
"""

from __future__ import annotations

import re

from sparse_merge.tasks.base import Example
from sparse_merge.tasks.choice import Choice, ChoiceBenchmark
from sparse_merge.tasks.data import Row


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


class HellaSwag(ChoiceBenchmark):
    """HellaSwag (``Rowan/hellaswag``): selection and training rows from ``train`` (disjoint),
    held-out rows from ``validation`` (the test split has no labels)."""

    name = "hellaswag"
    hub_path = "Rowan/hellaswag"
    hub_name = None
    fields = ("activity_label", "ctx_a", "ctx_b", "endings", "label")
    default_length_norm = "char"

    def key(self, row: Row) -> str:
        """Context and endings."""
        return context(row) + "\n" + "\n".join(options(row))

    def example(self, row: Row) -> Example:
        """The context and the right ending."""
        return Example(context(row), options(row)[int(row["label"])])

    def choice(self, row: Row) -> Choice:
        """Four options per row."""
        return Choice(context(row), options(row), int(row["label"]))
