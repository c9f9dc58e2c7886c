"""The two skills of the SmolLM2 merge: seeded, disjoint, and judged by their own rules."""

from __future__ import annotations

import ast
import re

import pytest

from sparse_merge.errors import ConfigError
from sparse_merge.tasks.skills import PythonFunctions, WordProblems, final_answer_match

# How a reader solves each story: the numbers in the order the text gives them -> the answer.
STORIES = (
    (
        r"has (\d+) \w+\. \w+ buys (\d+) bags with (\d+) \w+ in each bag and then gives (\d+)",
        lambda a, b, c, d: a + b * c - d,
    ),
    (
        r"has (\d+) \w+\. Every day (\d+) more \w+ arrive, for (\d+) days\. Then (\d+) \w+ "
        r"are sold",
        lambda a, b, c, d: a + b * c - d,
    ),
    (
        r"earns (\d+) dollars each week for (\d+) weeks and then spends (\d+) dollars",
        lambda a, b, c: a * b - c,
    ),
    (
        r"reads (\d+) pages every day for (\d+) days and then reads (\d+) more pages",
        lambda a, b, c: a * b + c,
    ),
    (
        r"There are (\d+) boxes with (\d+) \w+ in each box\. \w+ takes out (\d+) \w+ and puts "
        r"in (\d+) new",
        lambda a, b, c, d: a * b - c + d,
    ),
)

