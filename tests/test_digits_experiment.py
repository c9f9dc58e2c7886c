import json

import pytest
import torch
from omegaconf import open_dict

from sparse_merge.app import execute
from sparse_merge.evolution.curve import Curve
from sparse_merge.evolution.digits import DigitsProblem
from sparse_merge.models.digits import DigitsParents
from sparse_merge.tasks.digits import DigitsTask
from tests.conftest import compose_cfg

natural_niches = pytest.importorskip("sparse_merge.evolution.natural_niches")


def test_curve_logger_follows_the_archive_best():
    from sparse_merge.evolution.budgeted import NaturalNichesMethod

    problem = DigitsProblem(DigitsParents("scratch"), DigitsTask(raw_pixels=True), seed=0)
    evolver = natural_niches.NaturalNiches(
        pop_size=5, mutation_std=0.01, prune_target="none", checkpoint_every=0
    )
    curves = {}
    for every in (True, False):
        curves[every] = Curve(problem)
        best = NaturalNichesMethod(evolver, test_every_step=every).run(
            problem, 30, seed=0, curve=curves[every]
        )["best"]
    curve = curves[True]
    assert curve.evals == list(range(31))  # 0: the best initial genome
    assert curve.train[-1] == pytest.approx(float(problem.evaluate(best).mean()))
    assert curve.test[-1] == pytest.approx(problem.test_accuracy(best))
    assert curves[False].test == curve.test  # evaluating entering children only: same curve
    assert evolver.iterations == 60  # the budget went to a copy


def quick_cfg(tmp_path):
    cfg = compose_cfg(["experiment=m2n2_digits_quick"], tmp_path)
    with open_dict(cfg):
        cfg.evolver.workers = 1
        cfg.evolver.panels.scratch.budget = 20
        cfg.evolver.panels.pretrained.budget = 20
        cfg.evolver.points = 5
    return cfg


def test_quick_experiment_writes_figure_table_and_reuses_runs(tmp_path):
    cfg = quick_cfg(tmp_path)
    metric = execute(cfg)
    run = tmp_path / "run"
    table = (run / "m2n2_digits.md").read_text()
    methods = {
        "scratch": ["natural_niches", "cma_es", "no_crossover", "ga", "map_elites"],
        "pretrained": [
            "natural_niches",
            "no_matchmaker",
            "no_split_point",
            "ga",
            "map_elites",
            "brute_force",
        ],
    }
    for panel, names in methods.items():
        for name in names:
            assert f"| {name} |" in table
            for seed in (0, 1):
                r = json.loads((run / "runs" / f"{panel}__{name}__seed{seed}.json").read_text())
                assert r["evals"] == 20 and r["grid"] == [0, 4, 8, 12, 16, 20]
                assert len(r["test"]) == 6 and r["test"][-1] == r["final_test"]
    assert (run / "m2n2_digits.png").read_bytes()[:4] == b"\x89PNG"
    nn = [
        json.loads((run / "runs" / f"scratch__natural_niches__seed{s}.json").read_text())
        for s in (0, 1)
    ]
    assert metric == pytest.approx(sum(r["final_test"] for r in nn) / 2)
    assert "87.0" in table  # the paper's number sits next to ours

    before = {p.name: p.stat().st_mtime_ns for p in (run / "runs").iterdir()}
    assert execute(quick_cfg(tmp_path)) == metric  # every job reused, nothing rerun
    assert {p.name: p.stat().st_mtime_ns for p in (run / "runs").iterdir()} == before

    changed = quick_cfg(tmp_path)  # a changed method runs again; the others are kept
    with open_dict(changed):
        changed.evolver.panels.scratch.methods.map_elites.replace_below = 0.0
    execute(changed)
    after = {p.name: p.stat().st_mtime_ns for p in (run / "runs").iterdir()}
    rerun = {name for name in after if after[name] != before[name]}
    assert rerun == {"scratch__map_elites__seed0.json", "scratch__map_elites__seed1.json"}


