"""The masks and fine-tuning tables read every finished run's results.json, and only those."""

import json

import yaml

from sparse_merge.analysis import finetune_table, masks_table


def _run(root, name, results, status="finished", lora=None, overrides=()):
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": 0}))
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    if lora:
        choices = {"hydra": {"runtime": {"choices": {"lora": lora}}}}
        (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(choices))
    (d / "status.json").write_text(json.dumps({"status": status}))
    (d / "results.json").write_text(json.dumps(results))


def _masks(method, granularity, target, ppl, sparsity):
    return {
        "method": method,
        "granularity": granularity,
        "target_sparsity": target,
        "sparsity": sparsity,
        "perplexity": ppl,
        "dense_perplexity": 11.5,
        "dense_sparsity": 0.0003,
        "prune_seconds": 3.0,
        "wall_seconds": 60.0,
        "n_calibration": 32,
        "calibration_length": 256,
    }


def test_masks_table_puts_patterns_in_rows_and_methods_in_columns(tmp_path):
    _run(tmp_path, "a", _masks("wanda", "row", 0.5, 19.5, 0.5))
    _run(tmp_path, "b", _masks("magnitude", "row", 0.5, 169.25, 0.5))
    _run(tmp_path, "c", _masks("wanda", "2:4", 0.5, 40.0, 0.5))
    _run(tmp_path, "d", _masks("wanda", "row", 0.7, 1.0, 0.7), status="failed")  # left out
    text = masks_table.markdown(masks_table.gather(tmp_path))
    assert "| pattern | magnitude | wanda |" in text
    assert "| dense | 11.50 (sparsity 0.0003) |" in text
    assert "| 50 % row | 169.2 (0.500) | 19.5 (0.500) |" in text
    assert "| 2:4 | – | 40.0 (0.500) |" in text and "70 % row" not in text
    assert "3 runs, calibration 32 x 256 tokens" in text


def test_masks_table_keeps_every_run_of_a_cell(tmp_path):
    """Two seeds of one pattern and method: mean ± sd of both (the second overwrote the first
    in the Markdown while the footer counted both)."""
    _run(tmp_path, "a", _masks("random", "layer", 0.5, 14.59, 0.5))
    _run(tmp_path, "b", _masks("random", "layer", 0.5, 5.42, 0.5))
    text = masks_table.markdown(masks_table.gather(tmp_path))
    assert "| 50 % layer | 10.0 ± 6.5 (0.500, 2 runs) |" in text and "2 runs, calib" in text


def test_finetune_table_reports_perplexity_before_and_after(tmp_path):
    results = {
        "method": "sparse_to_dense",
        "trainable_params": 2442240,
        "accuracy_before": 0.05,
        "accuracy": 0.07,
        "python_docs/perplexity_before": 19.5,
        "python_docs/perplexity": 15.25,
        "sparsity": 0.5,
        "masked_nonzeros": 0,
        "steps": 60,
        "train_seconds": 500.0,
        "wall_seconds": 600.0,
    }
    _run(tmp_path, "a", results, lora="masked")
    _run(tmp_path, "b", {"perplexity": 3.0})  # a masks run: not in this table
    text = finetune_table.markdown(finetune_table.gather(tmp_path))
    assert (
        "| masked (sparse_to_dense) | 2,442,240 | 19.50 -> 15.25 | 0.0500 -> 0.0700 | 0.5000 | 0 "
        "| 60 | 10.0 |" in text
    )


def test_throughput_runs_of_other_settings_are_other_points(tmp_path):
    """Runs at one point (model, mode, sparsity, batch size) but with another setting
    (lora.r) were averaged as repeats; repeats (seeds) still are."""
    from sparse_merge.analysis import throughput_table

    def result(samples):
        values = dict.fromkeys(throughput_table.VALUES, 1.0) | {"samples_per_s": samples}
        point = {"model": "toy", "mode": "sparse_to_sparse", "target_sparsity": 0.5}
        extra = {"memory_measure": "cpu_peak_rss_delta", "device": "cpu", "threads": 1}
        steps = {"timed_steps": 3, "warmup_steps": 1, "sparsity": 0.5, "batch_size": 4}
        return {"pipeline": "throughput", **point, **values, **extra, **steps}

    _run(tmp_path, "a", result(400.0), overrides=["lora.r=2", "seed=0"])
    _run(tmp_path, "b", result(300.0), overrides=["lora.r=2", "seed=1"])
    _run(tmp_path, "c", result(260.0), overrides=["lora.r=32", "seed=0"])
    rows = {r["model"]: r for r in throughput_table.gather(tmp_path)}
    assert rows["toy [lora.r=2]"]["samples_per_s"] == 350.0 and rows["toy [lora.r=2]"]["runs"] == 2
    assert rows["toy [lora.r=32]"]["samples_per_s"] == 260.0