# What each step of a function description means, read from its words.
STEPS = (
    (r"adds (\d+) to it", lambda v, k: v + int(k)),
    (r"subtracts (\d+) from it", lambda v, k: v - int(k)),
    (r"multiplies it by (\d+)", lambda v, k: v * int(k)),
    (r"takes the remainder of dividing it by (\d+)", lambda v, k: v % int(k)),
    (r"divides it by (\d+), rounding down", lambda v, k: v // int(k)),
    (r"squares it", lambda v: v * v),
    (r"reverses it", lambda v: v[::-1]),
    (r"converts it to upper case", lambda v: v.upper()),
    (r"converts it to lower case", lambda v: v.lower()),
    (r"repeats it (\d+) times", lambda v, k: v * int(k)),
    (r"keeps its first (\d+) characters", lambda v, k: v[: int(k)]),
    (r"adds '([^']*)' to its end", lambda v, w: v + w),
)


def _solve_story(prompt: str) -> int:
    """The answer to a word problem, from its text alone."""
    (value,) = [
        solve(*map(int, m.groups()))
        for pattern, solve in STORIES
        if (m := re.search(pattern, prompt))
    ]
    return value


def _run_description(prompt: str, argument: object) -> object:
    """What the function a prompt describes returns for ``argument``, from the words alone."""
    steps = re.search(r"takes (?:an integer x|a string s), (.*), and returns the result\.", prompt)
    value = argument
    for step in steps.group(1).split(", then "):
        (value,) = [
            apply(value, *m.groups())
            for pattern, apply in STEPS
            if (m := re.fullmatch(pattern, step))
        ]
    return value


def _arith(line: str) -> tuple[int, int]:
    """(left-hand value, stated result) of a step such as ``13 * 8 = 104``."""
    lhs, rhs = line.split(" = ")
    a, op, b = lhs.split()
    return {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op], int(rhs)


def test_word_problem_solutions_are_right_and_use_the_problem_numbers():
    bench = WordProblems(n_select=16, n_heldout=64)
    for e in bench.heldout.examples + bench.selection.examples:
        work, final = e.answer.strip().rsplit(". The answer is ", 1)
        steps = work.split(". ")
        values = [_arith(s) for s in steps]
        assert all(computed == stated for computed, stated in values)
        # each step starts from the previous result; the final number is the last result
        for prev, step in zip(values, steps[1:]):
            assert int(step.split()[0]) == prev[1]
        assert int(final.rstrip(".")) == values[-1][1] >= 0
        problem_numbers = {int(n) for n in re.findall(r"\d+", e.prompt)}
        operands = {int(n) for s in steps for n in s.split(" = ")[0].split()[::2]}
        assert operands - {v[1] for v in values} <= problem_numbers


def test_word_problem_answers_are_what_the_story_says():
    bench = WordProblems(n_select=0, n_heldout=200)
    finals = [int(e.answer.rsplit("answer is ", 1)[1].rstrip(".")) for e in bench.heldout.examples]
    assert finals == [_solve_story(e.prompt) for e in bench.heldout.examples]
    stories = [[bool(re.search(p, e.prompt)) for p, _ in STORIES] for e in bench.heldout.examples]
    assert all(map(any, zip(*stories)))  # every template is drawn


def test_only_the_final_number_is_judged():
    assert final_answer_match(" 2 * 3 = 6. The answer is 6.", " 2 * 3 = 6. The answer is 6.")
    assert final_answer_match(" 6. The answer is 6. Extra", " x. The answer is 6.")
    assert not final_answer_match(" The answer is 7.", " The answer is 6.")
    assert not final_answer_match(" 6", " The answer is 6.")


def test_same_seed_same_datapoints_and_splits_disjoint():
    a, b = WordProblems(n_select=8, n_heldout=16), WordProblems(n_select=8, n_heldout=16)
    assert a.heldout.examples == b.heldout.examples and a.selection.examples == b.selection.examples
    other = WordProblems(n_select=8, n_heldout=16, selection_seed=1)
    assert other.heldout.examples == a.heldout.examples
    assert other.selection.examples != a.selection.examples
    evaluated = {e.prompt for e in a.heldout.examples + a.selection.examples}
    assert len(evaluated) == 24
    assert not evaluated & {e.prompt for e in a.train_examples(500, seed=0)}


def test_reference_functions_pass_their_asserts_and_wrong_ones_fail():
    bench = PythonFunctions(n_select=4, n_heldout=12)
    task = bench.heldout
    answers = [e.answer for e in task.examples]
    assert task.judge(answers) == [1.0] * 12
    assert task.judge([" 0"] * 12) == [0.0] * 12
    assert task.judge([a + "\n\nimport os" for a in answers]) == [1.0] * 12  # cut at blank line
    assert not {e.prompt for e in task.examples} & {
        e.prompt for e in bench.train_examples(300, seed=0)
    }
    assert all(
        e.prompt.endswith(("def f(x):\n    return", "def f(s):\n    return")) for e in task.examples
    )


def test_function_asserts_check_what_the_description_says():
    bench = PythonFunctions(n_select=0, n_heldout=100)
    task = bench.heldout
    for example, tests in zip(task.examples, task.tests):
        assert len(tests) == 4
        for line in tests:
            compare = ast.parse(line).body[0].test
            argument = ast.literal_eval(compare.left.args[0])
            expected = ast.literal_eval(compare.comparators[0])
            assert _run_description(example.prompt, argument) == expected, (example.prompt, line)


def test_functions_are_judged_by_running_them():
    bench = PythonFunctions(n_select=0, n_heldout=12)
    task = bench.heldout
    # another text for the same function passes; one that is off on every input fails
    assert task.judge([f" ({e.answer.strip()})" for e in task.examples]) == [1.0] * 12
    off = [" '?'" if "def f(s):" in e.prompt else " 1" for e in task.examples]
    assert (
        task.judge([f" ({e.answer.strip()}) +{o}" for e, o in zip(task.examples, off)])
        == [0.0] * 12
    )


def test_same_seed_same_functions_and_asserts():
    a, b = PythonFunctions(n_select=4, n_heldout=8), PythonFunctions(n_select=4, n_heldout=8)
    assert a.heldout.examples == b.heldout.examples and a.heldout.tests == b.heldout.tests
    assert a.train_examples(20, seed=3) == b.train_examples(20, seed=3)
    assert a.train_examples(20, seed=3) != a.train_examples(20, seed=4)


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="n_select"):
        WordProblems(n_select=-1)
    with pytest.raises(ConfigError, match="timeout_s"):
        PythonFunctions(timeout_s=0)
