"""Side-by-side table of fine-tuning runs: ``python experiments/row_sparse/summarize.py ROOT``.

Reads every finished run under ``ROOT`` (any number of sweep directories) with the sweep
analysis' ``collect``, names each run by the overrides that vary across all runs (seed, and
the overrides every run shares, left out), and prints one markdown row per method: held-out
accuracy (mean and std over seeds, per task), final training loss, trainable parameters, step
time (``train_seconds / steps``) and peak memory. Writes ``results.csv`` next to this file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from sparse_merge.analysis.collect import collect, find_runs
from sparse_merge.tracking.io import write_atomic


def _method(overrides: str, shared: set[str]) -> str:
    keep = [o for o in overrides.split() if o not in shared and not o.startswith("seed=")]
    return " ".join(sorted(keep))


def summarize(root: str | Path) -> pd.DataFrame:
    """One row per method with mean/std over seeds."""
    root = Path(root)
    dirs = sorted({run.parent for run in find_runs(root)})
    runs = pd.concat([collect(d) for d in dirs], ignore_index=True)
    runs = runs[runs["status"] == "finished"].copy()
    split = runs["overrides"].str.split()
    shared = set.intersection(*(set(x) for x in split))
    runs["method"] = runs["overrides"].map(lambda o: _method(o, shared))
    runs["step_ms"] = 1000 * runs["metric/train_seconds"] / runs["metric/steps"]
    cols = {
        "accuracy": "metric/accuracy",
        "addition": "metric/accuracy/addition",
        "reversal": "metric/accuracy/reversal",
        "loss": "metric/loss",
        "trainable": "metric/trainable_params",
        "step_ms": "step_ms",
        "peak_mb": "metric/peak_memory_mb",
    }
    grouped = runs.groupby("method")
    table = pd.DataFrame({"n": grouped.size()})
    for name, col in cols.items():
        table[name] = grouped[col].mean()
        if name in ("accuracy", "addition", "reversal", "loss"):
            table[f"{name}_std"] = grouped[col].std()
    return table.reset_index().sort_values("method")


def _pm(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {0 if pd.isna(std) else std:.3f}"


def markdown(table: pd.DataFrame) -> str:
    """The table as markdown, mean ± std."""
    lines = [
        "| method | n | accuracy | addition | reversal | train loss | trainable | step ms | peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table.itertuples():
        lines.append(
            f"| {r.method} | {r.n} | {_pm(r.accuracy, r.accuracy_std)} | "
            f"{_pm(r.addition, r.addition_std)} | {_pm(r.reversal, r.reversal_std)} | "
            f"{_pm(r.loss, r.loss_std)} | {int(r.trainable)} | {r.step_ms:.0f} | {r.peak_mb:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    table = summarize(sys.argv[1])
    out = Path(__file__).resolve().parent / "results.csv"
    write_atomic(out, lambda tmp: table.to_csv(tmp, index=False))
    print(markdown(table))
