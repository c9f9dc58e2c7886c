"""The default job end to end on tiny settings, through the same run(cfg) the CLI calls."""

import json

import pytest
from transformers import AutoModelForCausalLM

from sparse_merge.app import execute
from sparse_merge.pruning.sparsity import measure_sparsity

from .conftest import compose_cfg


@pytest.fixture(scope="module")
def merge_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge")
    cfg = compose_cfg(
        ["experiment=smoke", "evolver=one_shot", "pruner=magnitude", "sparsity=0.5"], tmp
    )
    metric = execute(cfg)
    return tmp / "run", metric


def test_default_job_writes_results_with_exact_sparsity(merge_run):
    run_dir, metric = merge_run
    results = json.loads((run_dir / "results.json").read_text())
    rows = {r["model"]: r for r in results["models"]}
    assert set(rows) == {"base", "math", "code", "base@0.5", "math@0.5", "code@0.5", "merged"}
    for name in ("base@0.5", "math@0.5", "code@0.5"):  # the unmerged models, pruned alike
        assert rows[name]["sparsity"] == 0.5  # exactly half of every layer (even sizes)
    assert rows["merged"]["sparsity"] == 0.5
    assert all(rows[n]["sparsity"] < 0.01 for n in ("base", "math", "code"))
    assert metric == rows["merged"]["mean"]
    for r in rows.values():  # shares of 16 held-out prompts each; the mean weighs them alike
        for task in ("addition", "reversal"):
            assert r[task] * 16 == round(r[task] * 16), (r["model"], task, r[task])
        assert r["mean"] == pytest.approx((r["addition"] + r["reversal"]) / 2)


def test_merged_model_saved_loadable_and_sparse(merge_run):
    run_dir, _ = merge_run
    model = AutoModelForCausalLM.from_pretrained(run_dir / "models" / "merged")
    assert measure_sparsity(model).overall == 0.5


def test_logs_written(merge_run):
    run_dir, _ = merge_run
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    lines = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert any(x.get("event") == "merged" for x in lines)
    assert (run_dir / "summary.json").exists()


def test_parents_are_cached(tmp_path_factory, merge_run):
    run_dir, _ = merge_run
    cache = run_dir.parent.parent / "model_cache"
    before = {p: p.stat().st_mtime for p in cache.rglob("model.safetensors")}
    assert len(before) >= 3  # base + two children (other tests may cache other zoos here)
    cfg = compose_cfg(
        ["experiment=smoke", "evolver=one_shot", "save_models=false"],
        tmp_path_factory.mktemp("again"),
    )
    execute(cfg)
    assert {p: p.stat().st_mtime for p in cache.rglob("model.safetensors")} == before


def test_wandb_offline_run_named_by_overrides(tmp_path, monkeypatch):
    """logger=wandb never needs a key: it runs offline and names the run from the overrides."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_cfg(
        [
            "experiment=smoke",
            "evolver=one_shot",
            "logger=wandb",
            "save_models=false",
            "sparsity=0.3",
        ],
        tmp_path,
    )
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    with read_write(cfg.hydra), open_dict(cfg.hydra):  # what Hydra sets for a launched job
        cfg.hydra.job.override_dirname = "experiment=smoke,logger=wandb,sparsity=0.3"
    HydraConfig.instance().set_config(cfg)
    execute(cfg)
    run_dir = tmp_path / "run"
    assert list((run_dir / "wandb").glob("offline-run-*")), "an offline W&B run was written"
    assert cfg.logger.wandb.name == "experiment=smoke,logger=wandb,sparsity=0.3"
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"


def test_only_the_main_process_opens_a_wandb_run(tmp_path, monkeypatch):
    """logger=wandb under a launch: one W&B run, the main process's (every rank opened one;
    the others held no metrics but showed up as runs of the sweep's group)."""
    import sparse_merge.app as app

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(app, "_pipeline", lambda name: lambda cfg, parts, run_dir: 0.25)
    execute(compose_cfg(["experiment=smoke", "logger=wandb", "save_models=false"], tmp_path))
    assert not (tmp_path / "run" / "wandb").exists()


