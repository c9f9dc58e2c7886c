"""Benchmark rows from local files (JSON, JSON lines, parquet, CSV) or the Hugging Face hub,
and the fixed, seeded, disjoint subsets a benchmark is made of.

``data_files`` (the ``task...data_files`` config key) takes one of:

* ``null``: the benchmark's hub dataset (``hub_path``/``hub_name``), loaded with
  ``datasets.load_dataset`` (needs a network or a filled ``datasets`` cache);
* a path or a list of paths: one pool of rows that every split draws from (the subsets stay
  disjoint);
* a mapping ``{split: path or [paths]}``, e.g. ``{train: train.jsonl, test: test.jsonl}``.

Local files are read directly (``.json`` holding a list of rows, a ``{"data": [...]}`` object
or JSON lines; ``.jsonl``; ``.parquet``; ``.csv``; ``.txt`` as one ``{"text": ...}`` row; the
text formats also gzip-compressed, ``.jsonl.gz``). ``hf://`` and ``http(s)://`` paths go
through ``datasets.load_dataset``.

Every row is checked when it loads (``DatasetBenchmark.check_row``: the fields the benchmark
needs, and their values), so a bad file fails before any model loads, with a ``DataError`` of
one line naming the file, the line (``path:line`` in JSON lines; ``path row N`` in CSV, parquet
and JSON arrays), what is wrong and the config key that named the file.

Subsets: the held-out rows are drawn first from ``data_seed`` alone (the same across runs, so
reported numbers compare), the selection rows next from ``(data_seed, selection_seed)`` among
the rows not held out; training and few-shot rows come from what is left. Rows are told apart by
a key (the benchmark's question text), so two splits holding the same question never leak.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sparse_merge.errors import ConfigError, DataError, check_int
from sparse_merge.tasks.base import Example, Task

Row = dict[str, Any]
Located = list[tuple[str, Row]]  # (where, row): where is "path:line" or "path row N"
DataFiles = str | Sequence[str] | Mapping[str, str | Sequence[str]] | None
SUFFIXES = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
}
GZIP = ".gz"  # after the suffix of a text format: ``rows.jsonl.gz``
REMOTE = ("hf://", "http://", "https://")


def file_format(path: str | Path) -> str:
    """The suffix that tells a file's format: ``.jsonl`` for ``rows.jsonl`` and for
    ``rows.jsonl.gz`` (a text format, gzip-compressed); otherwise the last suffix."""
    path = Path(path)
    inner = Path(path.stem).suffix
    return (
        inner if path.suffix == GZIP and inner in SUFFIXES and inner != ".parquet" else path.suffix
    )


def _as_list(files: str | Sequence[str]) -> list[str]:
    return [files] if isinstance(files, str | Path) else [str(f) for f in files]


def check_data_files(key: str, data_files: DataFiles) -> None:
    """Raise ``ConfigError`` unless every local file in ``data_files`` exists with a known format."""
    if data_files is None:
        return
    groups = data_files.values() if isinstance(data_files, Mapping) else [data_files]
    for files in groups:
        for f in _as_list(files):
            if str(f).startswith(REMOTE):
                continue
            if file_format(f) not in SUFFIXES:
                raise ConfigError(
                    key,
                    str(f),
                    "a file ending in " + ", ".join(SUFFIXES) + f" (a text format also + {GZIP})",
                )
            if not Path(f).expanduser().is_file():
                raise ConfigError(key, str(f), "an existing file")


def _object(where: str, value: Any) -> Row:
    if not isinstance(value, dict):
        raise DataError(where, f"expected a JSON object, got {type(value).__name__}")
    return value


def _json_error(where: str, exc: json.JSONDecodeError) -> DataError:
    return DataError(where, f"not valid JSON ({exc.msg} at column {exc.colno})")


def _json_lines(path: Path, text: str) -> Located:
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # JSON lines end at "\n" only
        if line.strip():
            where = f"{path}:{n}"
            try:
                rows.append((where, _object(where, json.loads(line))))
            except json.JSONDecodeError as exc:
                raise _json_error(where, exc) from None
    return rows


def read_located(path: str | Path) -> Located:
    """Rows of one local file (format from its suffix), each with where it is in the file."""
    path = Path(path).expanduser()
    fmt = file_format(path)
    try:
        if fmt in (".parquet", ".csv"):
            import pandas as pd

            frame = pd.read_parquet(path) if fmt == ".parquet" else pd.read_csv(path)  # gz: too
            records = frame.to_dict(orient="records")
            return [(f"{path} row {i}", row) for i, row in enumerate(records, 1)]
        if path.suffix == GZIP:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                text = f.read()
        else:
            text = path.read_text(encoding="utf-8")
    except (gzip.BadGzipFile, EOFError) as exc:
        raise DataError(str(path), f"not a readable gzip file ({exc})") from None
    if fmt == ".txt":  # the whole file as one row
        return [(str(path), {"text": text})]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        first = next((line for line in text.split("\n") if line.strip()), "")
        try:
            json.loads(first)
        except json.JSONDecodeError:
            if fmt == ".json":  # one document over several lines: its own error line
                raise _json_error(f"{path}:{exc.lineno}", exc) from None
        return _json_lines(path, text)  # JSON lines (also what BFCL ships as ``.json``)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    elif isinstance(data, dict):  # a single row
        return [(str(path), data)]
    if not isinstance(data, list):
        raise DataError(
            str(path),
            f'expected a JSON object, a list of objects or {{"data": [...]}}, got '
            f"{type(data).__name__}",
        )
    return [(f"{path} row {i}", _object(f"{path} row {i}", r)) for i, r in enumerate(data, 1)]


def read_rows(path: str | Path) -> list[Row]:
    """Rows of one local file (format from its suffix)."""
    return [row for _, row in read_located(path)]


def missing_field(name: str, row: Row, expected: Sequence[str] = (), what: str = "each row") -> str:
    """What to say about a row without field ``name`` (``"a|b"``: either)."""
    names = " or ".join(repr(n) for n in name.split("|"))
    needs = f"; {what} needs {', '.join(expected)}" if expected else ""
    return f"no field {names}{needs} (it has {', '.join(map(str, row)) or 'no fields'})"


def require_fields(row: Row, fields: Sequence[str], what: str = "each row") -> None:
    """Raise ``ValueError`` naming the first of ``fields`` (``"a|b"``: either) ``row`` lacks."""
    for field in fields:
        if not any(name in row for name in field.split("|")):
            raise ValueError(missing_field(field, row, fields, what))


def require_string(row: Row, field: str) -> str:
    """``row[field]`` if it is a string, else ``ValueError`` naming the field and its type."""
    value = row[field]
    if not isinstance(value, str):
        raise ValueError(f"field {field!r} must be a string, got {type(value).__name__}")
    return value


def require_strings(row: Row, field: str) -> list[str]:
    """``row[field]`` as a list of strings (a JSON list, or the array parquet gives); a lone
    string is refused, not split into characters."""
    value = row[field]
    if isinstance(value, str | bytes | Mapping) or not hasattr(value, "__iter__"):
        raise ValueError(f"field {field!r} must be a list of strings, got {type(value).__name__}")
    items = list(value)
    bad = [type(x).__name__ for x in items if not isinstance(x, str)]
    if bad:
        raise ValueError(f"field {field!r} must be a list of strings, it holds a {bad[0]}")
    return items


def _checked(located: Located, check: Callable[[Row], None] | None, key: str) -> list[Row]:
    """The rows, after ``check`` passed on each; the first failure as a ``DataError``."""
    if check is not None:
        for where, row in located:
            try:
                check(row)
            except KeyError as exc:
                raise DataError(where, missing_field(str(exc.args[0]), row), key) from exc
            except ValueError as exc:
                raise DataError(where, str(exc), key) from exc
            except (TypeError, AttributeError, IndexError) as exc:
                raise DataError(where, f"{type(exc).__name__}: {exc}", key) from exc
    return [row for _, row in located]


def _load_remote(files: list[str]) -> list[Row]:
    from datasets import load_dataset

    fmt = SUFFIXES.get(file_format(files[0]), "json")
    return list(load_dataset(fmt, data_files=files, split="train"))


def load_split(
    split: str,
    data_files: DataFiles = None,
    hub_path: str | None = None,
    hub_name: str | None = None,
    key: str = "data_files",
    check: Callable[[Row], None] | None = None,
) -> list[Row]:
    """The rows of ``split``: from ``data_files`` when given, else from the hub. ``check`` is
    called on every row; what it raises (``ValueError``, or ``KeyError`` for a missing field)
    comes out as a ``DataError`` naming the row's file and line."""
    if data_files is None:
        if hub_path is None:
            raise ConfigError(key, None, "local files: this benchmark has no hub dataset")
        from datasets import load_dataset

        try:
            rows = list(load_dataset(hub_path, hub_name, split=split))
        except Exception as exc:  # offline, unknown split, gated dataset...
            raise RuntimeError(
                f"could not load split {split!r} of {hub_path!r} ({hub_name}) from the hub: "
                f"{type(exc).__name__}: {exc}. Without a network, set {key} to local files."
            ) from exc
        where = f"{hub_path} ({hub_name}) split {split!r}"
        return _checked([(f"{where} row {i}", r) for i, r in enumerate(rows, 1)], check, key)
    if isinstance(data_files, Mapping):
        if split not in data_files:
            raise ConfigError(key, dict(data_files), f"a file for split {split!r}")
        files = _as_list(data_files[split])
    else:
        files = _as_list(data_files)
    if any(f.startswith(REMOTE) for f in files):
        where = " + ".join(files)
        located = [(f"{where} row {i}", r) for i, r in enumerate(_load_remote(files), 1)]
        return _checked(located, check, key)
    try:
        located = [item for f in files for item in read_located(f)]
    except DataError as exc:
        raise DataError(exc.where, exc.problem, key) from None
    return _checked(located, check, key)


