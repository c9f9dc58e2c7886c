"""``python -m sparse_merge.analysis.merge_table <dir> [--out DIR] [--ci]``: the merge
comparison over seeds -- every model row of the merge runs' ``results.json`` (base, parents,
their pruned copies, baselines, evolved picks) as mean ± sd over the runs found, in one Markdown
table (``merge_table.md``), a CSV (``merge_table.csv``) and a bar chart (``merge_table.png``).
``--ci`` adds, after every score and sparsity column, the 95 % confidence interval of the mean
over seeds from Student's t distribution with n - 1 degrees of freedom
(``mean ± t_{0.975, n-1} * sd / sqrt(n)``; ``–`` for a single seed).

Runs are grouped by the group choices and overrides other than ``seed``, so a multirun over
seeds and one other setting gives one table per setting.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from sparse_merge.analysis.collect import finished_results
from sparse_merge.tracking.io import write_atomic, write_csv


def _fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _t_two_sided(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's t with ``df`` degrees of freedom, ``t >= 0``: the finite
    series of Abramowitz & Stegun 26.7.3-4 (exact for integer ``df``)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:  # sin(theta) * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... + ... cos^(df-2))
        term = total = 1.0
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        return s * total
    # 2/pi * (theta + sin(theta) * (cos + 2/3 cos^3 + ... + ... cos^(df-2))); df=1: 2 theta/pi
    term = total = math.cos(theta) if df > 1 else 0.0
    for k in range(1, (df - 1) // 2):
        term *= (2 * k) / (2 * k + 1) * c2
        total += term
    return 2 / math.pi * (theta + s * total)


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile (``0.5 < q < 1``) of Student's t with ``df >= 1`` degrees of freedom,
    by bisection on the exact distribution function (to 1e-12)."""
    if not 0.5 < q < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < q < 1 and df >= 1, got q={q}, df={df}")
    level = 2 * q - 1  # P(|T| <= t)
    lo, hi = 0.0, 1.0
    while _t_two_sided(hi, df) < level:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_two_sided(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def confidence_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """``level`` confidence interval of the mean of ``values`` (Student's t, n - 1 degrees of
    freedom); ``None`` for fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mean = statistics.fmean(values)
    half = t_quantile(0.5 + level / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean + half


def _fmt_ci(values: list[float], digits: int = 3) -> str:
    ci = confidence_interval(values)
    return "–" if ci is None else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


CI = "95% CI"  # suffix of the confidence-interval columns


def _span(values: list[int]) -> str:
    """``7``, ``7–9`` for a range over seeds, ``–`` for rows that cost no search."""
    if values == [0]:
        return "–"
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"


def setting(run: dict[str, Any]) -> str:
    """The run's overrides without ``seed`` (what the runs of one table share)."""
    skip = ("seed=", "save_models=", "hardware.num_threads=", "baselines=", "resume=")
    items = [o for o in str(run.get("overrides", "")).split() if not o.startswith(skip)]
    return " ".join(items) or "(defaults)"


def gather(root: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Finished merge runs under ``root`` by setting: each run's ``results.json`` and seed."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for info, results in finished_results(root):
        groups[setting(info)].append(results)
    if not groups:
        raise FileNotFoundError(f"no finished merge runs with results.json under {root}")
    return dict(groups)


def table(runs: list[dict[str, Any]], ci: bool = False) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows): per model, mean ± sd over ``runs`` of each held-out column and of the
    measured sparsity; ``ci``: each followed by a ``<column> 95% CI`` column."""
    first = runs[0]
    skip = ("model", "mean", "sparsity", "sparsity_eps", "selection", "evals", "settings")
    tasks = [k for k in first["models"][0] if k not in skip]
    picks = set(first.get("picked") or [first.get("headline")])
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        for row in r["models"]:
            by_model[row["model"]].append(row)
    near = ["sparsity_eps"] if "sparsity_eps" in first["models"][0] else []  # scorer.epsilon > 0
    values = [*tasks, "mean", "sparsity", *near]
    out = []
    for model, rows in by_model.items():
        evals = sorted({int(r.get("evals") or 0) for r in rows})
        cells: dict[str, str] = {}
        for c in values:
            cells[c] = _fmt([r[c] for r in rows])
            if ci:
                cells[f"{c} {CI}"] = _fmt_ci([r[c] for r in rows])
        out.append(
            {
                "model": model,
                **cells,
                "selection evals": _span(evals),
                "seeds": len(rows),
                "picked": model in picks,
                "_mean": statistics.fmean(r["mean"] for r in rows),
                "_sparsity": min(r["sparsity"] for r in rows),
                "_evals": max(evals),
            }
        )
    columns = [c for v in values for c in ([v, f"{v} {CI}"] if ci else [v])]
    return ["model", *columns, "selection evals", "seeds"], out


def markdown(columns: list[str], rows: list[dict[str, Any]], target: float = 0.0) -> str:
    """A Markdown table; the best mean among the rows at the target sparsity in bold."""
    at_target = [r for r in rows if r["_sparsity"] >= target - 0.005]
    best = max(r["_mean"] for r in at_target)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [str(r[c]) for c in columns]
        if r["_mean"] == best and any(r is t for t in at_target):
            cells[columns.index("mean")] = f"**{cells[columns.index('mean')]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Held-out mean per model (bars, mean ± sd over seeds): the unsearched references (base,
    parents) grey, the searched baselines blue, the evolved picks orange."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in rows]
    means, sds = [], []
    for r in rows:
        m, _, sd = str(r["mean"]).partition(" ± ")
        means.append(float(m))
        sds.append(float(sd) if sd else 0.0)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 3.5))
    colours = [
        "#999999" if r["selection evals"] == "–" else "#dd8452" if r["picked"] else "#4c72b0"
        for r in rows
    ]
    ax.bar(range(len(rows)), means, yerr=sds, capsize=3, color=colours)
    ax.set_xticks(range(len(rows)), names, rotation=45, ha="right")
    ax.set_ylabel("held-out mean")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()

    def save(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=120)

    write_atomic(path, save)
    plt.close(fig)
    return path


def _baseline_budget(rows: list[dict[str, Any]], evolution: int) -> str:
    """How the searched baselines' selection evaluations compare with the evolution's fewest."""
    searched = [r["_evals"] for r in rows if not r["picked"] and r["_evals"] > 0]
    if not searched:
        return "no baseline searched."
    if max(searched) <= evolution:
        return "every baseline at most as many."
    return f"**the baselines up to {max(searched)}, more than the evolution**."


def report(root: str | Path, out: str | Path | None = None, ci: bool = False) -> str:
    """Write ``merge_table.md``/``.csv``/``.png`` under ``out`` (default: ``root``); returns
    the Markdown text. ``ci``: add the 95 % confidence interval (Student's t) of every score and
    sparsity column."""
    root = Path(root)
    out = Path(out) if out else root
    parts, csv_rows = [], []
    for i, (name, runs) in enumerate(gather(root).items()):
        columns, rows = table(runs, ci)
        budget = sorted({int(r.get("evaluations", 0)) for r in runs})
        target = runs[0].get("target_sparsity")
        epsilon = runs[0].get("sparsity_epsilon", 0.0)  # results before the knob: exact zeros
        head = (
            f"**{name}** — {len(runs)} seed(s), target sparsity {target}, sparsity = exact "
            f"zeros (selection's sparsity_epsilon: {epsilon}), held-out scores "
            f"(mean ± sd over seeds{'; 95% CI of the mean, Student t, n-1 dof' if ci else ''}); "
            f"the evolution used {_span(budget)} selection evaluations and "
            + _baseline_budget(rows, min(budget))
        )
        parts.append(head + "\n\n" + markdown(columns, rows, float(target or 0.0)))
        csv_rows += [{"setting": name, **{c: r[c] for c in columns}} for r in rows]
        plot(rows, out / ("merge_table.png" if i == 0 else f"merge_table_{i}.png"), name)
    text = "\n\n".join(parts) + "\n"
    write_atomic(out / "merge_table.md", lambda tmp: tmp.write_text(text))
    write_csv(out / "merge_table.csv", csv_rows)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", help="a multirun directory of merge runs")
    parser.add_argument("--out", default=None, help="where to write (default: the directory)")
    parser.add_argument(
        "--ci", action="store_true", help="add 95%% CI columns (Student's t, n - 1 dof)"
    )
    args = parser.parse_args()
    print(report(args.root, args.out, args.ci))


if __name__ == "__main__":
    main()