@pytest.mark.parametrize(("rank", "written"), [("0", True), ("1", False)])
def test_only_the_main_process_writes_the_run_status(rank, written, tmp_path, monkeypatch):
    import sparse_merge.app as app

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(app, "_pipeline", lambda name: lambda cfg, parts, run_dir: 0.25)
    execute(compose_cfg(["experiment=smoke"], tmp_path))
    status = tmp_path / "run" / "status.json"
    assert status.exists() is written
    if written:
        assert json.loads(status.read_text()) | {"finished": 0} == {
            "status": "finished",
            "metric": 0.25,
            "finished": 0,
        }


def test_natural_niches_merge_with_wanda_end_to_end(tmp_path):
    overrides = [
        "experiment=smoke",
        "pruner=wanda",
        "sparsity=0.5",
        "evolver.iterations=4",
        "evolver.pop_size=4",
        "calibration.n=8",
        "save_models=false",
    ]
    metric = execute(compose_cfg(overrides, tmp_path))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    rows = {r["model"]: r for r in results["models"]}
    for name in ("base@0.5", "math@0.5", "code@0.5", "best", "sparse"):
        assert rows[name]["sparsity"] == 0.5, name  # Wanda: exactly half of every row
    assert metric == rows["best"]["mean"]
    steps = [
        json.loads(x)
        for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
        if '"event": "step"' in x
    ]
    assert len(steps) == 4 and all(s["prune_sparsity"] <= 0.5 for s in steps)


def test_a_job_leaves_torchs_thread_count_as_it_found_it(tmp_path):
    """In a sweep run in one process, a job with hardware.num_threads=0 (torch's default) ran
    with the previous job's count."""
    import torch

    before = torch.get_num_threads()
    cfg = compose_cfg(["experiment=smoke", "hardware.num_threads=3", "save_models=false"], tmp_path)
    execute(cfg)
    assert torch.get_num_threads() == before != 3


def test_a_launch_of_two_processes_refuses_a_pipeline_that_runs_in_one(tmp_path, monkeypatch):
    """Under `torchrun --nproc_per_node=2` (or `accelerate launch`) a pipeline that does not
    split its work (masks, evaluate, digits) is refused before anything loads, naming the
    pipeline: every process ran all of it and wrote its masks, results and log records beside
    the other's. Merge, fine-tuning and throughput split their work and start."""
    import sparse_merge.app as app
    from sparse_merge.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(app, "_pipeline", lambda name: lambda cfg, parts, run_dir: 0.5)
    for experiment in ("masks", "m2n2_digits_quick"):
        with pytest.raises(ConfigError) as err:
            execute(compose_cfg([f"experiment={experiment}"], tmp_path / experiment))
        message = str(err.value)
        assert err.value.key == "pipeline" and "\n" not in message
        assert "2 processes" in message and "merge" in message and "finetune" in message
        assert not (tmp_path / experiment / "run").exists()  # nothing written
    for experiment in ("smoke", "finetune_smoke"):
        assert execute(compose_cfg([f"experiment={experiment}"], tmp_path / experiment)) == 0.5


def test_one_shot_weights_per_parent_are_checked_before_any_model_loads(tmp_path, monkeypatch):
    """``evolver.weights`` of the wrong length used to be refused inside evolve(), after the
    base and every parent were loaded."""
    from sparse_merge.errors import ConfigError

    def loaded(*args, **kwargs):
        raise AssertionError("a model loaded before the weights were refused")

    monkeypatch.setattr("sparse_merge.pipelines.merge.load_causal_lm", loaded)
    cfg = compose_cfg(["experiment=smoke", "evolver=one_shot", "evolver.weights=[0.5]"], tmp_path)
    with pytest.raises(ConfigError) as err:
        execute(cfg)
    assert err.value.key == "evolver.weights" and "one weight per parent (2" in str(err.value)
