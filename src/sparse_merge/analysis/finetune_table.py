"""``python -m sparse_merge.analysis.finetune_table <dir> [--out DIR]``: the sparse fine-tuning
table of a sweep -- per method (adapter and mode), trainable parameters, the held-out score and
corpus perplexity before (pruned) and after tuning, the exact sparsity of the merged model and
the number of masked weights that are not zero. Writes ``finetune_table.md`` and
``finetune_table.csv`` and prints the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparse_merge.analysis.collect import finished_results, table_cli


def gather(root: str | Path) -> list[dict[str, Any]]:
    """One row per finished fine-tuning run under ``root``."""
    rows = []
    for info, r in finished_results(root):
        if "trainable_params" not in r:  # not a fine-tuning run
            continue
        perplexity = next((k for k in r if k.endswith("/perplexity")), None)
        rows.append(
            {
                "method": f"{info.get('lora', 'adapter')} ({r['method']})",
                "trainable_params": r["trainable_params"],
                "score_before": r["accuracy_before"],
                "score_after": r["accuracy"],
                "perplexity_before": r.get(f"{perplexity}_before") if perplexity else None,
                "perplexity_after": r.get(perplexity) if perplexity else None,
                "sparsity": r["sparsity"],
                "masked_nonzeros": r["masked_nonzeros"],
                "steps": r["steps"],
                "train_seconds": r["train_seconds"],
                "wall_seconds": r["wall_seconds"],
            }
        )
    if not rows:
        raise FileNotFoundError(f"no finished fine-tuning runs with results.json under {root}")
    return sorted(rows, key=lambda r: r["method"])


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| method | trainable parameters | perplexity pruned -> tuned | score pruned -> tuned "
        "| sparsity (measured) | masked weights not zero | steps | minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ppl = (
            f"{r['perplexity_before']:.2f} -> {r['perplexity_after']:.2f}"
            if r["perplexity_after"] is not None
            else "–"
        )
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {ppl} "
            f"| {r['score_before']:.4f} -> {r['score_after']:.4f} | {r['sparsity']:.4f} "
            f"| {r['masked_nonzeros']} | {r['steps']} | {r['wall_seconds'] / 60:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    table_cli(__doc__, "finetune_table", gather, markdown)


if __name__ == "__main__":
    main()
