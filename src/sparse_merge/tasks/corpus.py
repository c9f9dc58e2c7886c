"""Language modelling on a text corpus: one datapoint per passage, scored by 1 / perplexity.

The corpus (a ``.txt`` file, rows with a ``text_field`` in JSON/JSONL/parquet/CSV, a hub dataset
such as WikiText-2, or Python's own documentation, ``PythonDocs``) is joined into one text and
cut into passages of about ``chunk_chars`` characters at whitespace, so the datapoints do not
depend on the tokenizer and stay aligned across models. A passage's score is
``exp(-mean token NLL)``, the inverse of its perplexity (in (0, 1], higher is better: the
fitness evolution selects on); ``CorpusTask.perplexity`` is the usual corpus perplexity (every
token of every passage weighted equally), the number reports show. Both come from
``tasks.perplexity``.
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
import warnings
import zlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from sparse_merge.errors import ConfigError, check_int
from sparse_merge.tasks.base import Example
from sparse_merge.tasks.data import DatasetBenchmark, Row
from sparse_merge.tasks.generation import context_length
from sparse_merge.tasks.perplexity import passage_nlls, perplexity

MAX_WINDOW = 1024  # default tokens per forward pass: the model's context, capped here


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """``text`` cut into passages of at most ``chunk_chars`` characters, each ending at
    whitespace when there is some; blank passages dropped."""
    out, start = [], 0
    while start < len(text):
        end = min(start + chunk_chars, len(text))
        if end < len(text):
            cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
            end = cut + 1 if cut > start else end
        piece = text[start:end].strip()
        if piece:
            out.append(piece)
        start = end
    return out


class CorpusTask:
    """Passages scored by the inverse of their perplexity."""

    datapoints = ("texts", "examples")  # indexed by datapoint (``distributed``)

    def __init__(
        self,
        name: str,
        texts: Sequence[str],
        window: int | None = None,
        stride: int | None = None,
    ) -> None:
        self.name, self.texts, self.window, self.stride = name, list(texts), window, stride

    def __len__(self) -> int:
        return len(self.texts)

    def windowing(self, model: nn.Module) -> tuple[int, int]:
        """(window, stride): ``window`` or the model's context capped at ``MAX_WINDOW`` tokens;
        ``stride`` or half the window."""
        window = self.window or min(context_length(model) or MAX_WINDOW, MAX_WINDOW)
        return window, self.stride or max(1, window // 2)

    def nlls(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[torch.Tensor]:
        """Per passage, the NLL of each of its tokens after the first."""
        return passage_nlls(model, tokenizer, self.texts, *self.windowing(model), desc=self.name)

    def score(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        """[N] ``exp(-mean NLL)`` per passage."""
        return passage_scores(self.nlls(model, tokenizer))

    def perplexity(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> float:
        """Perplexity over every token of every passage."""
        return perplexity(self.nlls(model, tokenizer))

    def score_with_perplexity(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase
    ) -> tuple[torch.Tensor, float]:
        """``score`` and ``perplexity`` from one pass over the passages."""
        nlls = self.nlls(model, tokenizer)
        return passage_scores(nlls), perplexity(nlls)


def passage_scores(nlls: Sequence[torch.Tensor]) -> torch.Tensor:
    """[N] ``exp(-mean NLL)`` of each passage (0 for a passage with no scored token)."""
    return torch.tensor([math.exp(-n.double().mean().item()) if n.numel() else 0.0 for n in nlls])


class Corpus(DatasetBenchmark):
    """A text corpus cut into passages: held-out, selection and training passages disjoint.
    Without ``data_files``, WikiText-2 (raw) from the hub: selection from ``validation``,
    held-out from ``test``, training passages from ``train``."""

    name = "corpus"
    hub_path = "Salesforce/wikitext"
    hub_name = "wikitext-2-raw-v1"

    def __init__(
        self,
        text_field: str = "text",
        chunk_chars: int = 2000,
        window: int | None = None,
        stride: int | None = None,
        name: str = "corpus",
        **split_options: Any,
    ) -> None:
        check_int("chunk_chars", chunk_chars, minimum=1)
        if window is not None:
            check_int("window", window, minimum=1)
        if stride is not None and not 0 < stride < (window or MAX_WINDOW):
            raise ConfigError("stride", stride, f"in (0, window={window or MAX_WINDOW})")
        super().__init__(
            **{"selection_split": "validation", "n_select": 64, "n_heldout": 128, **split_options}
        )
        self.name, self.text_field, self.chunk_chars = name, text_field, chunk_chars
        self.window, self.stride = window, stride
        self._passages: dict[str, list[Row]] = {}

    def rows(self, split: str) -> list[Row]:
        """The split's text, joined and cut into ``{"text": passage}`` rows."""
        if split not in self._passages:
            raw = self.raw_rows(split)
            text = "\n".join(str(r[self.text_field]) for r in raw)
            self._passages[split] = [{"text": t} for t in chunk_text(text, self.chunk_chars)]
        return self._passages[split]

    def raw_rows(self, split: str) -> list[Row]:
        """The split's rows before joining and cutting (from ``data_files`` or the hub)."""
        return super().rows(split)

    def key(self, row: Row) -> str:
        """The passage itself."""
        return row["text"]

    def example(self, row: Row) -> Example:
        """The passage as an answer to an empty prompt (language-model training)."""
        return Example("", row["text"])

    def make_task(self, name: str, rows: list[Row]) -> CorpusTask:
        """A ``CorpusTask`` over the passages."""
        return CorpusTask(name, [r["text"] for r in rows], self.window, self.stride)


