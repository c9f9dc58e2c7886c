"""lm-evaluation-harness tasks on our in-memory model, one score per document.

``task=lm_eval task.tasks=[boolq,arc_easy]`` builds a ``TaskSuite`` with one benchmark per
lm-eval task. Each benchmark splits the task's evaluation documents (its ``test_split``, else
``validation_split``) into a held-out subset (fixed by ``data_seed``) and a disjoint selection
subset (``data_seed`` and ``selection_seed``), and scores a model on exactly those documents
(lm-eval's ``samples`` argument) through ``lm_eval.models.huggingface.HFLM`` wrapping the live
model (no copy, no reload). A document's score is its per-sample value of ``metric`` (default:
the task's first metric, e.g. ``acc``). Training examples come from the task's training
documents (prompt: ``doc_to_text``; answer: the target delimiter and ``doc_to_target``).

Local task definitions (lm-eval YAML files) load from ``include_path`` (with
``include_defaults: false``, lm-eval's own definitions are not indexed: much faster); datasets they name are
loaded by lm-eval with ``datasets.load_dataset`` (a hub dataset needs a network or a filled
cache; ``dataset_path: json`` with local ``data_files`` needs neither). lm-eval is an optional
dependency: ``pip install 'sparse_merge[lm_eval]'``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from sparse_merge.errors import ConfigError, check_int
from sparse_merge.tasks.base import Example
from sparse_merge.tasks.suite import TaskSuite


def require_lm_eval() -> Any:
    """The ``lm_eval`` module, or an ``ImportError`` saying how to install it."""
    try:
        import lm_eval  # noqa: F401
        import lm_eval.evaluator
        import lm_eval.models.huggingface
        import lm_eval.tasks
    except ImportError as exc:
        raise ImportError(
            "task=lm_eval needs lm-evaluation-harness: pip install 'sparse_merge[lm_eval]' "
            "(or pip install lm-eval==0.4.13)"
        ) from exc
    return lm_eval


class TaskIndex:
    """lm-eval's ``TaskManager`` (which indexes every task definition it can see: slow), built
    once and shared by the benchmarks of a suite."""

    def __init__(self, include_path: str | None = None, include_defaults: bool = True) -> None:
        if include_path is None and not include_defaults:
            raise ConfigError("include_defaults", False, "true unless include_path is set")
        self.include_path, self.include_defaults = include_path, include_defaults
        self._manager: Any = None

    def load(self, name: str) -> dict[str, Any]:
        """``TaskManager.load([name])``."""
        if self._manager is None:
            lm_eval = require_lm_eval()
            self._manager = lm_eval.tasks.TaskManager(
                include_path=self.include_path, include_defaults=self.include_defaults
            )
        return self._manager.load([name])


class LMEvalTask:
    """Fixed documents of one lm-eval task, scored with lm-eval's per-sample metric."""

    datapoints = ("doc_ids",)  # indexed by datapoint (``distributed``)

    def __init__(self, name: str, benchmark: LMEvalBenchmark, doc_ids: Sequence[int]) -> None:
        self.name, self.benchmark, self.doc_ids = name, benchmark, list(doc_ids)

    def __len__(self) -> int:
        return len(self.doc_ids)

    def score(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        """[N] the metric of each document, in ``doc_ids`` order."""
        return self.benchmark.evaluate(model, tokenizer, self.doc_ids)


class LMEvalBenchmark:
    """One lm-eval task as a benchmark: held-out and selection documents, training documents."""

    def __init__(
        self,
        task: str,
        index: TaskIndex | None = None,
        n_select: int | None = 100,
        n_heldout: int | None = 500,
        num_fewshot: int | None = None,
        metric: str | None = None,
        batch_size: int = 16,
        data_seed: int = 0,
        selection_seed: int = 0,
    ) -> None:
        for k, v in (
            ("n_select", n_select),
            ("n_heldout", n_heldout),
            ("num_fewshot", num_fewshot),
        ):
            if v is not None:
                check_int(k, v)
        check_int("batch_size", batch_size, minimum=1)
        self.name, self.index = task, index or TaskIndex()
        self.sizes = {"heldout": n_heldout, "selection": n_select}
        self.num_fewshot, self.metric, self.batch_size = num_fewshot, metric, batch_size
        self.data_seed, self.selection_seed = data_seed, selection_seed
        self._loaded: dict[str, Any] | None = None
        self._splits: dict[str, LMEvalTask] | None = None

    def loaded(self) -> dict[str, Any]:
        """lm-eval's loaded task dict (``TaskManager.load``), built once."""
        if self._loaded is None:
            loaded = self.index.load(self.name)
            if list(loaded["tasks"]) != [self.name]:
                raise ConfigError(
                    "task.tasks",
                    self.name,
                    f"one lm-eval task, not a group of {list(loaded['tasks'])}",
                )
            task = loaded["tasks"][self.name]
            if self.num_fewshot is not None:
                task.set_config(key="num_fewshot", value=self.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=self.data_seed)
            self._loaded = loaded
        return self._loaded

    @property
    def task(self) -> Any:
        """The lm-eval ``Task`` object."""
        return self.loaded()["tasks"][self.name]

    def _split(self) -> dict[str, LMEvalTask]:
        if self._splits is None:
            n_docs = len(list(self.task.eval_docs))
            ids, out = list(range(n_docs)), {}
            for part, seed in (
                ("heldout", f"lm_eval:{self.name}:{self.data_seed}:heldout"),
                ("selection", f"lm_eval:{self.name}:{self.data_seed}:{self.selection_seed}"),
            ):
                n = self.sizes[part]
                n = len(ids) if n is None else n
                if n > len(ids):
                    key = "n_heldout" if part == "heldout" else "n_select"
                    raise ConfigError(key, n, f"at most {len(ids)} documents of {self.name} remain")
                chosen = sorted(random.Random(seed).sample(ids, n))
                out[part] = LMEvalTask(f"{self.name}/{part}", self, chosen)
                ids = sorted(set(ids) - set(chosen))
            self._splits = out
        return self._splits

    @property
    def selection(self) -> LMEvalTask:
        """The documents evolution selects on."""
        return self._split()["selection"]

    @property
    def heldout(self) -> LMEvalTask:
        """The documents reported on."""
        return self._split()["heldout"]

    def evaluate(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, doc_ids: Sequence[int]
    ) -> torch.Tensor:
        """[N] per-document metric of ``model`` on ``doc_ids`` (in that order)."""
        lm_eval = require_lm_eval()
        lm = lm_eval.models.huggingface.HFLM(
            pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size
        )
        quiet = logging.getLogger("lm-eval")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        # lm-eval's sampler draws every document's exemplars from one Random, which each
        # evaluation advances (only simple_evaluate reseeds it): reseeded here, a split's
        # documents get the same prompts in every evaluation, as the first
        self.task.set_fewshot_seed(seed=self.data_seed)
        try:
            results = lm_eval.evaluator.evaluate(
                lm=lm,
                task_dict=self.loaded(),
                samples={self.name: list(doc_ids)},
                log_samples=True,
                bootstrap_iters=0,
                verbosity="ERROR",
            )
        finally:
            quiet.setLevel(level)
        rows = {s["doc_id"]: s for s in results["samples"][self.name]}
        metric = self.metric or self._default_metric(next(iter(rows.values())))
        if any(metric not in r for r in rows.values()):
            raise ConfigError("metric", metric, f"a per-sample metric of {self.name}")
        return torch.tensor([float(rows[i][metric]) for i in doc_ids], dtype=torch.float32)

    def _default_metric(self, sample: dict[str, Any]) -> str:
        names = [m["metric"] for m in self.task.config.metric_list or [] if "metric" in m]
        for name in names:
            if name in sample:
                return name
        raise ConfigError("metric", None, f"a per-sample metric of {self.name} (none found)")

    def train_examples(self, n: int, seed: int) -> list[Example]:
        """``n`` examples from the task's training documents (cycled), shuffled with ``seed``."""
        task = self.task
        if not task.has_training_docs():
            raise ValueError(f"lm-eval task {self.name} has no training documents")
        docs = list(task.training_docs())
        order = list(range(len(docs)))
        random.Random(f"lm_eval:{self.name}:train:{seed}").shuffle(order)
        return [self._example(task, docs[order[i % len(order)]]) for i in range(n)]

    @staticmethod
    def _example(task: Any, doc: dict[str, Any]) -> Example:
        prompt = task.doc_to_text(doc)
        target = task.doc_to_target(doc)
        if task.get_config("output_type") == "multiple_choice" and isinstance(target, int):
            target = task.doc_to_choice(doc)[target]
        delimiter = task.get_config("target_delimiter") or " "
        return Example(str(prompt), f"{delimiter}{target}")


class LMEvalSuite(TaskSuite):
    """A ``TaskSuite`` of lm-eval tasks by name (``task=lm_eval task.tasks=[...]``)."""

    def __init__(
        self,
        tasks: Sequence[str],
        include_path: str | None = None,
        include_defaults: bool = True,
        n_select: int | None = 100,
        n_heldout: int | None = 500,
        num_fewshot: int | None = None,
        metric: str | None = None,
        batch_size: int = 16,
        data_seed: int = 0,
        selection_seed: int = 0,
        weights: dict[str, float] | None = None,
    ) -> None:
        if isinstance(tasks, str) or not tasks:
            raise ConfigError("tasks", tasks, "a non-empty list of lm-eval task names")
        index = TaskIndex(include_path, include_defaults)
        super().__init__(
            {
                name: LMEvalBenchmark(
                    name,
                    index,
                    n_select,
                    n_heldout,
                    num_fewshot,
                    metric,
                    batch_size,
                    data_seed,
                    selection_seed,
                )
                for name in tasks
            },
            weights,
        )
