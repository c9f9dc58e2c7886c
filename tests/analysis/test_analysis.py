"""Analysis of a synthetic sweep directory with finished, failed and unfinished runs."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from sparse_merge.analysis.__main__ import analyze
from sparse_merge.analysis.plots import pareto_front

ACC = {("magnitude", 0.0): 0.8, ("magnitude", 0.5): 0.4, ("wanda", 0.0): 0.8, ("wanda", 0.5): 0.6}


def _run(root, name, pruner, sparsity, seed, status, metrics=None, archive=None):
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"seed": seed, "sparsity": sparsity, "pipeline": "merge"})
    )
    choices = {
        "model": "toy",
        "task": "toy",
        "pruner": pruner,
        "hydra/launcher": "basic",
        "local": "default",
    }
    (d / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}})
    )
    (d / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([f"pruner={pruner}", f"sparsity={sparsity}", f"seed={seed}"])
    )
    if status:
        (d / "status.json").write_text(
            json.dumps(
                {
                    "status": status,
                    **({"error": "RuntimeError: boom"} if status == "failed" else {}),
                }
            )
        )
    if metrics:
        (d / "summary.json").write_text(json.dumps(metrics))
    if archive is not None:
        archive.to_csv(d / "archive.csv", index=False)


@pytest.fixture
def sweep(tmp_path):
    i = 0
    for (pruner, sparsity), acc in ACC.items():
        for seed in (0, 1):
            delta = 0.1 if seed else -0.1  # mean over seeds is acc, std is 0.1 * sqrt(2)
            metrics = {
                "accuracy": acc + delta,
                "loss": 1.0 - acc,
                "throughput": 100.0,
                "sparsity": sparsity,
            }
            archive = (
                pd.DataFrame({"accuracy": [0.5, 0.6, 0.4], "sparsity": [0.5, 0.3, 0.6]})
                if i == 0
                else None
            )
            _run(
                tmp_path,
                f"{i}_p={pruner},s={sparsity},seed={seed}",
                pruner,
                sparsity,
                seed,
                "finished",
                metrics,
                archive,
            )
            i += 1
    _run(tmp_path, f"{i}_failed", "wanda", 0.9, 0, "failed")
    _run(tmp_path, f"{i + 1}_unfinished", "wanda", 0.9, 1, None)
    return tmp_path


def test_tables_rows_and_values(sweep):
    written = analyze(sweep)
    summary = pd.read_csv(written["summary"])
    assert len(summary) == 10
    assert sorted(summary["status"].unique()) == ["failed", "finished", "unfinished"]
    grouped = pd.read_csv(written["grouped_summary"])
    assert len(grouped) == 4 and (grouped["n_runs"] == 2).all()
    for _, row in grouped.iterrows():
        pruner = row["method"].removeprefix("pruner=")  # the one setting that varies
        assert row["accuracy_mean"] == pytest.approx(ACC[(pruner, row["sparsity"])])
        assert row["accuracy_std"] == pytest.approx(0.1 * np.sqrt(2))
    svp = pd.read_csv(written["sparsity_vs_performance"])
    assert {"accuracy_mean", "loss_mean", "throughput_mean", "sparsity_mean"} <= set(svp.columns)
    failed = pd.read_csv(written["failed_runs"])
    assert sorted(failed["status"]) == ["failed", "unfinished"]
    assert "boom" in failed.loc[failed["status"] == "failed", "error"].item()


def test_plots_are_written(sweep):
    written = analyze(sweep, sweep / "out")
    for name in (
        "accuracy_vs_sparsity",
        "loss_vs_sparsity",
        "throughput_vs_sparsity",
        "heatmap_accuracy",
        "archive_pareto",
    ):
        assert written[name].exists() and written[name].read_bytes()[:4] == b"\x89PNG"


def test_a_masks_sweep_gets_its_perplexity_table_and_plot(tmp_path):
    """experiment=sweep_masks (`make sweep`'s default) writes perplexity, not accuracy: its
    performance table and plot are of perplexity (it used to get neither)."""
    for i, (pruner, sparsity, ppl) in enumerate([("magnitude", 0.5, 3.0), ("wanda", 0.5, 2.0)]):
        metrics = {"perplexity": ppl, "sparsity": sparsity - 0.01, "target_sparsity": sparsity}
        _run(tmp_path, f"{i}_{pruner}", pruner, sparsity, 0, "finished", metrics)
    written = analyze(tmp_path)
    svp = pd.read_csv(written["sparsity_vs_performance"]).set_index("method")
    assert svp.loc["pruner=wanda", "perplexity_mean"] == pytest.approx(2.0)
    assert svp.loc["pruner=wanda", "sparsity_mean"] == pytest.approx(0.49)  # measured
    assert written["perplexity_vs_sparsity"].read_bytes()[:4] == b"\x89PNG"


def test_pareto_front_maximises_both():
    pts = np.array([[0.5, 0.5], [0.3, 0.6], [0.6, 0.4], [0.2, 0.2], [0.5, 0.45]])
    assert pareto_front(pts).tolist() == [1, 0, 2]


def test_cli_lists_failed_runs(sweep):
    proc = subprocess.run(
        [sys.executable, "-m", "sparse_merge.analysis", str(sweep)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "10 runs: 8 finished, 2 failed or unfinished" in proc.stdout
    assert "boom" in proc.stdout


def test_heatmap_table_has_one_row_per_method(sweep):
    analyze(sweep)
    table = pd.read_csv(sweep / "analysis" / "accuracy_by_method.csv", index_col="method")
    assert list(table.index) == ["pruner=magnitude", "pruner=wanda"]
    assert table.loc["pruner=wanda", "0.5"] == pytest.approx(0.6)
