"""The throughput pipeline on a tiny model: what a run measures, and the sweep analysis of a
tiny multirun (the same Hydra launch as ``make sweep EXP=sweep_throughput``, in-process)."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import open_dict

from sparse_merge.analysis.__main__ import analyze
from sparse_merge.app import execute
from sparse_merge.errors import ConfigError
from sparse_merge.finetune.throughput import PeakRss, StepClock

from ..conftest import compose_cfg, launch_run_py, make_dry_run

ROOT = Path(__file__).resolve().parents[2]
TINY = [  # the toy base shrunk to a 2-layer width-32 model trained for 30 steps
    "task=toy_smoke_finetune",
    "model.name=toy-llama-throughput",
    "model.arch.hidden_size=32",
    "model.arch.intermediate_size=64",
    "model.base_steps=30",
    "model.child_steps=10",
    "model.batch_size=16",
    "hardware.num_threads=1",
    "throughput.warmup_steps=1",
    "throughput.steps=2",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Results of two runs, batch sizes 1 and 2 (sparse-to-sparse, 50 %)."""
    out = {}
    for bs in (1, 2):
        tmp = tmp_path_factory.mktemp(f"bs{bs}")
        overrides = ["experiment=sweep_throughput", f"finetune.batch_size={bs}", *TINY]
        cfg = compose_cfg([*overrides, "lora.mode=sparse_to_sparse", "sparsity=0.5"], tmp)
        metric = execute(cfg)
        out[bs] = (tmp / "run", metric)
    return out


@pytest.mark.parametrize("bs", [1, 2])
def test_run_reports_throughput_of_the_timed_steps(runs, bs):
    run_dir, metric = runs[bs]
    r = json.loads((run_dir / "results.json").read_text())
    assert r["pipeline"] == "throughput" and r["mode"] == "sparse_to_sparse"
    assert r["batch_size"] == bs and r["timed_steps"] == 2 and r["warmup_steps"] == 1
    assert r["samples"] == 2 * bs  # two timed steps of one micro-batch each
    assert r["tokens_per_sample"] == r["tokens"] / r["samples"] and r["tokens"] >= r["samples"]
    assert r["tokens_per_s"] == r["samples_per_s"] * r["tokens_per_sample"]  # as computed
    assert r["samples_per_s"] == pytest.approx(r["samples"] / r["seconds"], rel=1e-12)
    assert r["step_time_s"] == pytest.approx(r["seconds"] / 2, rel=1e-12)
    assert r["step_time_min_s"] <= r["step_time_median_s"] <= r["seconds"]
    median_rate = r["samples"] / (r["step_time_median_s"] * 2)
    assert r["samples_per_s_median"] == pytest.approx(median_rate, rel=1e-12)
    for key in ("samples_per_s", "tokens_per_s", "step_time_s", "step_time_min_s"):
        assert r[key] > 0, key
    assert r["memory_measure"] == "cpu_peak_rss_delta" and r["peak_memory_mb"] >= 0
    assert r["sparsity"] == pytest.approx(0.5, abs=0.005) and r["target_sparsity"] == 0.5
    assert metric == r["samples_per_s"] == r["throughput"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["throughput"] == r["throughput"]
    logged = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged if "train/loss" in x] == [1, 2, 3]  # warm-up + timed
    assert not (run_dir / "models").exists() and not (run_dir / "checkpoints").exists()


def test_bad_step_count_fails_before_any_model_loads(tmp_path):
    cfg = compose_cfg(["experiment=sweep_throughput", *TINY, "throughput.steps=0"], tmp_path)
    cache = tmp_path / "never"
    with open_dict(cfg):
        cfg.model.cache_dir = str(cache)
    with pytest.raises(ConfigError, match="throughput.steps=0"):
        execute(cfg)
    assert not cache.exists()


def test_clock_times_steps_and_calls_its_hook():
    seen = []
    clock = StepClock(on_step=seen.append)
    for step in (1, 2, 3):
        clock.log({"train/loss": 1.0}, step=step)
    assert seen == [1, 2, 3] and len(clock.step_seconds()) == 2
    assert all(s >= 0 for s in clock.step_seconds())


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux counters")
def test_peak_rss_counts_only_the_block():
    big = torch.ones(32 * 2**20 // 4)  # 32 MiB, resident, freed before the block
    del big
    with PeakRss() as outside:
        pass
    with PeakRss() as inside:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB written, so resident
        del x
    assert inside.delta_mb >= 60 and outside.delta_mb < 16


def test_multirun_analysis_writes_csv_and_one_plot_per_mode(tmp_path):
    sweep = tmp_path / "sweep"
    launch_run_py(
        [
            "-m",
            "experiment=sweep_throughput",
            *TINY,
            "lora.mode=dense,sparse_to_sparse",
            "sparsity=0.0,0.5",
            "finetune.batch_size=1,2",
            f"model.cache_dir={tmp_path.parent / 'model_cache'}",  # as compose_cfg
            f"hydra.sweep.dir={sweep}",
            "hydra/job_logging=none",
            "hydra/hydra_logging=none",
        ]
    )
    written = analyze(sweep)
    table = pd.read_csv(written["throughput"])
    assert len(table) == 8 and set(table["mode"]) == {"dense", "sparse_to_sparse"}
    assert sorted(set(table["batch_size"])) == [1, 2] and (table["runs"] == 1).all()
    assert (table["samples_per_s"] > 0).all() and (table["step_time_s"] > 0).all()
    assert table["tokens_per_s"].to_numpy() == pytest.approx(
        (table["samples_per_s"] * table["tokens_per_sample"]).to_numpy(), rel=1e-12
    )
    for mode in ("dense", "sparse_to_sparse"):
        png = written[f"throughput_{mode}"]
        assert png == sweep / "analysis" / f"throughput_{mode}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
    text = written["throughput_md"].read_text()
    assert "| sparse_to_sparse | 50% |" in text and "bs 2" in text


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_sweep_runs_the_sweep_then_its_analysis_in_one_folder(tmp_path):
    """`make sweep EXP=sweep_throughput` launches the multirun into SWEEP_DIR and then writes
    that folder's tables and plots (the analysis the test above checks)."""
    sweep = tmp_path / "sweep"
    launch, analysis = make_dry_run(
        "sweep", "EXP=sweep_throughput", f"SWEEP_DIR={sweep}", "ARGS=seed=1"
    )
    assert " run.py -m experiment=sweep_throughput " in launch
    assert f"hydra.sweep.dir={sweep}" in launch.split() and "seed=1" in launch.split()
    assert analysis.split()[-3:] == ["-m", "sparse_merge.analysis", str(sweep)]
