"""A comparison of search methods on the digits problem under one budget of forward passes,
over several seeds, in one or more panels (e.g. from scratch and from pre-trained parents).

Each (panel, method, seed) is one job: a fresh ``DigitsProblem`` (its parents seeded by the
seed, so every method of a seed starts from the same parents), a fresh ``Curve``, one run of
the method. A job's result (its curve sampled on a common grid, its final scores and its
speed) is written atomically to ``<dir>/runs/<panel>__<method>__seed<seed>.json`` with the
job's settings (``settings``: the method's, the parents' and the task's parameters and the
budget); a job whose file exists with the same settings is not run again (``reuse``), so an interrupted
comparison continues where it stopped, and a changed method or panel runs again. Jobs run in ``workers`` processes, each with ``threads`` torch threads.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sparse_merge.errors import ConfigError, check_positive
from sparse_merge.evolution.curve import Curve
from sparse_merge.evolution.digits import DigitsProblem
from sparse_merge.models.digits import DigitsParents
from sparse_merge.tasks.digits import DigitsTask
from sparse_merge.tracking.io import to_jsonable, write_json

log = logging.getLogger("sparse_merge")

# the task of a result file that does not record one (written before the task was recorded):
# ``describe(DigitsTask(raw_pixels=True))``, the only task the experiment was run with
UNRECORDED_TASK = {"class": "DigitsTask", "raw_pixels": True}


class Panel:
    """Methods compared from one kind of parents under one budget of forward passes."""

    def __init__(
        self, title: str, budget: int, parents: DigitsParents, methods: dict[str, Any]
    ) -> None:
        self.title = str(title)
        if int(budget) < 1:
            raise ConfigError("budget", budget, "an integer >= 1 (forward passes)")
        self.budget = int(budget)
        self.parents = parents
        if not methods:
            raise ConfigError("methods", methods, "at least one method")
        for name, method in methods.items():
            if not callable(getattr(method, "run", None)):
                raise ConfigError(f"methods.{name}", method, "an object with run(problem, ...)")
            if callable(getattr(method, "check_budget", None)):  # e.g. whole CMA-ES generations
                method.check_budget(self.budget)
        self.methods = dict(methods)


@dataclass(frozen=True)
class Job:
    """One run: a method of a panel with one seed."""

    panel: str
    method: str
    seed: int

    @property
    def file(self) -> str:
        """The job's result file name."""
        return f"{self.panel}__{self.method}__seed{self.seed}.json"


