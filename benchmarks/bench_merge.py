"""Merge methods (every ``conf/merge`` variant) on a model-sized flat genome: seconds per merge
of two genomes (with their base) through ``MergeMethod.merge_``, against ``out.copy_(genome)``
of the same bytes.

The genome is ~50 M float32 elements in 12 tensors of [1024, 4096] with a [4096] vector after
each (a bias or norm), merged with weights [0.4, 0.6] and a split point at a third, as a
crossover does, on one thread (steadier on a shared machine). Stochastic methods draw from a
seeded ``torch.Generator``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sparse_merge.merging.base import MergeMethod, Segment
from sparse_merge.merging.slerp import Slerp

CONF = Path(__file__).resolve().parents[1] / "conf" / "merge"
MATRIX, VECTOR, LAYERS = (1024, 4096), (4096,), 12


def _segments() -> list[Segment]:
    segments, pos = [], 0
    for _ in range(LAYERS):
        for shape in (MATRIX, VECTOR):
            n = torch.Size(shape).numel()
            segments.append((pos, pos + n, shape))
            pos += n
    return segments


def _seconds(fn, budget_s: float = 4.0, max_repeats: int = 3) -> float:
    """Best of up to ``max_repeats`` runs, fewer when one run takes more than a share of
    ``budget_s``."""
    best, spent, runs = float("inf"), 0.0, 0
    while runs < max_repeats and (runs == 0 or spent + best <= budget_s):
        t = time.perf_counter()
        fn()
        took = time.perf_counter() - t
        best, spent, runs = min(best, took), spent + took, runs + 1
    return best


def _methods() -> dict[str, MergeMethod]:
    methods = {p.stem: instantiate(OmegaConf.load(p)) for p in sorted(CONF.glob("*.yaml"))}
    methods["slerp (granularity=genome)"] = Slerp(granularity="genome")
    return methods


def run() -> list[dict]:
    """One row per method: seconds per merge and the ratio to ``copy_`` (one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _rows()
    finally:
        torch.set_num_threads(threads)


def _rows() -> list[dict]:
    segments = _segments()
    n = segments[-1][1]
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g)  # [P]
    a = base + 0.01 * torch.randn(n, generator=g)
    b = base + 0.01 * torch.randn(n, generator=g)
    out = torch.empty_like(a)
    gb = n * a.element_size() / 1e9
    copy_s = _seconds(lambda: out.copy_(a), max_repeats=5)
    rows = [{"method": "copy_", "seconds": copy_s, "GB/s out": gb / copy_s, "x copy_": 1.0}]
    for name, method in _methods().items():

        def merge(method: MergeMethod = method) -> None:
            method.merge_(
                out,
                base if method.needs_base else None,
                [a, b],
                [0.4, 0.6],
                segments=segments,
                split=n // 3,
                rng=torch.Generator().manual_seed(1),
            )

        s = _seconds(merge)
        rows.append({"method": name, "seconds": s, "GB/s out": gb / s, "x copy_": s / copy_s})
    return rows


if __name__ == "__main__":
    from sparse_merge.tracking.report import format_table

    print(format_table(run()))
