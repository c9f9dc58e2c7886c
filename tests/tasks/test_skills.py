"""The two skills of the SmolLM2 merge: seeded, disjoint, and judged by their own rules."""

from __future__ import annotations

import re

import pytest

from sparse_merge.errors import ConfigError
from sparse_merge.tasks.skills import PythonFunctions, WordProblems, final_answer_match


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


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="n_select"):
        WordProblems(n_select=-1)
    with pytest.raises(ConfigError, match="timeout_s"):
        PythonFunctions(timeout_s=0)
