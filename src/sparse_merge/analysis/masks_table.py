"""``python -m sparse_merge.analysis.masks_table <dir> [--out DIR]``: the pruning table of a
masks sweep -- held-out perplexity by sparsity pattern (rows) and pruning method (columns),
each cell with the sparsity the masks actually reached, plus the dense model, the pruning time
and the run's wall time. Writes ``masks_table.md`` and ``masks_table.csv`` and prints the table.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from sparse_merge.analysis.collect import finished_results, table_cli


def pattern(result: dict[str, Any]) -> str:
    """``50 % row``, ``2:4``...: what the masks' sparsity pattern is."""
    granularity = str(result["granularity"])
    if ":" in granularity:
        return granularity
    return f"{round(100 * result['target_sparsity'])} % {granularity}"


def gather(root: str | Path) -> list[dict[str, Any]]:
    """One row per finished masks run under ``root`` (its ``results.json``)."""
    rows = []
    for _, r in finished_results(root):
        if "dense_perplexity" not in r:  # not a masks run
            continue
        rows.append(
            {
                "pattern": pattern(r),
                "method": r["method"],
                "perplexity": r["perplexity"],
                "sparsity": r["sparsity"],
                "dense_perplexity": r["dense_perplexity"],
                "dense_sparsity": r.get("dense_sparsity"),
                "prune_seconds": r["prune_seconds"],
                "wall_seconds": r.get("wall_seconds"),
                "calibration": f"{r['n_calibration']} x {r.get('calibration_length', '?')}",
            }
        )
    if not rows:
        raise FileNotFoundError(f"no finished masks runs with results.json under {root}")
    return sorted(rows, key=lambda r: (":" in r["pattern"], r["pattern"], r["method"]))


def _cell(runs: list[dict[str, Any]]) -> str:
    """``19.5 (0.500)`` for one run; ``10.0 ± 6.5 (0.500, 2 runs)`` for several."""
    ppl = [r["perplexity"] for r in runs]
    sparsity = statistics.fmean(r["sparsity"] for r in runs)
    if len(runs) == 1:
        return f"{ppl[0]:,.1f} ({sparsity:.3f})"
    spread = statistics.stdev(ppl)
    return f"{statistics.fmean(ppl):,.1f} ± {spread:,.1f} ({sparsity:.3f}, {len(runs)} runs)"


def markdown(rows: list[dict[str, Any]]) -> str:
    """Perplexity (measured sparsity) by pattern and method, the dense model first; several
    runs of a cell (seeds) as mean ± sd (sample sd) and their count (one used to overwrite
    the others)."""
    methods = sorted({r["method"] for r in rows})
    cells: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        cells[r["pattern"]][r["method"]].append(r)
    dense = rows[0]
    lines = [
        "| pattern | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
        f"| dense | {dense['dense_perplexity']:.2f} (sparsity {dense['dense_sparsity']:.4f})"
        + " |" * len(methods),
    ]
    for name, by_method in cells.items():
        row = [_cell(by_method[m]) if m in by_method else "–" for m in methods]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    seconds = {m: [r["prune_seconds"] for r in rows if r["method"] == m] for m in methods}
    lines.append(
        "| seconds to prune | "
        + " | ".join(f"{min(s):.0f}–{max(s):.0f}" for s in seconds.values())
        + " |"
    )
    walls = [r["wall_seconds"] for r in rows if r["wall_seconds"] is not None]
    calibrations = sorted({r["calibration"] for r in rows if not r["calibration"].startswith("0 ")})
    note = f"\n{len(rows)} runs, calibration {' / '.join(calibrations) or 'none'} tokens"
    if walls:
        note += f", {sum(walls) / 60:.0f} min in all ({min(walls):.0f}–{max(walls):.0f} s a run)"
    return "\n".join(lines) + note + "\n"


def main() -> None:
    table_cli(__doc__, "masks_table", gather, markdown)


if __name__ == "__main__":
    main()
