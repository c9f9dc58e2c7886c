"""Code benchmarks (MBPP, HumanEval): greedy completions turned into programs that run in the
``Sandbox``; a datapoint scores 1 when its program runs to its end."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sparse_merge.errors import check_choice, check_int
from sparse_merge.tasks.data import DatasetBenchmark, Row
from sparse_merge.tasks.generation import CHAT_MODES, FewShotTask
from sparse_merge.tasks.sandbox import Sandbox, SandboxResult


class CodeTask(FewShotTask):
    """Rows scored by running, in a sandbox, the program each completion makes (``program``)."""

    stop: tuple[str, ...] = ()

    def __init__(
        self,
        name: str,
        rows: Sequence[Row],
        fewshot: Sequence[Row],
        sandbox: Sandbox,
        chat_template: str = "auto",
        max_new_tokens: int = 512,
        batch_size: int = 16,
    ) -> None:
        self.name, self.rows, self.shots = name, list(rows), list(fewshot)
        self.sandbox, self.chat_template = sandbox, chat_template
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.last_results: list[SandboxResult] = []

    def program(self, row: Row, completion: str) -> str:
        """The program the sandbox runs for one completion (the code and the row's tests)."""
        raise NotImplementedError

    def judge(self, predictions: list[str]) -> list[float]:
        """1.0 where the program of the completion runs to its end in the sandbox."""
        programs = [self.program(r, p) for r, p in zip(self.rows, predictions)]
        self.last_results = self.sandbox.run_many(programs, desc=self.name)
        return [float(r.passed) for r in self.last_results]


class CodeBenchmark(DatasetBenchmark):
    """A dataset benchmark scored by a ``CodeTask`` (``task_class``): the generation options and
    the sandbox's; the data and split options go on to ``DatasetBenchmark``."""

    task_class: type[CodeTask] = CodeTask

    def __init__(
        self,
        chat_template: str = "auto",
        max_new_tokens: int = 512,
        batch_size: int = 16,
        timeout_s: float = 10.0,
        memory_mb: int = 1024,
        workers: int = 4,
        isolation: str = "auto",
        kernel_guards: bool = True,
        **split_options: Any,
    ) -> None:
        check_int("max_new_tokens", max_new_tokens, minimum=1)
        check_int("batch_size", batch_size, minimum=1)
        check_choice("chat_template", chat_template, CHAT_MODES)
        super().__init__(**split_options)
        self.chat_template, self.max_new_tokens, self.batch_size = (
            chat_template,
            max_new_tokens,
            batch_size,
        )
        self.sandbox = Sandbox(
            timeout_s=timeout_s,
            memory_mb=memory_mb,
            workers=workers,
            isolation=isolation,
            kernel_guards=kernel_guards,
        )

    def make_task(self, name: str, rows: list[Row]) -> CodeTask:
        """A ``task_class`` task over ``rows`` with this benchmark's exemplars and sandbox."""
        return self.task_class(
            name,
            rows,
            self.fewshot(),
            self.sandbox,
            self.chat_template,
            self.max_new_tokens,
            self.batch_size,
        )