def test_same_seed_same_parents_across_methods(tmp_path):
    cfg = quick_cfg(tmp_path)
    execute(cfg)
    runs = tmp_path / "run" / "runs"
    starts = {
        json.loads(p.read_text())["initial_train"]["random_0"]
        for p in runs.glob("scratch__*__seed0.json")
    }
    assert len(starts) == 1


def test_a_changed_task_setting_reruns_the_jobs(tmp_path):
    """The job files record the task's settings: a resumed run with task.raw_pixels changed
    used to reuse the results made with the other pixels (same method, parents and budget)."""
    overrides = ["pipeline=digits", "model=digits_mlp", "task=digits", "evolver=map_elites"]
    execute(compose_cfg([*overrides, "budget=20"], tmp_path))
    path = tmp_path / "run" / "runs" / "scratch__mapelites__seed0.json"
    raw = json.loads(path.read_text())
    assert raw["settings"]["task"] == {"class": "DigitsTask", "raw_pixels": True}
    cfg = compose_cfg([*overrides, "budget=20", "task.raw_pixels=false", "resume=true"], tmp_path)
    execute(cfg)
    scaled = json.loads(path.read_text())
    assert scaled["settings"]["task"] == {"class": "DigitsTask", "raw_pixels": False}
    assert scaled["initial_train"] != raw["initial_train"]  # run again, on the scaled pixels


def test_committed_results_without_a_task_record_are_still_reused(tmp_path):
    """Files written before the task was recorded count as made with raw pixels."""
    overrides = ["pipeline=digits", "model=digits_mlp", "task=digits", "evolver=map_elites"]
    execute(compose_cfg([*overrides, "budget=20"], tmp_path))
    path = tmp_path / "run" / "runs" / "scratch__mapelites__seed0.json"
    record = json.loads(path.read_text())
    del record["settings"]["task"]
    record["final_test"] = -1.0  # a marker: reused, not run again
    path.write_text(json.dumps(record))
    execute(compose_cfg([*overrides, "budget=20", "resume=true"], tmp_path))
    assert json.loads(path.read_text())["final_test"] == -1.0


def test_single_method_run(tmp_path):
    cfg = compose_cfg(
        [
            "pipeline=digits",
            "model=digits_mlp",
            "task=digits",
            "evolver=map_elites",
            "budget=30",
            "seed=2",
        ],
        tmp_path,
    )
    metric = execute(cfg)
    r = json.loads((tmp_path / "run" / "runs" / "scratch__mapelites__seed2.json").read_text())
    assert r["evals"] == 30 and r["budget"] == 30
    torch.testing.assert_close(torch.tensor(r["test"][-1]), torch.tensor(r["final_test"]))
    # the sweep analysis reads the standard metric names from summary.json
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["accuracy"] == metric == r["final_test"]


def test_single_engine_run_uses_the_scorer_group(tmp_path):
    overrides = ["pipeline=digits", "model=digits_mlp", "task=digits", "evolver=ga", "budget=25"]
    cfg = compose_cfg([*overrides, "evolver.pop_size=6", "evolver.mutation_std=0.01"], tmp_path)
    assert cfg.scorer.alpha == 0.0
    execute(cfg)
    r = json.loads((tmp_path / "run" / "runs" / "scratch__naturalniches__seed0.json").read_text())
    assert r["evals"] == 25 and 0.0 < r["final_test"] < 1.0


def test_a_merge_only_evolver_is_refused_in_one_line(tmp_path):
    """evolver=one_shot has evolve() but is no Natural Niches engine: it used to be wrapped as
    one and crash with AttributeError (no pop_size) once the job ran."""
    from sparse_merge.errors import ConfigError

    overrides = ["pipeline=digits", "model=digits_mlp", "task=digits", "evolver=one_shot"]
    with pytest.raises(ConfigError) as err:
        execute(compose_cfg([*overrides, "budget=20"], tmp_path))
    assert err.value.key == "evolver" and "cma_es" in str(err.value)
    assert not (tmp_path / "run" / "runs").exists()  # refused before any job ran
