"""BFCL (Berkeley Function Calling Leaderboard), single-turn AST categories: ``simple``,
``multiple``, ``parallel`` and ``parallel_multiple``.

Questions: JSON lines ``{"id", "question": [[{"role", "content"}, ...]], "function": [schema,
...]}`` (BFCL v3; v1's plain-string ``question`` and single-dict ``function`` also load).
Possible answers: ``{"id", "ground_truth": [{func_name: {param: [allowed values]}}, ...]}``.

The model gets BFCL's prompt for prompting (not native tool calling) models, asking for calls as
``[func(a=1, b="x"), ...]``, through the chat template when the tokenizer has one. The reply is
parsed with ``ast``; it scores 1 when its calls match the expected calls one to one (any order):
same function name, no argument outside the possible answers, every given argument equal to one
of its allowed values, and every omitted argument optional (``""`` among its allowed values).

Approximations of BFCL's own ``ast_checker``: types are not checked against the schema (an
``int`` where a ``float`` is allowed matches by value, and so does ``5.0`` where ``5`` is; a
``bool`` never matches a number); strings are compared as BFCL does (case, spaces and
``,./-_*^`` ignored); calls are matched in any order (BFCL matches answer by answer, greedily).
Stricter than BFCL's parser: only keyword arguments with literal values are read, so a reply
with a positional argument, an expression (``base=2*5``) or a bare name (``name=pi``) scores 0
where BFCL evaluates or ignores them.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from sparse_merge.errors import ConfigError, DataError, check_choice, check_int
from sparse_merge.tasks.base import Example
from sparse_merge.tasks.data import (
    DatasetBenchmark,
    Row,
    check_data_files,
    load_split,
    require_fields,
)
from sparse_merge.tasks.generation import (
    CHAT_MODES,
    GenerationTask,
    render_chat,
    uses_chat_template,
)

CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple")
HUB = "hf://datasets/gorilla-llm/Berkeley-Function-Calling-Leaderboard"
SYSTEM = (
    "You are an expert in composing functions. You are given a question and a set of possible "
    "functions. Based on the question, you will need to make one or more function/tool calls to "
    "achieve the purpose. If none of the function can be used, point it out. If the given "
    "question lacks the parameters required by the function, also point it out. You should only "
    "return the function calls in your response.\n\nIf you decide to invoke any of the "
    "function(s), you MUST put it in the format of [func_name1(params_name1=params_value1, "
    "params_name2=params_value2...), func_name2(params)]\nYou SHOULD NOT include any other text "
    "in the response.\n\nHere is a list of functions in JSON format that you can invoke.\n"
    "{functions}\n"
)
Call = tuple[str, dict[str, Any]]
QUESTION_FIELDS = ("id", "question", "function")
ANSWER_FIELDS = ("id", "ground_truth")


def messages(row: Row) -> list[dict[str, str]]:
    """The user turn(s) of a row (the first turn of a v3 row, or a v1 plain string)."""
    q = row["question"]
    if isinstance(q, str):
        return [{"role": "user", "content": q}]
    turn = q[0] if q and isinstance(q[0], list) else q
    return [{"role": m["role"], "content": m["content"]} for m in turn]


def functions(row: Row) -> list[dict[str, Any]]:
    """The function schemas offered to the model."""
    f = row["function"]
    return [f] if isinstance(f, dict) else list(f)


def system_prompt(row: Row) -> str:
    """BFCL's instructions with the row's function schemas."""
    return SYSTEM.format(functions=json.dumps(functions(row), indent=4))


def plain_prompt(row: Row) -> str:
    """The prompt without a chat template: instructions, ``Question: ...``, ``Answer: ``."""
    question = "\n".join(m["content"] for m in messages(row))
    return f"{system_prompt(row)}\nQuestion: {question}\nAnswer: "


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    raise ValueError("not a function name")


def parse_calls(text: str) -> list[Call] | None:
    """``[f(a=1), g(b="x")]`` (or a bare ``f(a=1)``) as ``[(name, kwargs), ...]``; ``None`` when
    the text is not a list of calls with keyword arguments of literal values."""
    text = text.strip()
    fenced = re.search(r"```(?:python|json)?\s*\n?(.*?)```", text, re.DOTALL)
    if fenced:
        text = fenced.group(1).strip()
    try:
        tree = ast.parse(text, mode="eval").body
        nodes = tree.elts if isinstance(tree, ast.List | ast.Tuple) else [tree]
        calls = []
        for node in nodes:
            if not isinstance(node, ast.Call) or node.args:
                return None
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
            if None in kwargs:  # **kwargs
                return None
            calls.append((_name(node.func), kwargs))
        return calls or None
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None


def standardize(s: str) -> str:
    """BFCL's string normalisation: no case, spaces or ``,./-_*^``; single quotes as double."""
    return re.sub(r"[ ,./\-_*^]", "", s).lower().replace("'", '"')


