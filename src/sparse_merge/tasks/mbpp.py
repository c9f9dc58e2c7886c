"""MBPP: write a Python function from its description; 1 when the task's asserts pass.

Rows as in ``google-research-datasets/mbpp`` (``full``: ``task_id``, ``text``, ``code``,
``test_list``, ``test_setup_code``; ``sanitized``: ``prompt`` and ``test_imports`` instead).
The prompt is the instruction of the MBPP paper (Austin et al., 2021), which lm-evaluation-harness
uses too, though with other exemplars (task ids 2-4) and a blank line between them (here one
newline and ``num_fewshot`` rows drawn by ``data_seed``), so its scores are not ours:
``You are an expert Python programmer, and here is your task: {text} Your code should pass these
tests:\\n\\n{asserts}\\n[BEGIN]\\n`` with ``num_fewshot`` solved exemplars before it, generation
stopping at ``[DONE]``. With a chat template the same text is the user turn and the code comes
back in a fenced block. The code is run with the asserts in the ``Sandbox``.
"""

from __future__ import annotations

import re
from typing import Any

from sparse_merge.errors import check_int
from sparse_merge.tasks.base import Example
from sparse_merge.tasks.code import CodeBenchmark, CodeTask
from sparse_merge.tasks.data import Row, require_string, require_strings

# any language tag (``python``, ``python3``, ``Python``, ``py``, none), as lm-eval's extractor
FENCE = re.compile(r"```[ \t]*[\w+.-]*[ \t]*\r?\n(.*?)(?:```|$)", re.DOTALL)


def description(row: Row) -> str:
    """The task text (``text`` in the full set, ``prompt`` in the sanitized one)."""
    return str(row.get("text") or row.get("prompt") or "").strip()


def asserts(row: Row) -> list[str]:
    """The task's test asserts."""
    return [str(t) for t in row["test_list"]]


def setup_code(row: Row) -> str:
    """Code to run before the solution (``test_setup_code`` or ``test_imports``)."""
    imports = row.get("test_imports")
    if imports is not None and len(imports) > 0:
        return "\n".join(imports)
    return str(row.get("test_setup_code") or "")


def task_text(row: Row) -> str:
    """The instruction of the MBPP paper's prompt for one row."""
    tests = "\n".join(asserts(row))
    return (
        f"You are an expert Python programmer, and here is your task: {description(row)} "
        f"Your code should pass these tests:\n\n{tests}"
    )


def extract_code(completion: str) -> str:
    """The code in a completion: the first fenced block if there is one, else the text before
    ``[DONE]`` (a leading ``[BEGIN]`` dropped)."""
    fenced = FENCE.search(completion)
    if fenced:
        return fenced.group(1).strip("\n")
    code = completion.split("[DONE]", 1)[0]
    return code.replace("[BEGIN]", "", 1).strip("\n")


def program(row: Row, code: str) -> str:
    """The program the sandbox runs: setup, the candidate code, then every assert."""
    return f"{setup_code(row)}\n{code}\n\n" + "\n".join(asserts(row)) + "\n"


class MBPPTask(CodeTask):
    """MBPP rows scored by running the generated code against their asserts in a sandbox."""

    stop = ("[DONE]",)

    def question(self, row: Row) -> str:
        """The task text with its asserts."""
        return task_text(row)

    def answer(self, row: Row) -> str:
        """The reference code in a Python block."""
        return f"```python\n{row['code']}\n```"

    def plain_prompt(self, row: Row) -> str:
        """The paper's format: exemplars between ``[BEGIN]`` and ``[DONE]``, then the task."""
        shots = "".join(f"{task_text(s)}\n[BEGIN]\n{s['code']}\n[DONE]\n" for s in self.shots)
        return f"{shots}{task_text(row)}\n[BEGIN]\n"

    def program(self, row: Row, completion: str) -> str:
        """The extracted code with the row's setup and asserts (``program``)."""
        return program(row, extract_code(completion))


class MBPP(CodeBenchmark):
    """MBPP (``google-research-datasets/mbpp``): selection from ``validation``, held-out from
    ``test``, training rows from ``train``, few-shot exemplars from ``prompt`` by default."""

    name = "mbpp"
    hub_path = "google-research-datasets/mbpp"
    hub_name = "full"
    fields = ("text|prompt", "code", "test_list")

    task_class = MBPPTask

    def __init__(self, fewshot_split: str = "prompt", num_fewshot: int = 3, **options: Any) -> None:
        """``options``: the generation and sandbox options of ``CodeBenchmark`` and the data and
        split options of ``DatasetBenchmark``."""
        check_int("num_fewshot", num_fewshot)
        super().__init__(**{"selection_split": "validation", "n_select": 64, **options})
        self.fewshot_split, self.num_fewshot = fewshot_split, num_fewshot

    def check_row(self, row: Row) -> None:
        """A description, ``code`` as a string, ``test_list`` (and ``test_imports`` when given)
        as lists of strings: a string there would become one assert per character."""
        super().check_row(row)
        require_string(row, "code")
        require_strings(row, "test_list")
        if row.get("test_imports") is not None:
            require_strings(row, "test_imports")

    def key(self, row: Row) -> str:
        """The task description and its asserts."""
        return description(row) + "\n" + "\n".join(asserts(row))

    def example(self, row: Row) -> Example:
        """Zero-shot prompt in the paper's format; the reference code and ``[DONE]`` as answer."""
        return Example(f"{task_text(row)}\n[BEGIN]\n", f"{row['code']}\n[DONE]")