# Standard-library modules whose documentation makes the offline corpus: present and not
# deprecated in Python 3.11-3.13, importable without side effects.
PYTHON_DOC_MODULES = [
    "abc",
    "argparse",
    "array",
    "ast",
    "asyncio",
    "base64",
    "binascii",
    "bisect",
    "builtins",
    "bz2",
    "calendar",
    "cmath",
    "cmd",
    "code",
    "codecs",
    "collections",
    "colorsys",
    "compileall",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "contextvars",
    "copy",
    "cProfile",
    "csv",
    "ctypes",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "doctest",
    "email",
    "email.message",
    "enum",
    "errno",
    "filecmp",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "gc",
    "getopt",
    "getpass",
    "gettext",
    "glob",
    "graphlib",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html.parser",
    "http.client",
    "http.cookiejar",
    "http.server",
    "imaplib",
    "importlib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "keyword",
    "linecache",
    "locale",
    "logging",
    "logging.handlers",
    "lzma",
    "mailbox",
    "math",
    "mimetypes",
    "mmap",
    "modulefinder",
    "multiprocessing",
    "multiprocessing.pool",
    "netrc",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pdb",
    "pickle",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "pstats",
    "py_compile",
    "pydoc",
    "queue",
    "quopri",
    "random",
    "re",
    "reprlib",
    "runpy",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "smtplib",
    "socket",
    "sqlite3",
    "ssl",
    "stat",
    "statistics",
    "string",
    "struct",
    "symtable",
    "sys",
    "sysconfig",
    "tabnanny",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "token",
    "tokenize",
    "tomllib",
    "trace",
    "traceback",
    "types",
    "typing",
    "unicodedata",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "zipfile",
    "zlib",
    "zoneinfo",
]
PYTHON_DOC_SPLITS = {"test": (0,), "validation": (1,), "train": tuple(range(2, 10))}


def module_docs(name: str) -> str:
    """The documentation strings of a module: its own, then those of its public classes (and
    their public methods) and functions, in name order; empty when it cannot be imported."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
    except ImportError:
        return ""
    docs = [inspect.getdoc(module) or ""]
    for attr in sorted(dir(module)):
        obj = getattr(module, attr, None)
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            docs.append(inspect.getdoc(obj) or "")
            docs += [
                inspect.getdoc(member) or ""
                for key, member in sorted(vars(obj).items())
                if not key.startswith("_") and callable(member)
            ]
        elif inspect.isroutine(obj):
            docs.append(inspect.getdoc(obj) or "")
    return "\n\n".join(d for d in docs if d.strip())


class PythonDocs(Corpus):
    """Python's own documentation strings as an offline English corpus (``task=python_docs``).

    The text of each standard-library module in ``PYTHON_DOC_MODULES`` (module, class, method
    and function docstrings) goes to one split by a stable hash of the module's name: one module
    in ten to ``test`` (held-out), one in ten to ``validation`` (selection), the rest to
    ``train`` (training and calibration), so no passage's module is in two splits. The text
    depends on the Python version (recorded by ``describe``): compare numbers measured on one.
    """

    name = "python_docs"

    def __init__(self, modules: Sequence[str] = PYTHON_DOC_MODULES, **options: Any) -> None:
        if not modules:
            raise ConfigError("modules", list(modules), "at least one module name")
        options.setdefault("name", "python_docs")
        options.setdefault("n_heldout", None)
        super().__init__(**options)
        self.modules = list(modules)

    @staticmethod
    def split_of(module: str) -> str:
        """``train``, ``validation`` or ``test``: where a module's text goes."""
        bucket = zlib.crc32(module.encode()) % 10
        return next(s for s, buckets in PYTHON_DOC_SPLITS.items() if bucket in buckets)

    def raw_rows(self, split: str) -> list[Row]:
        """One row per module of ``split`` with its documentation text."""
        if split not in PYTHON_DOC_SPLITS:
            raise ConfigError(f"{self.name}.split", split, ", ".join(PYTHON_DOC_SPLITS))
        texts = (module_docs(m) for m in self.modules if self.split_of(m) == split)
        return [{"text": t} for t in texts if t]

    def describe(self) -> dict[str, object]:
        """What the passages are made of (the Python version changes the text)."""
        return {"corpus": "python_docs", "python": sys.version.split()[0], "modules": self.modules}
