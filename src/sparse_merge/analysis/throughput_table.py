"""``python -m sparse_merge.analysis.throughput_table <dir> [--out DIR]``: the throughput sweep
(``experiment=sweep_throughput``) as a table and plots -- one row per model, mode, sparsity and
batch size with samples/s, tokens/s, step time and peak memory (mean over runs of the same
point), written to ``throughput.csv`` and ``throughput.md``, and one PNG per mode (and model),
``throughput_<mode>.png``: samples/s against batch size on a log2 axis, one line per sparsity
(at the median step time, robust to steps another process slowed down; crosses mark the rate
over all timed steps), and peak memory beside it. ``python -m sparse_merge.analysis`` writes
the same files into ``<dir>/analysis`` when the sweep holds throughput runs (also the default
``--out`` here).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pandas as pd

from sparse_merge.analysis.collect import finished_results
from sparse_merge.tracking.io import write_atomic, write_csv

KEYS = ["model", "mode", "target_sparsity", "batch_size"]
# the overrides that pick a point (or a repeat of it); any other override is another setting
POINT_OVERRIDES = ("seed", "sparsity", "finetune.batch_size", "lora", "lora.mode", "model")
VALUES = [
    "samples_per_s",
    "samples_per_s_median",
    "tokens_per_s",
    "tokens_per_s_median",
    "tokens_per_sample",
    "step_time_s",
    "step_time_median_s",
    "peak_memory_mb",
]
MEMORY_LABELS = {
    "cuda_max_allocated": "CUDA: peak memory allocated, weights included",
    "cpu_peak_rss_delta": "CPU: peak RSS of a step above the RSS between steps",
}


def gather(root: str | Path) -> list[dict[str, Any]]:
    """One row per model, mode, sparsity and batch size of the finished throughput runs under
    ``root`` (values averaged over repeated runs of a point; ``runs`` counts them). Runs of other
    settings (``lora.r=32``, ``hardware.num_threads=2``: any override but those of a point) are
    other points, not repeats: their model is named with the setting, ``toy-llama
    [lora.r=32]`` (they were averaged together)."""
    found = [(info, r) for info, r in finished_results(root) if r.get("pipeline") == "throughput"]
    settings = [_setting(info) for info, _ in found]
    named = len(set(settings)) > 1
    rows = [
        {
            **{k: r[k] for k in KEYS},
            "model": f"{r['model']} [{setting or 'defaults'}]" if named else r["model"],
            **{k: r[k] for k in VALUES},
            "sparsity": r["sparsity"],
            "memory_measure": r["memory_measure"],
            "device": r["device"],
            "threads": r["threads"],
            "timed_steps": r["timed_steps"],
            "warmup_steps": r["warmup_steps"],
        }
        for (_, r), setting in zip(found, settings, strict=True)
    ]
    if not rows:
        return []
    df = pd.DataFrame(rows)
    first = {c: "first" for c in df.columns if c not in KEYS and c not in VALUES}
    agg = df.groupby(KEYS, dropna=False).agg(
        {**{c: "mean" for c in VALUES}, **first, "device": ["first", "size"]}
    )
    agg.columns = ["runs" if stat == "size" else col for col, stat in agg.columns.to_flat_index()]
    return agg.reset_index().sort_values(KEYS).to_dict("records")


def _setting(info: dict[str, Any]) -> str:
    """The run's overrides other than those that pick its point (``POINT_OVERRIDES``)."""
    items = str(info.get("overrides", "")).split()
    return " ".join(o for o in items if o.lstrip("+~").partition("=")[0] not in POINT_OVERRIDES)


def _short(value: float) -> str:
    """Three significant digits without exponents (1563, 24.1, 5.14)."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """Per model: samples/s and peak memory by mode and sparsity (rows) and batch size
    (columns)."""
    df = pd.DataFrame(rows)
    out = []
    for model, part in df.groupby("model", sort=True):
        sizes = sorted(part["batch_size"].unique())
        head = "| mode | sparsity | " + " | ".join(f"bs {b}" for b in sizes) + " |"
        rule = "|---|---|" + "---|" * len(sizes)
        measure = MEMORY_LABELS.get(part["memory_measure"].iloc[0], "peak memory") + " (MiB)"
        for title, col, fmt in (
            ("training samples/s at the median step time", "samples_per_s_median", _short),
            ("training samples/s over all timed steps", "samples_per_s", _short),
            (measure, "peak_memory_mb", "{:.1f}".format),
        ):
            out += [f"{model}, {title}:", "", head, rule]
            for (mode, sparsity), g in part.groupby(["mode", "target_sparsity"], sort=True):
                cells = dict(zip(g["batch_size"], g[col]))
                vals = [fmt(cells[b]) if pd.notna(cells.get(b)) else "–" for b in sizes]
                out.append(f"| {mode} | {sparsity:.0%} | " + " | ".join(vals) + " |")
            out.append("")
    return "\n".join(out)


def plot_mode(part: pd.DataFrame, title_text: str, out: Path) -> Path:
    """Samples/s (left) and peak memory (right) against batch size, a line per sparsity."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for sparsity, g in part.groupby("target_sparsity", sort=True):
        g = g.sort_values("batch_size")
        label = f"{sparsity:.0%} sparse"
        line = left.plot(g["batch_size"], g["samples_per_s_median"], marker="o", label=label)
        left.scatter(g["batch_size"], g["samples_per_s"], marker="x", color=line[0].get_color())
        right.plot(g["batch_size"], g["peak_memory_mb"], marker="o", label=label)
    measure = MEMORY_LABELS.get(part["memory_measure"].iloc[0], "peak memory")
    panels = (
        (left, "training samples/s", "o: at the median step time, x: over all timed steps"),
        (right, "peak memory (MiB)", measure),
    )
    for ax, ylabel, title in panels:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(part["batch_size"].unique()))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    threads = int(part["threads"].iloc[0])
    device = part["device"].iloc[0]
    fig.suptitle(f"{title_text} ({device}, {threads} thread{'' if threads == 1 else 's'})")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_throughput(root: str | Path, out: str | Path) -> dict[str, Path]:
    """``throughput.csv``, ``throughput.md`` and ``throughput_<mode>.png`` (per model when the
    sweep holds several) in ``out``; nothing when ``root`` holds no throughput runs."""
    rows = gather(root)
    if not rows:
        return {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows)
    written = {
        "throughput": write_csv(out / "throughput.csv", rows),
        "throughput_md": write_atomic(out / "throughput.md", lambda tmp: tmp.write_text(text)),
    }
    df = pd.DataFrame(rows)
    several = df["model"].nunique() > 1
    for (model, mode), part in df.groupby(["model", "mode"], sort=True):
        stem = f"throughput_{model}_{mode}" if several else f"throughput_{mode}"
        written[stem] = plot_mode(part, f"{model}: {mode}", out / f"{stem}.png")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", help="a sweep directory (searched recursively)")
    parser.add_argument("--out", default=None, help="where to write (default: <root>/analysis)")
    args = parser.parse_args()
    written = write_throughput(args.root, args.out or Path(args.root) / "analysis")
    if not written:
        raise SystemExit(f"no finished throughput runs with results.json under {args.root}")
    print((Path(written["throughput_md"])).read_text())
    for name, path in written.items():
        print(f"{name:<34} {path}")


if __name__ == "__main__":
    main()
