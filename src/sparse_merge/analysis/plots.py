"""PNG plots of a sweep: metrics against sparsity per method, a method x sparsity heatmap, the
accuracy-sparsity Pareto front of evolved archives, and per run the child's sparsity per layer
and step (``evolver.log_layer_sparsity``)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _series(grouped: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """One line per model/task/method; the label names only what varies."""
    keys = [k for k in ("model", "task", "method") if grouped[k].astype(str).nunique() > 1] or [
        "method"
    ]
    out = []
    for values, part in grouped.groupby(keys, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        out.append((" / ".join(map(str, values)), part.sort_values("sparsity")))
    return out


def metric_vs_sparsity(
    grouped: pd.DataFrame, metric: str, out: Path, ylabel: str | None = None
) -> Path | None:
    """Mean +- std of ``metric`` against target sparsity, one line per method."""
    if f"{metric}_mean" not in grouped:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, part in _series(grouped):
        x = part["sparsity"].astype(float)
        y = part[f"{metric}_mean"]
        err = part.get(f"{metric}_std", pd.Series(0.0, index=part.index)).fillna(0.0)
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xlabel("target sparsity")
    ax.set_ylabel(ylabel or metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def heatmap(table: pd.DataFrame, metric: str, out: Path) -> Path | None:
    """Heatmap of a method x sparsity table (``tables.method_by_sparsity``)."""
    if table.empty:
        return None
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * table.shape[1], 1.2 + 0.45 * table.shape[0]))
    im = ax.imshow(table.values, aspect="auto", cmap="viridis")
    ax.set_xticks(range(table.shape[1]), [f"{float(s):.2f}" for s in table.columns])
    ax.set_yticks(range(table.shape[0]), table.index, fontsize=8)
    for (i, j), v in np.ndenumerate(table.values):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=7)
    ax.set_xlabel("target sparsity")
    fig.colorbar(im, ax=ax, label=metric)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Indices of the points [N, 2] not dominated when maximising both coordinates, by x."""
    order = np.lexsort((-points[:, 1], -points[:, 0]))  # x descending, then y descending
    front, best_y = [], -np.inf
    for i in order:
        if points[i, 1] > best_y:
            front.append(i)
            best_y = points[i, 1]
    return np.array(sorted(front, key=lambda i: points[i, 0]), dtype=int)


def archive_scatter(archives: pd.DataFrame, out: Path) -> Path | None:
    """Accuracy against sparsity of every final-archive individual, with the Pareto front."""
    if archives.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    pts = archives[["sparsity", "accuracy"]].to_numpy(dtype=float)
    for label, part in archives.groupby("method", dropna=False):
        ax.scatter(part["sparsity"], part["accuracy"], s=18, alpha=0.6, label=str(label))
    front = pts[pareto_front(pts)]
    ax.plot(front[:, 0], front[:, 1], "k--", lw=1.2, label="Pareto front")
    ax.set_xlabel("sparsity (prunable weights)")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def layer_sparsity_table(log: Path) -> pd.DataFrame:
    """Layers x steps: the child's exact sparsity per prunable layer from the ``step`` records
    of a run's ``log.jsonl`` that hold ``layer_sparsity`` (layers in logged order, steps
    sorted; a step logged twice, as after a resume, counts with its later record). Empty
    when the run logged none."""
    by_step: dict[int, dict[str, float]] = {}
    with open(log) as f:
        for line in f:
            if '"layer_sparsity"' not in line:  # cheap filter: most records have none
                continue
            record = json.loads(line)
            if record.get("event") == "step" and record.get("layer_sparsity"):
                by_step[int(record["step"])] = record["layer_sparsity"]
    if not by_step:
        return pd.DataFrame()
    names = list(dict.fromkeys(n for layers in by_step.values() for n in layers))
    table = pd.DataFrame(
        {step: [by_step[step].get(n, np.nan) for n in names] for step in sorted(by_step)},
        index=names,
    )
    table.columns.name, table.index.name = "step", "layer"
    return table


def layer_sparsity_heatmap(log: Path, out: Path, title: str | None = None) -> Path | None:
    """Heatmap of ``layer_sparsity_table(log)`` (layer x step, colour = exact sparsity in
    [0, 1]; ``title`` names the run); None when the run logged no per-layer sparsity."""
    table = layer_sparsity_table(log)
    if table.empty:
        return None
    n_layers, n_steps = table.shape
    fig, ax = plt.subplots(
        figsize=(min(4.0 + 0.06 * n_steps, 16.0), min(2.0 + 0.16 * n_layers, 40.0))
    )
    im = ax.imshow(
        table.to_numpy(dtype=float),
        aspect="auto",
        cmap="viridis",
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
    )
    every = max(1, n_layers // 60)  # at most about 60 labels
    labels = [str(n).removesuffix(".weight") for n in table.index[::every]]
    ax.set_yticks(range(0, n_layers, every), labels, fontsize=6)
    steps = list(table.columns)
    ticks = range(0, n_steps, max(1, n_steps // 12))
    ax.set_xticks(list(ticks), [str(steps[i]) for i in ticks])
    ax.set_xlabel("step")
    ax.set_title("child sparsity per layer" + (f" ({title})" if title else ""), fontsize=9)
    fig.colorbar(im, ax=ax, label="sparsity (exact zeros)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
