"""Per-layer statistics of masks and their plots (sparsity histogram and bar chart, PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from sparse_merge.pruning.base import Masks  # noqa: E402
from sparse_merge.tracking.io import write_atomic  # noqa: E402


def _row(layer: str, keep: torch.Tensor) -> dict[str, Any]:
    pruned = (~keep.bool()).float()
    per_row = pruned.reshape(keep.shape[0], -1).mean(1) if keep.dim() > 1 else pruned
    return {
        "layer": layer,
        "numel": keep.numel(),
        "kept": int(keep.sum()),
        "sparsity": float(pruned.mean()),
        "row_sparsity_min": float(per_row.min()),
        "row_sparsity_max": float(per_row.max()),
        "empty_rows": int((per_row == 1).sum()),
    }


def mask_stats(masks: Masks) -> list[dict[str, Any]]:
    """One row per mask: name, size, kept, sparsity, and the spread of sparsity over output rows
    (``[out, in]`` for Linear, rows of the stored layout otherwise). A 3-D mask is a fused MoE
    expert parameter [E, out, in]: one row per expert, named
    ``model.layers.0.mlp.experts.gate_up_proj[3]``."""
    rows = []
    for name, keep in masks.items():
        layer = name.removesuffix(".weight")
        if keep.dim() == 3:
            rows.extend(_row(f"{layer}[{e}]", keep[e]) for e in range(keep.shape[0]))
        else:
            rows.append(_row(layer, keep))
    return rows


def overall_sparsity(masks: Masks) -> float:
    """Fraction of masked entries over all masks."""
    total = sum(m.numel() for m in masks.values())
    return sum(int((~m.bool()).sum()) for m in masks.values()) / max(total, 1)


def _save(fig: plt.Figure, out: Path) -> Path:
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return out


def plot_mask_stats(
    stats: list[dict[str, Any]], out_dir: str | Path, title: str = ""
) -> list[Path]:
    """``sparsity_histogram.png`` (how many layers at each sparsity) and ``sparsity_by_layer.png``
    (one bar per layer) in ``out_dir``."""
    out_dir = Path(out_dir)
    values = [r["sparsity"] for r in stats]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(values, bins=torch.linspace(0, 1, 21).tolist(), edgecolor="black")
    ax.set_xlabel("layer sparsity")
    ax.set_ylabel("layers")
    ax.set_title(title or "per-layer sparsity")
    fig.tight_layout()
    hist = _save(fig, out_dir / "sparsity_histogram.png")

    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(stats) + 2), 4.5))
    ax.bar(range(len(stats)), values)
    ax.set_xticks(range(len(stats)), [r["layer"] for r in stats], rotation=90, fontsize=6)
    ax.set_ylim(0, 1)
    ax.set_ylabel("sparsity")
    ax.set_title(title or "sparsity by layer")
    fig.tight_layout()
    bars = _save(fig, out_dir / "sparsity_by_layer.png")
    return [hist, bars]
