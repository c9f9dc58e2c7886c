"""``python -m sparse_merge.analysis <sweep or run dir> [--out DIR]``: CSV tables and PNG
plots (and, for each run that logged it, the child's sparsity per layer and step)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from sparse_merge.analysis.collect import collect
from sparse_merge.analysis.plots import (
    archive_scatter,
    heatmap,
    layer_sparsity_heatmap,
    metric_vs_sparsity,
)
from sparse_merge.analysis.tables import (
    add_method,
    grouped_summary,
    method_by_sparsity,
    sparsity_vs_performance,
)
from sparse_merge.analysis.throughput_table import write_throughput
from sparse_merge.tracking.io import fit_file_name, write_atomic

ARCHIVE_FILE = (
    "archive.csv"  # evolution runs: one row per final-archive individual (accuracy, sparsity)
)
LOG_FILE = "log.jsonl"  # a run's records (with evolver.log_layer_sparsity: per-layer sparsity)


def _csv(df: pd.DataFrame, path: Path) -> Path:
    return write_atomic(path, lambda tmp: df.to_csv(tmp, index=False))


def analyze(sweep_dir: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """Write ``summary.csv``, ``grouped_summary.csv``, ``sparsity_vs_performance.csv``,
    ``failed_runs.csv`` and the plots; returns what was written by name. A run whose log holds
    per-layer sparsity gets ``layer_sparsity.png`` (``sweep_dir`` is that run) or
    ``layer_sparsity_<run>.png`` (a run of a sweep): layer x step."""
    sweep_dir = Path(sweep_dir)
    out = Path(out) if out else sweep_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    runs = collect(sweep_dir)
    grouped = grouped_summary(runs)
    written = {
        "summary": _csv(runs, out / "summary.csv"),
        "grouped_summary": _csv(grouped, out / "grouped_summary.csv"),
        "sparsity_vs_performance": _csv(
            sparsity_vs_performance(grouped), out / "sparsity_vs_performance.csv"
        ),
        "failed_runs": _csv(
            runs[runs["status"] != "finished"][["run", "status", "error", "overrides"]],
            out / "failed_runs.csv",
        ),
    }
    for metric, label in (
        ("accuracy", "held-out accuracy"),
        ("loss", "final training loss"),
        ("throughput", "throughput"),
        ("perplexity", "held-out perplexity"),  # masks runs (experiment=sweep_masks)
    ):
        path = metric_vs_sparsity(grouped, metric, out / f"{metric}_vs_sparsity.png", label)
        if path:
            written[f"{metric}_vs_sparsity"] = path
    table = method_by_sparsity(grouped, "accuracy")
    if not table.empty:
        written["accuracy_by_method"] = write_atomic(
            out / "accuracy_by_method.csv", lambda tmp: table.to_csv(tmp)
        )
    if path := heatmap(table, "accuracy", out / "heatmap_accuracy.png"):
        written["heatmap_accuracy"] = path
    archives = [  # finished runs only, as in the tables (a failed run's archive is partial)
        pd.read_csv(sweep_dir / run / ARCHIVE_FILE).assign(method=method)
        for run, method, status in zip(runs["run"], add_method(runs)["method"], runs["status"])
        if status == "finished" and (sweep_dir / run / ARCHIVE_FILE).exists()
    ]
    if archives and (path := archive_scatter(pd.concat(archives), out / "archive_pareto.png")):
        written["archive_pareto"] = path
    for run in runs["run"]:
        log = sweep_dir / run / LOG_FILE
        stem = "layer_sparsity" if run == "." else f"layer_sparsity_{run.replace('/', '_')}"
        name = sweep_dir.resolve().name if run == "." else run
        if log.exists() and (
            path := layer_sparsity_heatmap(log, out / fit_file_name(stem, ".png"), name)
        ):
            written[stem] = path
    written.update(write_throughput(sweep_dir, out))  # experiment=sweep_throughput runs
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "sweep_dir", help="a multirun directory, a run directory, or any directory of runs"
    )
    parser.add_argument(
        "--out", default=None, help="where to write (default: <sweep_dir>/analysis)"
    )
    args = parser.parse_args()
    runs = collect(args.sweep_dir)
    written = analyze(args.sweep_dir, args.out)
    bad = runs[runs["status"] != "finished"]
    print(f"{len(runs)} runs: {len(runs) - len(bad)} finished, {len(bad)} failed or unfinished")
    for _, r in bad.iterrows():
        print(f"  {r['status']:<10} {r['run']}  {r['error']}")
    for name, path in written.items():
        print(f"{name:<26} {path}")


if __name__ == "__main__":
    main()
