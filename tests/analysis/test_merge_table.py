"""The merge comparison table: rows of every run's results.json as mean ± sd over seeds."""

import json

import yaml

from sparse_merge.analysis.merge_table import report


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
