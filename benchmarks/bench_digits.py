"""Digits loop speed: forward passes per second of Natural Niches (population 20, from
scratch, mutation std 0.01) on the M2N2 digits MLP, with the archive best's test accuracy
evaluated every step, as the experiment's curves need; plus the raw evaluation speed of one
genome and of a batch of 20."""

from __future__ import annotations

import os
import time

import torch

os.environ.setdefault("TQDM_DISABLE", "1")

from sparse_merge.evolution.budgeted import NaturalNichesMethod  # noqa: E402
from sparse_merge.evolution.curve import Curve  # noqa: E402
from sparse_merge.evolution.digits import DigitsProblem  # noqa: E402
from sparse_merge.evolution.natural_niches import NaturalNiches  # noqa: E402
from sparse_merge.evolution.scoring import SparsityAwareScorer  # noqa: E402
from sparse_merge.models.digits import DigitsParents  # noqa: E402
from sparse_merge.tasks.digits import DigitsTask  # noqa: E402

STEPS = 500


def _natural_niches(problem: DigitsProblem, test_every_step: bool) -> float:
    evolver = NaturalNiches(pop_size=20, mutation_std=0.01, prune_target="none", checkpoint_every=0)
    method = NaturalNichesMethod(evolver, SparsityAwareScorer(alpha=1.0), test_every_step)
    curve = Curve(problem)
    start = time.perf_counter()
    method.run(problem, STEPS, seed=0, curve=curve)
    return STEPS / (time.perf_counter() - start)


def _evaluations(problem: DigitsProblem, batch: int, n: int = 200) -> float:
    genomes = torch.randn(batch, problem.numel, generator=torch.Generator().manual_seed(0)) * 0.01
    start = time.perf_counter()
    for _ in range(n):
        if batch == 1:
            problem.evaluate(genomes[0])
        else:
            problem.evaluate_batch(genomes)
    return n * batch / (time.perf_counter() - start)


def run() -> list[dict]:
    """One row per (what, torch threads): forward passes per second on the selection set."""
    problem = DigitsProblem(DigitsParents("scratch"), DigitsTask(raw_pixels=True), seed=0)
    problem.initial()
    rows = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for what, fps in (
                ("natural_niches pop 20, test eval every step", _natural_niches(problem, True)),
                (
                    "natural_niches pop 20, test eval of entering children",
                    _natural_niches(problem, False),
                ),
                ("evaluate one genome", _evaluations(problem, 1)),
                ("evaluate_batch of 20 genomes", _evaluations(problem, 20, 20)),
            ):
                rows.append(
                    {"what": what, "threads": threads, "forward_passes_per_s": round(fps, 1)}
                )
    finally:
        torch.set_num_threads(before)
    return rows