def value_matches(value: Any, allowed: Any) -> bool:
    """Whether a given argument value equals an allowed value."""
    if isinstance(allowed, bool) or isinstance(value, bool):
        return isinstance(allowed, bool) and isinstance(value, bool) and value == allowed
    if isinstance(allowed, int | float) and isinstance(value, int | float):
        return float(value) == float(allowed)
    if isinstance(allowed, str) and isinstance(value, str):
        return standardize(value) == standardize(allowed)
    if isinstance(allowed, list | tuple) and isinstance(value, list | tuple):
        return len(value) == len(allowed) and all(map(value_matches, value, allowed))
    if isinstance(allowed, dict) and isinstance(value, dict):
        return params_match(value, allowed)
    return False


def params_match(args: dict[str, Any], expected: dict[str, Any]) -> bool:
    """Arguments against ``{param: [allowed values]}`` ("" allowed = the param is optional)."""
    if set(args) - set(expected):
        return False
    for param, allowed in expected.items():
        options = allowed if isinstance(allowed, list) else [allowed]
        if param not in args:
            if "" not in options:
                return False
        elif not any(value_matches(args[param], a) for a in options):
            return False
    return True


def call_matches(call: Call, expected: dict[str, dict[str, Any]]) -> bool:
    """One parsed call against one ``{func_name: {param: [allowed]}}`` entry."""
    ((name, params),) = expected.items()
    return call[0].replace(".", "_") == name.replace(".", "_") and params_match(call[1], params)


def calls_match(calls: Sequence[Call], ground_truth: Sequence[dict[str, Any]]) -> bool:
    """Whether the calls match the expected calls one to one, in any order."""
    if len(calls) != len(ground_truth):
        return False

    def assign(i: int, free: frozenset[int]) -> bool:
        if i == len(calls):
            return True
        return any(
            call_matches(calls[i], ground_truth[j]) and assign(i + 1, free - {j}) for j in free
        )

    return assign(0, frozenset(range(len(ground_truth))))


def reference_call(ground_truth: Sequence[dict[str, Any]]) -> str:
    """A correct reply built from the first allowed value of each required argument."""
    parts = []
    for entry in ground_truth:
        ((name, params),) = entry.items()
        args = []
        for p, allowed in params.items():
            options = allowed if isinstance(allowed, list) else [allowed]
            if options and options[0] != "":
                args.append(f"{p}={options[0]!r}")
        parts.append(f"{name}({', '.join(args)})")
    return "[" + ", ".join(parts) + "]"