class Comparison:
    """Panels x methods x seeds (see module docstring).

    ``run_missing=False`` runs nothing and reports the jobs whose files exist (e.g. while
    other processes still run the rest). ``paper`` holds reference numbers by ``panel -> method -> accuracy`` (shown next to ours),
    ``notes`` short explanations by ``panel/method`` printed under the table.
    """

    def __init__(
        self,
        panels: dict[str, Panel],
        seeds: list[int],
        workers: int = 1,
        threads: int = 1,
        points: int = 200,
        results_dir: str | None = None,
        reuse: bool = True,
        run_missing: bool = True,
        paper: dict[str, dict[str, float]] | None = None,
        notes: dict[str, str] | None = None,
    ) -> None:
        if not panels:
            raise ConfigError("panels", panels, "at least one panel")
        self.panels = dict(panels)
        if not seeds:
            raise ConfigError("seeds", seeds, "a non-empty list of integers")
        self.seeds = [int(s) for s in seeds]
        self.workers = int(check_positive("workers", workers))
        self.threads = int(check_positive("threads", threads))
        self.points = int(check_positive("points", points))
        self.results_dir = results_dir
        self.reuse = bool(reuse)
        self.run_missing = bool(run_missing)
        self.paper = {p: dict(m) for p, m in (paper or {}).items()}
        self.notes = dict(notes or {})

    def jobs(self) -> list[Job]:
        """Every (panel, method, seed): panels by increasing budget, then seeds, then methods,
        so a comparison cut short has its cheap panels whole and every method for its first
        seeds."""
        panels = sorted(self.panels, key=lambda p: self.panels[p].budget)
        return [Job(p, m, s) for p in panels for s in self.seeds for m in self.panels[p].methods]

    def grid(self, panel: str) -> list[int]:
        """The forward-pass counts every curve of ``panel`` is sampled at (0 included)."""
        budget = self.panels[panel].budget
        n = min(self.points, budget)
        return sorted({round(budget * i / n) for i in range(n + 1)})

    def settings(self, job: Job, task: DigitsTask) -> dict[str, Any]:
        """What decides a job's result besides its seed: the method's, the parents' and the
        task's parameters and the budget (JSON-comparable)."""
        panel = self.panels[job.panel]
        return to_jsonable(
            {
                "budget": panel.budget,
                "parents": describe(panel.parents),
                "method": describe(panel.methods[job.method]),
                "task": describe(task),
            }
        )

    def done(self, job: Job, runs: Path, task: DigitsTask) -> bool:
        """Whether ``job``'s result file exists with the job's current settings (a file
        written before the task was recorded counts as made with the default task, raw
        pixels: the only one the experiment ran)."""
        path = runs / job.file
        if not path.exists():
            return False
        saved = json.loads(path.read_text()).get("settings")
        if isinstance(saved, dict) and "task" not in saved:
            saved = {**saved, "task": UNRECORDED_TASK}
        return saved == self.settings(job, task)

    def run_job(self, job: Job, task: DigitsTask) -> dict[str, Any]:
        """Run one job; returns its result (see module docstring)."""
        torch.set_num_threads(self.threads)
        panel = self.panels[job.panel]
        problem = DigitsProblem(panel.parents, task, seed=job.seed)
        curve = Curve(problem)
        initial = problem.initial()
        train = {n: float(problem.evaluate(g).mean()) for n, g in initial.items()}
        first = max(train, key=train.get)  # the starting point: the best initial genome
        curve.record(0, initial[first], train[first])
        t0 = time.perf_counter()
        panel.methods[job.method].run(problem, panel.budget, job.seed, curve)
        seconds = time.perf_counter() - t0
        grid = self.grid(job.panel)
        return {
            "panel": job.panel,
            "method": job.method,
            "seed": job.seed,
            "settings": self.settings(job, task),
            "budget": panel.budget,
            "evals": curve.evals[-1],
            "final_test": curve.test[-1],
            "final_train": curve.train[-1],
            "initial_train": train,
            "seconds": seconds,
            "forward_passes_per_s": curve.evals[-1] / max(seconds, 1e-9),
            "grid": grid,
            "test": curve.sampled(grid),
        }

    def run(self, task: DigitsTask, out_dir: str | Path) -> list[dict[str, Any]]:
        """Run the jobs missing under ``out_dir/runs`` and return every job's result (panels
        and methods in config order)."""
        runs = Path(out_dir) / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        jobs = self.jobs()
        todo = [j for j in jobs if not (self.reuse and self.done(j, runs, task))]
        todo = todo if self.run_missing else []
        bar = tqdm(total=len(todo), desc="comparison jobs")
        if self.workers == 1 or len(todo) <= 1:
            for job in todo:
                self._run_to_file(job, task, runs)
                bar.update()
        else:
            ctx = get_context("fork")  # the task's tensors are shared, not pickled per job
            with ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_quiet) as pool:
                futures = [pool.submit(self._run_to_file, job, task, runs) for job in todo]
                for future in as_completed(futures):
                    future.result()
                    bar.update()
        bar.close()
        order = [
            Job(p, m, s) for p, pl in self.panels.items() for m in pl.methods for s in self.seeds
        ]
        found = [j for j in order if (runs / j.file).exists()]
        if not self.run_missing and len(found) < len(order):
            log.warning("reporting %d of %d jobs (run_missing=false)", len(found), len(order))
        return [json.loads((runs / j.file).read_text()) for j in found]  # in config order

    def _run_to_file(self, job: Job, task: DigitsTask, runs: Path) -> None:
        """Run ``job`` and write its file, unless another process wrote it meanwhile."""
        if self.reuse and self.done(job, runs, task):
            return
        write_json(runs / job.file, self.run_job(job, task))


def describe(obj: Any) -> Any:
    """A method or parents object as plain data: its class and the attributes named by its
    constructor's parameters, recursively (the progress switch and tensors left out)."""
    if isinstance(obj, (str, int, float, bool, type(None), Path)):
        return obj if not isinstance(obj, Path) else str(obj)
    if isinstance(obj, dict):
        return {str(k): describe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [describe(v) for v in obj]
    if isinstance(obj, torch.Tensor) or not hasattr(obj, "__dict__"):
        return type(obj).__name__
    params = inspect.signature(type(obj).__init__).parameters
    public = {k: describe(v) for k, v in vars(obj).items() if k in params and k != "progress"}
    return {"class": type(obj).__name__, **public}


def _quiet() -> None:
    """Worker processes show no per-step progress bars."""
    os.environ["TQDM_DISABLE"] = "1"