def choose(
    rows: Sequence[Row], n: int | None, seed: str, exclude: set[str], key: Callable[[Row], str]
) -> list[int]:
    """Indices of ``n`` rows (all when ``None``) whose key is not in ``exclude``, drawn with
    ``seed`` and returned in file order; duplicate keys count once."""
    seen, candidates = set(exclude), []
    for i, row in enumerate(rows):
        k = key(row)
        if k not in seen:
            seen.add(k)
            candidates.append(i)
    if n is None:
        return candidates
    if n > len(candidates):
        raise ValueError(f"{n} rows asked for, {len(candidates)} available")
    return sorted(random.Random(seed).sample(candidates, n))


class DatasetBenchmark:
    """A benchmark made of dataset rows: held-out, selection and training subsets, disjoint.

    Subclasses set ``name``, ``hub_path``/``hub_name`` and the default splits, and define
    ``key(row)`` (what makes two rows the same datapoint), ``example(row)`` (a training example)
    and ``make_task(name, rows)`` (the scored ``Task``). Rows load on first use, so building the
    object from a config stays cheap. A subclass takes its own parameters and passes the data
    and split parameters below on as ``**split_options`` (merged over its own defaults);
    config key checking follows them here.
    """

    name = "dataset"
    hub_path: str | None = None
    hub_name: str | None = None
    fields: tuple[str, ...] = ()  # what every row needs ("a|b": either), checked on load

    def __init__(
        self,
        data_files: DataFiles = None,
        selection_split: str = "train",
        heldout_split: str = "test",
        train_split: str = "train",
        n_select: int | None = 100,
        n_heldout: int | None = 500,
        data_seed: int = 0,
        selection_seed: int = 0,
        hub_path: str | None = None,
        hub_name: str | None = None,
    ) -> None:
        check_data_files("data_files", data_files)
        for k, v in (("n_select", n_select), ("n_heldout", n_heldout)):
            if v is not None:
                check_int(k, v)
        self.data_files = data_files
        self.splits = {"selection": selection_split, "heldout": heldout_split}
        self.train_split = train_split
        self.sizes = {"selection": n_select, "heldout": n_heldout}
        self.data_seed, self.selection_seed = data_seed, selection_seed
        if hub_path is not None:
            self.hub_path, self.hub_name = hub_path, hub_name
        self._rows: dict[str, list[Row]] = {}
        self._subsets: dict[str, list[Row]] | None = None
        self._exemplars: list[Row] = []
        self._tasks: dict[str, Task] = {}

    def check_row(self, row: Row) -> None:
        """Raise ``ValueError`` (``KeyError`` for a missing field) when ``row`` cannot be used;
        runs on every row as it loads. Subclasses check values after ``super().check_row``."""
        require_fields(row, self.fields, f"each {self.name} row")

    # subclasses define these
    def key(self, row: Row) -> str:
        """What makes two rows the same datapoint (the question text)."""
        raise NotImplementedError

    def example(self, row: Row) -> Example:
        """A training example (zero-shot prompt and target answer) from a row."""
        raise NotImplementedError

    def make_task(self, name: str, rows: list[Row]) -> Task:
        """The scored task over ``rows`` (in this order)."""
        raise NotImplementedError

    def rows(self, split: str) -> list[Row]:
        """All rows of ``split`` (loaded once)."""
        if split not in self._rows:
            self._rows[split] = load_split(
                split,
                self.data_files,
                self.hub_path,
                self.hub_name,
                key=f"{self.name}.data_files",
                check=self.check_row,
            )
        return self._rows[split]

    # the few-shot exemplars of every prompt (a subclass that prompts with them sets these)
    num_fewshot: int = 0
    fewshot_split: str | None = None  # None: the train split

    def subsets(self) -> dict[str, list[Row]]:
        """The held-out and selection rows (drawn once). The few-shot exemplars are drawn
        between them, from the rows outside the held-out ones, by ``data_seed`` alone: every
        prompt's exemplars are the same whatever the ``selection_seed``, and no selection row
        is an exemplar (whose answer its own prompt would hold)."""
        if self._subsets is None:
            out: dict[str, list[Row]] = {}
            used: set[str] = set()
            for part, seed in (
                ("heldout", f"{self.name}:{self.data_seed}:heldout"),
                ("selection", f"{self.name}:{self.data_seed}:{self.selection_seed}:selection"),
            ):
                if part == "selection":
                    self._exemplars = self._draw_exemplars(used)
                    used |= {self.key(r) for r in self._exemplars}
                rows = self.rows(self.splits[part])
                try:
                    idx = choose(rows, self.sizes[part], seed, used, self.key)
                except ValueError as exc:
                    key = "n_heldout" if part == "heldout" else "n_select"
                    raise ConfigError(
                        f"{self.name}.{key}",
                        self.sizes[part],
                        f"{exc} in split {self.splits[part]!r}",
                    ) from None
                out[part] = [rows[i] for i in idx]
                used |= {self.key(r) for r in out[part]}
            self._subsets = out
        return self._subsets

    def _evaluated_keys(self) -> set[str]:
        return {self.key(r) for rows in self.subsets().values() for r in rows}

    def pool(self, split: str | None = None, exclude: set[str] | None = None) -> list[Row]:
        """Rows of ``split`` (the train split by default) that are never evaluated (whose key
        is not in ``exclude``, by default every evaluated row's)."""
        rows = self.rows(split or self.train_split)
        exclude = self._evaluated_keys() if exclude is None else exclude
        return [rows[i] for i in choose(rows, None, "", exclude, self.key)]

    def _task(self, part: str) -> Task:
        if part not in self._tasks:
            rows = self.subsets()[part]
            task = self.make_task(f"{self.name}/{part}", rows)
            # every split also exposes its datapoints as prompt/answer pairs, like the toy tasks
            # (answer-perplexity metrics of the masks pipeline read them)
            task.examples = tuple(self.example(r) for r in rows)
            self._tasks[part] = task
        return self._tasks[part]

    @property
    def selection(self) -> Task:
        """The datapoints evolution selects on (fixed by ``data_seed`` and ``selection_seed``)."""
        return self._task("selection")

    @property
    def heldout(self) -> Task:
        """The datapoints reported on (fixed by ``data_seed``)."""
        return self._task("heldout")

    def train_examples(self, n: int, seed: int) -> list[Example]:
        """``n`` training examples from the never-evaluated rows (cycled when ``n`` exceeds
        them), shuffled with ``seed``."""
        pool = self.pool()
        if not pool:
            raise ValueError(f"{self.name}: no training rows left outside the evaluated subsets")
        order = list(range(len(pool)))
        random.Random(f"{self.name}:train:{seed}").shuffle(order)
        return [self.example(pool[order[i % len(order)]]) for i in range(n)]

    def fewshot(self) -> list[Row]:
        """The ``num_fewshot`` exemplar rows of ``fewshot_split``, fixed by ``data_seed``
        (``subsets``), never evaluated."""
        self.subsets()
        return list(self._exemplars)

    def _draw_exemplars(self, held_out: set[str]) -> list[Row]:
        k = self.num_fewshot
        if k == 0:
            return []
        pool = self.pool(self.fewshot_split, exclude=held_out)
        if k > len(pool):
            raise ConfigError(f"{self.name}.num_fewshot", k, f"at most {len(pool)} exemplar rows")
        return random.Random(f"{self.name}:{self.data_seed}:fewshot").sample(pool, k)