class BFCLTask(GenerationTask):
    """BFCL rows scored by AST match of the generated calls with the possible answers."""

    datapoints = ("rows", "examples")  # indexed by datapoint (``distributed``)

    def __init__(
        self,
        name: str,
        rows: Sequence[Row],
        chat_template: str = "auto",
        max_new_tokens: int = 256,
        batch_size: int = 16,
    ) -> None:
        self.name, self.rows, self.chat_template = name, list(rows), chat_template
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.stop: tuple[str, ...] = ("\nQuestion:", "\n\n")

    def __len__(self) -> int:
        return len(self.rows)

    def prompt(self, tokenizer: PreTrainedTokenizerBase, row: Row) -> str:
        """BFCL's system prompt and the question (chat template or plain text)."""
        if uses_chat_template(tokenizer, self.chat_template):
            chat = [{"role": "system", "content": system_prompt(row)}, *messages(row)]
            try:
                return render_chat(tokenizer, chat)
            except Exception:  # templates without a system role: put it in the first user turn
                first = {"role": "user", "content": chat[0]["content"] + "\n" + chat[1]["content"]}
                return render_chat(tokenizer, [first, *chat[2:]])
        return plain_prompt(row)

    def prompts(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """One prompt per row."""
        return [self.prompt(tokenizer, row) for row in self.rows]

    def judge(self, predictions: list[str]) -> list[float]:
        """1.0 where the parsed calls match the possible answers."""
        out = []
        for pred, row in zip(predictions, self.rows):
            calls = parse_calls(pred)
            out.append(float(calls is not None and calls_match(calls, row["ground_truth"])))
        return out


class BFCL(DatasetBenchmark):
    """One BFCL category: selection, held-out and training rows drawn disjointly from its
    questions (BFCL has no train split)."""

    name = "bfcl"

    def __init__(
        self,
        category: str = "simple",
        questions: str | None = None,
        answers: str | None = None,
        n_select: int | None = 100,
        n_heldout: int | None = 200,
        chat_template: str = "auto",
        max_new_tokens: int = 256,
        batch_size: int = 16,
        data_seed: int = 0,
        selection_seed: int = 0,
    ) -> None:
        check_choice("category", category, CATEGORIES)
        check_choice("chat_template", chat_template, CHAT_MODES)
        check_int("max_new_tokens", max_new_tokens, minimum=1)
        check_int("batch_size", batch_size, minimum=1)
        if (questions is None) != (answers is None):
            raise ConfigError("answers", answers, "set together with questions (or both null)")
        check_data_files("questions", questions)
        check_data_files("answers", answers)
        super().__init__(None, "all", "all", "all", n_select, n_heldout, data_seed, selection_seed)
        self.category = category
        self.files = (
            questions or f"{HUB}/BFCL_v3_{category}.json",
            answers or f"{HUB}/possible_answer/BFCL_v3_{category}.json",
        )
        self.chat_template, self.max_new_tokens, self.batch_size = (
            chat_template,
            max_new_tokens,
            batch_size,
        )

    def check_question(self, row: Row) -> None:
        """A question row: ``id``, the user turn(s) and the function schemas."""
        require_fields(row, QUESTION_FIELDS, "each bfcl question")
        messages(row)
        functions(row)

    def check_answer(self, row: Row) -> None:
        """A possible-answer row: ``id`` and ``ground_truth``."""
        require_fields(row, ANSWER_FIELDS, "each bfcl possible answer")

    def rows(self, split: str) -> list[Row]:
        """Questions joined with their possible answers by ``id`` (one pool for every split)."""
        if "all" not in self._rows:
            questions = load_split(
                "all", self.files[0], key="bfcl.questions", check=self.check_question
            )
            answer_rows = load_split(
                "all", self.files[1], key="bfcl.answers", check=self.check_answer
            )
            answers = {a["id"]: a["ground_truth"] for a in answer_rows}
            missing = [q["id"] for q in questions if q["id"] not in answers]
            if missing:
                raise DataError(
                    str(self.files[1]), f"no possible answer for ids {missing[:5]}", "bfcl.answers"
                )
            gt = lambda g: [g] if isinstance(g, dict) else list(g)  # noqa: E731 - v1 single dict
            self._rows["all"] = [{**q, "ground_truth": gt(answers[q["id"]])} for q in questions]
        return self._rows["all"]

    def key(self, row: Row) -> str:
        """The question's text."""
        return json.dumps(messages(row))

    def example(self, row: Row) -> Example:
        """The plain prompt and a correct call."""
        return Example(plain_prompt(row), reference_call(row["ground_truth"]))

    def make_task(self, name: str, rows: list[Row]) -> BFCLTask:
        """A ``BFCLTask`` over ``rows``."""
        return BFCLTask(name, rows, self.chat_template, self.max_new_tokens, self.batch_size)
