"""Report of a method comparison: test accuracy against forward passes (mean +- standard
error over seeds, one panel per starting point) as a PNG, and a markdown table of final
accuracies next to reference numbers."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sparse_merge.tracking.io import write_atomic  # noqa: E402


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    x = np.asarray(values, dtype=float)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0
    return float(x.mean()), se


def group(results: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[Mapping[str, Any]]]]:
    """Results by panel, then method (in first-seen order)."""
    out: dict[str, dict[str, list[Mapping[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        out[r["panel"]][r["method"]].append(r)
    return out


def plot_curves(
    results: Sequence[Mapping[str, Any]], titles: Mapping[str, str], out: str | Path
) -> Path:
    """One panel per starting point: test accuracy (%) against forward passes, mean +- s.e."""
    grouped = group(results)
    fig, axes = plt.subplots(1, len(grouped), figsize=(6 * len(grouped), 4.5), squeeze=False)
    for ax, (panel, methods) in zip(axes[0], grouped.items()):
        for method, runs in methods.items():
            grid = np.asarray(runs[0]["grid"])
            ys = np.asarray([r["test"] for r in runs]) * 100  # [seeds, points]
            mean = ys.mean(0)
            se = ys.std(0, ddof=1) / math.sqrt(len(ys)) if len(ys) > 1 else np.zeros_like(mean)
            (line,) = ax.plot(grid, mean, label=f"{method} (n={len(ys)})")
            ax.fill_between(grid, mean - se, mean + se, color=line.get_color(), alpha=0.25)
        ax.set_title(titles.get(panel, panel))
        ax.set_xlabel("forward passes")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = Path(out)
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return out


def final_table(
    results: Sequence[Mapping[str, Any]],
    titles: Mapping[str, str],
    paper: Mapping[str, Mapping[str, float]],
    notes: Mapping[str, str],
) -> str:
    """Markdown: final test accuracy per panel and method (mean +- s.e. over seeds), the
    reference number and the difference, then the notes."""
    lines = [
        "| panel | method | forward passes | seeds | test accuracy (%) | paper (%) | difference | forward passes/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for panel, methods in group(results).items():
        for method, runs in methods.items():
            mean, se = mean_se([r["final_test"] * 100 for r in runs])
            speed = np.mean([r["forward_passes_per_s"] for r in runs])
            ref = paper.get(panel, {}).get(method)
            ref_s = f"{ref:.1f}" if ref is not None else "–"
            diff = f"{mean - ref:+.1f}" if ref is not None else "–"
            lines.append(
                f"| {titles.get(panel, panel)} | {method} | {runs[0]['evals']} | {len(runs)} | "
                f"{mean:.1f} ± {se:.1f} | {ref_s} | {diff} | {speed:.0f} |"
            )
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- **{key}**: {text}" for key, text in notes.items()]
    return "\n".join(lines) + "\n"


def write_report(
    results: Sequence[Mapping[str, Any]],
    titles: Mapping[str, str],
    paper: Mapping[str, Mapping[str, float]],
    notes: Mapping[str, str],
    out_dir: str | Path,
    name: str = "results",
) -> dict[str, Path]:
    """``<name>.png`` and ``<name>.md`` under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = final_table(results, titles, paper, notes)
    md = out_dir / f"{name}.md"
    write_atomic(md, lambda tmp: tmp.write_text(table))
    return {"figure": plot_curves(results, titles, out_dir / f"{name}.png"), "table": md}
