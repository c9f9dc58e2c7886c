"""Two skills a small pretrained LLM (SmolLM2-135M) lacks, for the real merge experiment.

* ``WordProblems`` (``word_problems``): templated multi-step arithmetic word problems (two or
  three operations among ``+ - ×`` on small integers, five story templates, names and
  objects). The reference answer works the arithmetic out step by step and ends with
  "The answer is N."; a completion scores 1 when the number after "answer is" is N.
* ``PythonFunctions`` (``python_functions``): a description of a small function made of two or
  three steps from a fixed vocabulary (integer arithmetic, or string operations); the prompt
  ends with ``def f(x):`` and ``return``, the completion is the returned expression. Scored
  **by execution**: the function, cut at the completion's first blank line, runs in the
  sandbox (``tasks.sandbox``) with four asserts on fixed inputs; it scores 1 when every assert
  passes.

Both are seeded generators on ``ToyTask``: the same seed gives the same datapoints, and a
stable hash of each prompt keeps every evaluated prompt out of every training set.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from sparse_merge.errors import check_positive
from sparse_merge.tasks.base import Example
from sparse_merge.tasks.generation import ExactMatchTask, GenerationTask
from sparse_merge.tasks.sandbox import Sandbox, SandboxResult
from sparse_merge.tasks.toy import ToyTask

NAMES = ("Mia", "Ben", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Eva", "Tom", "Nora", "Omar")
OBJECTS = ("apples", "stickers", "marbles", "pencils", "cookies", "stamps", "shells", "cards")
PLACES = ("shop", "library", "farm", "bakery", "school", "museum")


@dataclass(frozen=True)
class Story:
    """A word problem: its text and the worked solution, computed from the same numbers."""

    text: str
    steps: tuple[str, ...]  # "13 * 8 = 104", ... in order; the last result is the answer
    answer: int


def _steps(first: int, *ops: tuple[str, int]) -> tuple[tuple[str, ...], int]:
    """The worked arithmetic of ``first`` followed by ``(op, operand)`` steps, and the result."""
    value, out = first, []
    for op, x in ops:
        new = {"+": value + x, "-": value - x, "*": value * x}[op]
        out.append(f"{value} {op} {x} = {new}")
        value = new
    return tuple(out), value


def _word_problem(rng: random.Random) -> Story:
    """One problem from one of five templates (two or three operations)."""
    name, friend = rng.sample(NAMES, 2)
    obj, place = rng.choice(OBJECTS), rng.choice(PLACES)
    kind = rng.randrange(5)
    if kind == 0:
        a, b, c = rng.randint(5, 40), rng.randint(2, 9), rng.randint(2, 12)
        d = rng.randint(1, a + b * c - 1)
        text = (
            f"{name} has {a} {obj}. {name} buys {b} bags with {c} {obj} in each bag and then "
            f"gives {d} {obj} to {friend}. How many {obj} does {name} have now?"
        )
        return Story(text, *_steps(b, ("*", c), ("+", a), ("-", d)))
    if kind == 1:
        a, b, c = rng.randint(10, 60), rng.randint(2, 12), rng.randint(2, 7)
        d = rng.randint(1, a + b * c - 1)
        text = (
            f"A {place} has {a} {obj}. Every day {b} more {obj} arrive, for {c} days. Then "
            f"{d} {obj} are sold. How many {obj} does the {place} have now?"
        )
        return Story(text, *_steps(b, ("*", c), ("+", a), ("-", d)))
    if kind == 2:
        a, b = rng.randint(5, 30), rng.randint(2, 9)
        c = rng.randint(1, a * b - 1)
        text = (
            f"{name} earns {a} dollars each week for {b} weeks and then spends {c} dollars. "
            f"How many dollars does {name} have left?"
        )
        return Story(text, *_steps(a, ("*", b), ("-", c)))
    if kind == 3:
        a, b, c = rng.randint(3, 25), rng.randint(2, 9), rng.randint(1, 50)
        text = (
            f"{name} reads {a} pages every day for {b} days and then reads {c} more pages. "
            f"How many pages does {name} read in all?"
        )
        return Story(text, *_steps(a, ("*", b), ("+", c)))
    a, b = rng.randint(2, 9), rng.randint(3, 12)
    c, d = rng.randint(1, a * b - 1), rng.randint(1, 20)
    text = (
        f"There are {a} boxes with {b} {obj} in each box. {name} takes out {c} {obj} and "
        f"puts in {d} new {obj}. How many {obj} are in the boxes now?"
    )
    return Story(text, *_steps(a, ("*", b), ("-", c), ("+", d)))


ANSWER = re.compile(r"answer is (-?\d+)")


def final_answer_match(prediction: str, answer: str) -> bool:
    """Whether the number after "answer is" in ``prediction`` equals the one in ``answer``."""
    got, want = ANSWER.search(prediction), ANSWER.search(answer)
    return got is not None and want is not None and got.group(1) == want.group(1)


class WordProblems(ToyTask):
    """Multi-step arithmetic word problems; the answer works the steps out, then gives the
    number ("... The answer is 77."), and only that number is judged."""

    name = "word_problems"
    max_new_tokens = 48

    def make_task(self, name: str, examples: list[Example]) -> ExactMatchTask:
        """Exact match of the final number."""
        return ExactMatchTask(
            name, examples, self.max_new_tokens, self.batch_size, match=final_answer_match
        )

    def _params(self) -> dict[str, object]:
        return {}

    def sample(self, rng: random.Random) -> Example:
        """One random problem and its worked solution."""
        story = _word_problem(rng)
        work = ". ".join(story.steps)
        return Example(
            f"Question: {story.text}\nAnswer:", f" {work}. The answer is {story.answer}."
        )


# Function steps: (description, expression template on the previous value `{v}`, argument range)
INT_STEPS = (
    ("adds {k} to it", "{v} + {k}", (1, 20)),
    ("subtracts {k} from it", "{v} - {k}", (1, 20)),
    ("multiplies it by {k}", "{v} * {k}", (2, 9)),
    ("takes the remainder of dividing it by {k}", "{v} % {k}", (2, 9)),
    ("divides it by {k}, rounding down", "{v} // {k}", (2, 9)),
    ("squares it", "{v} ** 2", None),
)
STR_STEPS = (
    ("reverses it", "{v}[::-1]", None),
    ("converts it to upper case", "{v}.upper()", None),
    ("converts it to lower case", "{v}.lower()", None),
    ("repeats it {k} times", "{v} * {k}", (2, 4)),
    ("keeps its first {k} characters", "{v}[:{k}]", (1, 4)),
    ("adds '{w}' to its end", "{v} + '{w}'", None),
)
INT_INPUTS = (0, 3, -4, 11)
STR_INPUTS = ("abc", "Hello", "xyZ9", "merge")
SUFFIXES = ("!", "ab", "-x", "ok")


def _function(rng: random.Random) -> tuple[str, str, str, list[str]]:
    """(argument name, description, body expression, asserts) of a random two- or three-step
    function."""
    strings = rng.random() < 0.5
    steps, inputs = (STR_STEPS, STR_INPUTS) if strings else (INT_STEPS, INT_INPUTS)
    what = "a string s" if strings else "an integer x"
    var = "s" if strings else "x"
    expr, parts = var, []
    for desc, template, span in rng.sample(steps, rng.randint(2, 3)):
        k = rng.randint(*span) if span else 0
        w = rng.choice(SUFFIXES)
        parts.append(desc.format(k=k, w=w))
        expr = template.format(v=expr if expr == var else f"({expr})", k=k, w=w)
    steps_text = ", then ".join(parts)
    description = (
        f"Write a Python function f({var}) that takes {what}, {steps_text}, and returns the result."
    )
    env: dict[str, object] = {}
    exec(f"def f({var}):\n    return {expr}\n", env)  # noqa: S102 - our own generated code
    fn = env["f"]
    asserts = [f"assert f({v!r}) == {fn(v)!r}" for v in inputs]  # type: ignore[operator]
    return var, description, expr, asserts


def extract_function(completion: str) -> str:
    """The code of a completion: everything before its first blank line."""
    return completion.split("\n\n", 1)[0].rstrip()


class FunctionTask(ExactMatchTask):
    """Prompts whose completions are judged by running them against their asserts."""

    datapoints = ("examples", "tests")  # indexed by datapoint (``distributed``)

    def __init__(
        self,
        name: str,
        examples: Sequence[Example],
        tests: Sequence[Sequence[str]],
        sandbox: Sandbox,
        max_new_tokens: int,
        batch_size: int,
    ) -> None:
        super().__init__(name, examples, max_new_tokens, batch_size, stop=("\n\n",))
        self.tests, self.sandbox = [list(t) for t in tests], sandbox
        self.last_results: list[SandboxResult] = []

    def program(self, index: int, completion: str) -> str:
        """The prompt's ``def`` line, the completion's body, then the datapoint's asserts."""
        header = self.examples[index].prompt.split("\n", 1)[1]  # "def f(x):\n    return"
        code = header + extract_function(completion)
        return code + "\n\n" + "\n".join(self.tests[index]) + "\n"

    def judge(self, predictions: list[str]) -> list[float]:
        """1.0 where the generated function passes all of its asserts in the sandbox."""
        programs = [self.program(i, p) for i, p in enumerate(predictions)]
        self.last_results = self.sandbox.run_many(programs, desc=self.name)
        return [float(r.passed) for r in self.last_results]

    def score(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        """[N] float: 1 where every assert passed (not ``ExactMatchTask``'s bool)."""
        return GenerationTask.score(self, model, tokenizer)


class PythonFunctions(ToyTask):
    """Small Python functions from a description, scored by running four asserts."""

    name = "python_functions"
    max_new_tokens = 32

    def __init__(
        self,
        n_select: int = 32,
        n_heldout: int = 128,
        data_seed: int = 0,
        selection_seed: int = 0,
        batch_size: int = 32,
        timeout_s: float = 5.0,
    ) -> None:
        check_positive("timeout_s", timeout_s)
        self.sandbox = Sandbox(timeout_s=timeout_s, memory_mb=256)
        self._tests: dict[str, list[str]] = {}
        super().__init__(n_select, n_heldout, data_seed, selection_seed, batch_size)

    def make_task(self, name: str, examples: list[Example]) -> FunctionTask:
        """Completions run against each prompt's asserts."""
        tests = [self._tests[e.prompt] for e in examples]
        return FunctionTask(
            name, examples, tests, self.sandbox, self.max_new_tokens, self.batch_size
        )

    def _params(self) -> dict[str, object]:
        return {}

    def sample(self, rng: random.Random) -> Example:
        """One random function: the prompt ends with ``def f(x):`` and ``return``, the answer
        is the returned expression."""
        var, description, expr, asserts = _function(rng)
        prompt = f"# {description}\ndef f({var}):\n    return"
        self._tests.setdefault(prompt, asserts)
        return Example(prompt, f" {expr}")
