"""Merge methods against the memory-bandwidth floor: every ``conf/merge`` variant (and SLERP's
one-angle-per-genome form, M2N2's crossover) merging two genomes of 16 M elements (float32,
then bfloat16 in its own arithmetic and with ``compute_dtype=float32``) with their base, as the evolution's crossover does: weights [0.3, 0.7], a split
point at a third, one thread. A method's floor is the bytes it must move
(``MergeMethod.traffic_floor``, in genomes: e.g. 5 for SLERP, whose angle needs a pass over
both parents before anything is written) at the speed of ``copy_`` measured right before it,
so both see the same load. Stochastic methods draw from a seeded ``torch.Generator``. Then
the crossover's default and the methods with fused loops on a genome laid out like a real
model's, SmolLM2-135M (272 tensors, 134.5 M elements, float32): small tensors whose inputs
stay in cache between a method's passes. Last, a few methods on every core, against ``copy_``
on as many. The per-step costs of the engine are in ``bench_engine.py``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONF_MERGE = Path(__file__).resolve().parents[1] / "conf" / "merge"
N = 1 << 24  # 16 M float32 = 64 MiB per genome
# one decoder layer of Qwen2.5-0.5B (hidden 896, 2 KV heads, MLP 4864): 14.9 M elements; the
# rest of the 16 M-element genome is a gap, merged flat like an embedding
LAYER_SHAPES = (
    *((896, 896), (128, 896), (128, 896), (896, 896)),  # attention q, k, v, o
    *((4864, 896), (4864, 896), (896, 4864)),  # MLP gate, up, down
    *((896,), (896,)),  # norms
)
# (row, conf/merge file, overrides, split)
METHODS = (
    ("slerp genome +split (M2N2's crossover)", "slerp", {"granularity": "genome"}, True),
    ("slerp genome", "slerp", {"granularity": "genome"}, False),
    *((f"{p.stem} +split", p.stem, {}, True) for p in sorted(CONF_MERGE.glob("*.yaml"))),
    *(  # the random methods with counter draws (their fused loops)
        (f"{name} +split, draws=counter", name, {"draws": "counter"}, True)
        for name in ("dare_linear", "dare_ties", "della", "della_linear")
    ),
)


# SmolLM2-135M (hidden 576, 9 query and 3 key-value heads of 64, MLP 1536, 30 layers, vocabulary
# 49152, tied embeddings): the genome of a real model, 272 tensors, 134.5 M elements
SMOLLM2_SHAPES = (
    (49152, 576),
    *(
        [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
        + [(576,), (576,)]
    )
    * 30,
    (576,),
)
# the methods timed on it: the crossover's default and every method with a fused loop
SMOLLM2_METHODS = (
    ("slerp genome +split (M2N2's crossover)", "slerp", {"granularity": "genome"}),
    ("linear +split", "linear", {}),
    ("task_arithmetic +split", "task_arithmetic", {}),
    ("ties +split", "ties", {}),
    ("breadcrumbs +split", "breadcrumbs", {}),
    ("breadcrumbs_ties +split", "breadcrumbs_ties", {}),
    ("dare_linear +split", "dare_linear", {}),
    ("dare_ties +split", "dare_ties", {}),
    ("dare_linear +split, draws=counter", "dare_linear", {"draws": "counter"}),
    ("dare_ties +split, draws=counter", "dare_ties", {"draws": "counter"}),
)


# the methods timed again on all threads: the large tensors' loops run in parts
# (``merging.kernels.in_parts``); the copy_ they are measured against runs on as many
THREADED_METHODS = tuple(
    m
    for m in SMOLLM2_METHODS
    if m[1] in ("slerp", "task_arithmetic", "ties", "breadcrumbs", "dare_ties")
)


def _segments(shapes) -> list[tuple[int, int, tuple[int, ...]]]:
    """``shapes`` laid out one after another from 0."""
    segments, lo = [], 0
    for shape in shapes:
        segments.append((lo, lo + math.prod(shape), shape))
        lo += math.prod(shape)
    return segments


def _layer_segments(n: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """``LAYER_SHAPES`` laid out from 0 in a genome of ``n`` elements."""
    return [segment for segment in _segments(LAYER_SHAPES) if segment[1] <= n]


def _best_of(fn, repeats: int = 5, budget_s: float = 1.5) -> float:
    """The fastest of up to ``repeats`` runs, stopping once ``budget_s`` seconds are spent."""
    times, spent = [], 0.0
    while len(times) < repeats and (not times or spent < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        spent += times[-1]
    return min(times)


def merge_rows(
    dtype: torch.dtype = torch.float32,
    smollm2: bool = False,
    threads: int = 1,
    compute_dtype: str | None = None,
) -> list[dict]:
    """One row per method: seconds per merge, × ``copy_`` of one genome, the floor in genomes,
    floor bytes per second and the fraction of the floor reached (1: as fast as memory
    allows). ``smollm2``: on a genome laid out like SmolLM2-135M's (``SMOLLM2_SHAPES``), for
    ``SMOLLM2_METHODS``. ``threads`` > 1: ``THREADED_METHODS`` with that many threads, against
    ``copy_`` on as many. ``compute_dtype``: that setting for every method that has it
    (``float32``: bfloat16 computed in float32, rounded once)."""
    if smollm2:
        segments = _segments(SMOLLM2_SHAPES)
        n, methods, what = segments[-1][1], [(*m, True) for m in SMOLLM2_METHODS], "SmolLM2, "
    else:
        n, segments, methods, what = N, _layer_segments(N), METHODS, ""
    if threads > 1:
        methods = [(*m, True) for m in THREADED_METHODS]
        what = f"{threads} threads, {what}"
    g = torch.Generator().manual_seed(0)
    base, a, b = (torch.randn(n, generator=g).to(dtype) for _ in range(3))
    out = torch.empty_like(a)
    out.copy_(a)  # its pages faulted in before anything is timed
    size = a.numel() * a.element_size()  # bytes per genome
    copy_s = _best_of(lambda: out.copy_(a))
    rows = [_row(f"{what}copy_ ({size >> 20} MiB {str(dtype)[6:]})", copy_s, 2, size, copy_s)]
    for label, name, overrides, split in methods:
        label = what + (label if dtype == torch.float32 else f"{label}, {str(dtype)[6:]}")
        cfg = OmegaConf.merge(OmegaConf.load(CONF_MERGE / f"{name}.yaml"), overrides)
        if compute_dtype is not None:
            if "compute_dtype" not in cfg:
                continue
            cfg.compute_dtype, label = compute_dtype, f"{label}, compute_dtype={compute_dtype}"
        method = instantiate(cfg)
        at = n // 3 if split else None

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

        merge()  # compiles the method's fused loops on first use (cached on disk after)
        copy_s = _best_of(lambda: out.copy_(a))
        seconds = _best_of(merge)
        rows.append(_row(label, seconds, method.traffic_floor(2), size, copy_s))
    return rows


def _row(what: str, seconds: float, floor: int, size: int, copy_s: float) -> dict:
    """``floor`` genomes of ``size`` bytes moved in ``seconds``, against ``copy_`` moving two
    (one read, one written) in ``copy_s``."""
    floor_s = floor / 2 * copy_s
    return {
        "what": what,
        "seconds": seconds,
        "x copy_": seconds / copy_s,
        "floor (genomes)": floor,
        "GB/s": floor * size / seconds / 1e9,
        "copy_ GB/s": 2 * size / copy_s / 1e9,
        "fraction of floor": floor_s / seconds,
    }


def run() -> list[dict]:
    """Rows of the benchmark table: one thread, then some methods on every core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = merge_rows() + merge_rows(torch.bfloat16)
        rows += merge_rows(torch.bfloat16, compute_dtype="float32") + merge_rows(smollm2=True)
        cores = os.cpu_count() or 1
        if cores > 1:
            torch.set_num_threads(cores)
            rows += merge_rows(threads=cores) + merge_rows(torch.bfloat16, threads=cores)
            rows += merge_rows(torch.bfloat16, threads=cores, compute_dtype="float32")
        return rows
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    from sparse_merge.tracking.report import format_table

    print(format_table(run()))
