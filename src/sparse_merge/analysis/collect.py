"""Read the runs of a sweep directory: their overrides, group choices, status and metrics.

A run is any directory holding ``.hydra/config.yaml`` (Hydra writes it for every job, before
the job starts). Its status comes from ``status.json`` (written by ``app.execute``): a run
without one, or still marked ``running``, is ``unfinished``; a run marked ``failed`` keeps its
error. Metrics are the flat keys of ``summary.json``.

A run's config, overrides and group choices are read from its ``run_identity.json`` (written
when the run that wrote the results claimed the folder, and put back when a resume is refused),
not from ``.hydra/``, which Hydra rewrites for every job launched into the folder, even one that
is then refused. An identity from before it recorded the overrides is checked against
``.hydra/config.yaml`` instead: a directory whose two disagree holds the files of two runs and is
left out, with a warning naming it. A directory without an identity (a run from before
identities were recorded) is read from ``.hydra/`` as it is.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from omegaconf import OmegaConf

from sparse_merge.tracking.run_identity import (
    IDENTITY_FILE,
    NOT_IDENTITY,
    describe,
    disagreements,
    read_json,
)

log = logging.getLogger("sparse_merge")

# Hydra's own groups and keys that say nothing about the experiment
_SKIP_CHOICES = ("hydra/", "local")


def find_runs(sweep_dir: str | Path) -> list[Path]:
    """Every run directory under ``sweep_dir`` (sorted) whose files are of one run; the others
    are left out with a warning (``mixed_files``)."""
    runs = []
    for run_dir in sorted(p.parent.parent for p in Path(sweep_dir).rglob(".hydra/config.yaml")):
        if (problem := mixed_files(run_dir)) is None:
            runs.append(run_dir)
        else:
            log.warning("left out %s: %s", run_dir, problem)
    return runs


def mixed_files(run_dir: Path) -> str | None:
    """Why the files of ``run_dir`` are of two runs, or ``None``: a value of
    ``.hydra/config.yaml`` is not the one ``run_identity.json`` (the run whose results are
    there) recorded."""
    held = read_json(run_dir / IDENTITY_FILE)
    if held is None or "overrides" in held:  # none, or one that is read instead of .hydra/
        return None
    config = OmegaConf.to_container(
        OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=False, enum_to_str=True
    )
    differ = disagreements(held.get("config") or {}, config)
    if not differ:
        return None
    more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
    return (
        f"its results are of a run of {describe(held)} ({IDENTITY_FILE}), but .hydra/ holds "
        f"another run's config, launched into the folder later: {', '.join(differ[:3])}{more}"
    )


def finished_results(root: str | Path) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(run row, results.json)`` of every finished run under ``root`` that wrote results."""
    root = Path(root)
    out = []
    for run_dir in find_runs(root):
        results = run_dir / "results.json"
        info = load_run(run_dir, root)
        if info.get("status") == "finished" and results.exists():
            out.append((info, json.loads(results.read_text())))
    return out


def table_cli(
    doc: str,
    stem: str,
    gather: Callable[[Path], list[dict[str, Any]]],
    markdown: Callable[[list[dict[str, Any]]], str],
) -> None:
    """``python -m ... <root> [--out DIR]``: gather the rows of the runs under ``root``, write
    ``<stem>.md`` and ``<stem>.csv`` (default: in ``root``) and print the Markdown."""
    from sparse_merge.tracking.io import write_atomic, write_csv

    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("root", help="a sweep directory (searched recursively)")
    parser.add_argument("--out", default=None, help="where to write (default: the root)")
    args = parser.parse_args()
    rows = gather(Path(args.root))
    out = Path(args.out or args.root)
    text = markdown(rows)
    write_atomic(out / f"{stem}.md", lambda tmp: tmp.write_text(text))
    write_csv(out / f"{stem}.csv", rows)
    print(text)


def _scalar(v: Any) -> Any:
    return v if isinstance(v, str | int | float | bool) or v is None else json.dumps(v)


def _launch_only(override: str) -> bool:
    """Whether an override says how a run was launched, not which run it is (``resume=true``:
    a job resumed alone would otherwise form a group of its own)."""
    key = override.lstrip("+~").partition("=")[0]
    return key in NOT_IDENTITY or key.startswith("hydra.")


def _same_spelling(value: str) -> str:
    """One spelling per value (``False`` and ``false``, ``0.50`` and ``0.5``: YAML's reading of
    it), so that one setting launched two ways is one group."""
    try:
        return str(yaml.safe_load(value))
    except yaml.YAMLError:
        return value


def load_run(run_dir: Path, root: Path) -> dict[str, Any]:
    """One row: ``run``, ``status``, ``error``, group choices, overrides, config knobs, metrics."""
    hydra_dir = run_dir / ".hydra"
    row: dict[str, Any] = {"run": str(run_dir.relative_to(root)) if run_dir != root else "."}
    status_file = run_dir / "status.json"
    status = json.loads(status_file.read_text()) if status_file.exists() else {}
    state = status.get("status", "unfinished")
    row["status"] = "unfinished" if state == "running" else state
    row["error"] = status.get("error", "")
    held = read_json(run_dir / IDENTITY_FILE)
    if held is not None and "overrides" in held:  # the run that wrote the results
        choices, cfg, overrides = (
            held.get("choices") or {},
            held.get("config") or {},
            held["overrides"],
        )
    else:
        choices = {}
        if (hydra_dir / "hydra.yaml").exists():
            choices = OmegaConf.load(hydra_dir / "hydra.yaml").hydra.runtime.choices
        cfg = OmegaConf.load(hydra_dir / "config.yaml")
        overrides = (
            OmegaConf.load(hydra_dir / "overrides.yaml")
            if (hydra_dir / "overrides.yaml").exists()
            else []
        )
    for group, option in choices.items():
        if not str(group).startswith(_SKIP_CHOICES):
            row[str(group)] = option
    for key in ("seed", "sparsity", "pipeline"):
        if key in cfg:
            row[key] = cfg[key]
    overrides = [o for o in map(str, overrides) if not _launch_only(o)]
    row["overrides"] = " ".join(overrides)
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        row.setdefault(key, _same_spelling(value))
    summary = run_dir / "summary.json"
    if summary.exists():
        for key, value in json.loads(summary.read_text()).items():
            row[f"metric/{key}"] = _scalar(value)
    return row


def collect(sweep_dir: str | Path) -> pd.DataFrame:
    """All runs of a sweep, one row each (failed and unfinished runs included)."""
    root = Path(sweep_dir)
    rows = [load_run(r, root) for r in find_runs(root)]
    if not rows:
        raise FileNotFoundError(f"no runs (directories with .hydra/config.yaml) under {root}")
    return pd.DataFrame(rows)
