"""Tables of a sweep: per run, grouped over seeds, and performance against sparsity.

Pipelines write standard metric names into ``summary.json`` so sweeps of different pipelines
read the same way: ``accuracy`` (held-out score of the final model), ``loss`` (final training
loss), ``throughput`` (samples or forward passes per second), ``sparsity`` (achieved
fraction of zero prunable weights) and, for masks runs, ``perplexity`` (held-out perplexity of
the pruned model).
"""

from __future__ import annotations

import pandas as pd

GROUP_KEYS = ("model", "task", "method", "sparsity")
STANDARD = ("accuracy", "loss", "throughput", "sparsity", "perplexity")
# columns that identify a run but never a method
_NOT_METHOD = {
    "run",
    "status",
    "error",
    "overrides",
    "seed",
    "sparsity",
    "model",
    "task",
    "pipeline",
}


def add_method(df: pd.DataFrame) -> pd.DataFrame:
    """Add a ``method`` column: the settings that vary across the sweep, other than model, task,
    sparsity and seed (``pruner=wanda,lora.mode=sparse_to_dense``); the pruner when none vary."""
    df = df.copy()
    candidates = [c for c in df.columns if c not in _NOT_METHOD and not c.startswith("metric/")]
    varying = [c for c in candidates if df[c].astype(str).nunique(dropna=False) > 1]
    if varying:
        df["method"] = (
            df[varying]
            .astype(str)
            .apply(lambda r: ",".join(f"{k}={v}" for k, v in r.items()), axis=1)
        )
    else:
        df["method"] = df.get("pruner", "default")
    for key in ("model", "task", "sparsity"):
        if key not in df:
            df[key] = ""
    return df


def metric_columns(df: pd.DataFrame) -> list[str]:
    """The numeric ``metric/*`` columns."""
    return [
        c for c in df.columns if c.startswith("metric/") and pd.api.types.is_numeric_dtype(df[c])
    ]


def grouped_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count over seeds of every metric, per model/task/method/sparsity (finished runs)."""
    done = add_method(df[df["status"] == "finished"])
    metrics = metric_columns(done)
    if done.empty or not metrics:
        return pd.DataFrame(columns=[*GROUP_KEYS, "n_runs"])
    grouped = done.groupby(list(GROUP_KEYS), dropna=False)[metrics].agg(["mean", "std", "count"])
    grouped.columns = [f"{m.removeprefix('metric/')}_{stat}" for m, stat in grouped.columns]
    grouped.insert(0, "n_runs", done.groupby(list(GROUP_KEYS), dropna=False).size())
    return grouped.reset_index().sort_values(list(GROUP_KEYS))


def sparsity_vs_performance(grouped: pd.DataFrame) -> pd.DataFrame:
    """The standard metrics' mean and std against target sparsity, per model/task/method."""
    keep = [
        c
        for c in grouped.columns
        if c in GROUP_KEYS
        or c == "n_runs"
        or c.rsplit("_", 1)[0] in STANDARD
        and not c.endswith("_count")
    ]
    return grouped[keep]


def method_by_sparsity(grouped: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Method x target-sparsity table of ``metric``'s mean over seeds (what the heatmap shows)."""
    if f"{metric}_mean" not in grouped:
        return pd.DataFrame()
    return grouped.pivot_table(
        index="method", columns="sparsity", values=f"{metric}_mean", aggfunc="mean"
    )
