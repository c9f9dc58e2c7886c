"""Crossover against the memory-bandwidth floor: every merge method the engine can use as its
crossover, on two genomes of 16 M float32 elements, one thread; its floor is the bytes it must
move (in genomes: e.g. 5 for SLERP, whose angle needs a pass over both parents before anything
is written) at the speed of ``copy_`` measured just before it. The per-step costs of the engine
are in ``bench_engine.py``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
CONF_MERGE = CONF / "merge"
N_CROSSOVER = 1 << 24  # 16 M float32 = 64 MiB per genome
STEPS = 6


# (row, conf/merge file, overrides, split): every merge method the engine can use as crossover
CROSSOVER_METHODS = (
    ("slerp genome +split", "slerp", {"granularity": "genome"}, True),
    ("slerp genome", "slerp", {"granularity": "genome"}, False),
    ("slerp tensor +split", "slerp", {}, True),
    ("linear +split", "linear", {}, True),
    ("task_arithmetic +split", "task_arithmetic", {}, True),
    ("ties +split", "ties", {}, True),
    ("dare_linear +split", "dare_linear", {}, True),
    ("dare_ties +split", "dare_ties", {}, True),
    ("breadcrumbs +split", "breadcrumbs", {}, True),
    ("della +split", "della", {}, True),
)
# one decoder layer of Qwen2.5-0.5B (hidden 896, 2 KV heads, MLP 4864): 14.9 M elements; the
# rest of the 16 M-element genome is a gap, merged flat like an embedding
LAYER_SHAPES = (
    *((896, 896), (128, 896), (128, 896), (896, 896)),  # attention q, k, v, o
    *((4864, 896), (4864, 896), (896, 4864)),  # MLP gate, up, down
    *((896,), (896,)),  # norms
)


def _layer_segments(n: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """``LAYER_SHAPES`` laid out from 0 in a genome of ``n`` elements."""
    segments, lo = [], 0
    for shape in LAYER_SHAPES:
        hi = lo + math.prod(shape)
        if hi > n:
            break
        segments.append((lo, hi, shape))
        lo = hi
    return segments


def _best_of(fn, repeats: int = 5, budget_s: float = 1.5) -> float:
    """The fastest of up to ``repeats`` runs, stopping once ``budget_s`` seconds are spent."""
    times, spent = [], 0.0
    while len(times) < repeats and (not times or spent < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        spent += times[-1]
    return min(times)


def crossover_rows(dtype: torch.dtype = torch.float32) -> list[dict]:
    """Every merge method the evolution engine can use as crossover, on 16 M-element genomes
    (two parents, a base, the Qwen2.5-0.5B layer of ``LAYER_SHAPES``, a split point at a
    third), against its traffic floor: the genome-sized reads and writes it cannot avoid
    (``MergeMethod.traffic_floor``, in genomes) at the bandwidth ``copy_`` reaches (bytes read
    + written per second) on the same buffers, measured right before each method so that both
    see the same load. ``GB/s``: floor bytes per second; ``fraction of floor``: floor time /
    measured time (1: as fast as memory allows)."""
    g = torch.Generator().manual_seed(0)
    base, a, b = (torch.randn(N_CROSSOVER, generator=g).to(dtype) for _ in range(3))
    out = torch.empty_like(a)
    size = a.numel() * a.element_size()  # bytes per genome
    segments = _layer_segments(N_CROSSOVER)
    copy_s = _best_of(lambda: out.copy_(a))
    rows = [_floor_row(f"copy_ ({size >> 20} MiB {str(dtype)[6:]})", copy_s, 2, size, copy_s)]
    for label, name, overrides, split in CROSSOVER_METHODS:
        method = instantiate(
            OmegaConf.merge(OmegaConf.load(CONF_MERGE / f"{name}.yaml"), overrides)
        )
        at = N_CROSSOVER // 3 if split else None

        def merge(method=method, at=at) -> None:
            method.merge_(
                out,
                base if method.needs_base else None,
                [a, b],
                [0.3, 0.7],
                segments=segments,
                split=at,
                rng=torch.Generator().manual_seed(1),
            )

        copy_s = _best_of(lambda: out.copy_(a))
        seconds = _best_of(merge)
        rows.append(_floor_row(label, seconds, method.traffic_floor(2), size, copy_s))
    return rows


def _floor_row(what: str, seconds: float, floor: int, size: int, copy_s: float) -> dict:
    """One row of ``crossover_rows``: ``floor`` genomes of ``size`` bytes moved in
    ``seconds``, against ``copy_`` moving two in ``copy_s``."""
    floor_s = floor / 2 * copy_s
    return {
        "what": what,
        "seconds": seconds,
        "floor (genomes)": floor,
        "GB/s": floor * size / seconds / 1e9,
        "copy_ GB/s": 2 * size / copy_s / 1e9,
        "fraction of floor": floor_s / seconds,
    }


def run() -> list[dict]:
    """Rows of the benchmark table."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = crossover_rows()
    finally:
        torch.set_num_threads(threads)
    columns = list(dict.fromkeys(k for r in rows for k in r))  # one table: every row, every column
    return [{c: r.get(c, "") for c in columns} for r in rows]


if __name__ == "__main__":
    from sparse_merge.tracking.report import format_table

    print(format_table(run()))
