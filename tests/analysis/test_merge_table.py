"""The merge comparison table: rows of every run's results.json as mean ± sd over seeds."""

import csv
import json
import math

import pytest
import yaml

from sparse_merge.analysis.merge_table import confidence_interval, report, t_quantile


def _run(root, seed, search, rows, status="finished"):
    d = root / f"{seed}_{search}"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "pipeline": "merge"}))
    overrides = [f"search={search}", f"seed={seed}", "baselines=classic"]
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (d / "status.json").write_text(json.dumps({"status": status}))
    models = [
        {"model": m, "a": a, "mean": a, "sparsity": sp, "selection": None, "evals": ev}
        for m, a, sp, ev in rows
    ]
    results = {
        "models": models,
        "evaluations": 70,
        "target_sparsity": 0.5,
        "headline": "best",
        "picked": ["best"],
    }
    (d / "results.json").write_text(json.dumps(results))


def test_one_table_per_setting_with_mean_and_sd_over_seeds(tmp_path):
    for seed, best in ((0, 0.6), (1, 0.8)):
        rows = [("code", 0.9, 0.0, 0), ("code@0.5", 0.65, 0.5, 0), ("best", best, 0.5, 70)]
        _run(tmp_path, seed, "weights", rows)
    _run(tmp_path, 0, "task_vectors", [("code", 0.9, 0.0, 0), ("best", 0.1, 0.5, 66)])
    _run(tmp_path, 2, "weights", [("best", 0.0, 0.5, 70)], status="failed")  # left out
    sections = {part.split("**")[0]: part for part in report(tmp_path).split("**search=")[1:]}
    weights, vectors = sections["weights"], sections["task_vectors"]
    assert "2 seed(s)" in weights and "1 seed(s)" in vectors
    assert "| best | 0.700 ± 0.141 | **0.700 ± 0.141** | 0.500 ± 0.000 | 70 | 2 |" in weights
    # the dense parent is not bold: the best at the target sparsity is
    assert "| code | 0.900 ± 0.000 | 0.900 ± 0.000 | 0.000 ± 0.000 | – | 2 |" in weights
    for name in ("merge_table.md", "merge_table.csv", "merge_table.png"):
        assert (tmp_path / name).exists()


def test_a_dense_row_with_the_best_mean_is_not_bold_and_a_larger_baseline_budget_is_said(
    tmp_path,
):
    """Bold marks the best mean among the rows at the target sparsity only (a dense parent
    with the same mean stayed bold); and the heading says when a baseline searched more than
    the evolution (it said "every baseline at most as many" whatever the counts)."""
    rows = [("code", 0.7, 0.0, 0), ("ties", 0.6, 0.5, 100), ("best", 0.7, 0.5, 70)]
    _run(tmp_path, 0, "weights", rows)
    text = report(tmp_path)
    assert "| code | 0.700 | 0.700 | 0.000 |" in text  # not bold
    assert "| best | 0.700 | **0.700** | 0.500 |" in text
    assert "the baselines up to 100, more than the evolution" in text
    assert "every baseline at most as many" not in text


def test_t_quantile_matches_the_t_distribution():
    # closed forms: df=1 (Cauchy) tan(pi (q - 1/2)); df=2 (2q - 1) sqrt(2 / (4 q (1 - q)))
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-10)
    assert t_quantile(0.975, 2) == pytest.approx(4.302652729749464, rel=1e-10)
    assert t_quantile(0.975, 4) == pytest.approx(2.776445105, rel=1e-9)  # printed t tables
    stats = pytest.importorskip("scipy.stats")
    for df in [*range(1, 31), 60, 120, 1000]:
        for q in (0.6, 0.9, 0.975, 0.995):
            assert t_quantile(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-9, abs=1e-10)
    with pytest.raises(ValueError, match="df=0"):
        t_quantile(0.975, 0)


def test_confidence_interval_on_known_numbers():
    # mean 0.7, sd 0.1, n 3: half-width t_{0.975,2} * 0.1 / sqrt(3) = 0.248414...
    lo, hi = confidence_interval([0.6, 0.7, 0.8])
    half = 4.302652729749464 * 0.1 / math.sqrt(3)
    assert (lo, hi) == pytest.approx((0.7 - half, 0.7 + half), abs=1e-12)
    assert confidence_interval([0.5, 0.5]) == pytest.approx((0.5, 0.5))
    assert confidence_interval([0.5]) is None  # no interval from one seed


def test_ci_columns_follow_every_value_column(tmp_path):
    for seed, best in ((0, 0.6), (1, 0.7), (2, 0.8)):
        _run(tmp_path, seed, "weights", [("code", 0.9, 0.0, 0), ("best", best, 0.5, 70)])
    _run(tmp_path, 0, "task_vectors", [("best", 0.1, 0.5, 66)])  # one seed: no interval
    text = report(tmp_path, ci=True)
    header = "| model | a | a 95% CI | mean | mean 95% CI | sparsity | sparsity 95% CI |"
    assert header + " selection evals | seeds |" in text
    assert "95% CI of the mean, Student t, n-1 dof" in text
    assert (
        "| best | 0.700 ± 0.100 | [0.452, 0.948] | **0.700 ± 0.100** | [0.452, 0.948] "
        "| 0.500 ± 0.000 | [0.500, 0.500] | 70 | 3 |" in text
    )
    assert "| best | 0.100 | – | **0.100** | – | 0.500 | – | 66 | 1 |" in text
    with open(tmp_path / "merge_table.csv") as f:
        rows = {(r["setting"], r["model"]): r for r in csv.DictReader(f)}
    assert rows["search=weights", "code"]["mean 95% CI"] == "[0.900, 0.900]"
    assert rows["search=weights", "best"]["a 95% CI"] == "[0.452, 0.948]"
    assert rows["search=task_vectors", "best"]["sparsity 95% CI"] == "–"
    assert "95% CI" not in report(tmp_path)  # off unless asked for
