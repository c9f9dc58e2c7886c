"""The merge pipeline with the Natural Niches evolver, end to end on the smoke model."""

import csv
import json
import shutil

import pytest
from hydra.utils import instantiate
from transformers import AutoModelForCausalLM

from sparse_merge.app import execute
from sparse_merge.errors import ConfigError
from sparse_merge.evolution.natural_niches import NaturalNiches
from sparse_merge.evolution.problem import Evolver
from sparse_merge.evolution.scoring import SparsityAwareScorer
from sparse_merge.pruning.sparsity import measure_sparsity

from ..conftest import compose_cfg

SMALL = [
    "experiment=smoke",
    "evolver=natural_niches",
    "evolver.pop_size=4",
    "evolver.iterations=4",
    "evolver.checkpoint_every=2",
    "evolver.schedule.period=2",
    "scorer.beta=1.0",
    "sparsity=0.4",
]


@pytest.fixture(scope="module")
def nn_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nn")
    metric = execute(compose_cfg(SMALL, tmp))
    return tmp, metric


def test_outputs_report_archive_and_models(nn_run):
    tmp, metric = nn_run
    run_dir = tmp / "run"
    results = json.loads((run_dir / "results.json").read_text())
    rows = {r["model"]: r for r in results["models"]}
    assert set(rows) == {
        *("base", "math", "code"),
        *("base@0.4", "math@0.4", "code@0.4"),
        *("best", "sparse"),
    }
    assert metric == rows["best"]["mean"] == results["accuracy"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["accuracy"] == metric and summary["sparsity"] == rows["best"]["sparsity"]
    with open(run_dir / "archive.csv") as f:
        archive = list(csv.DictReader(f))
    assert len(archive) == 4 and {"accuracy", "sparsity", "selection_mean"} <= set(archive[0])
    # every evaluation is counted: 2 parents, 4 children, one per member pruned at the end
    below = sum(float(r["sparsity"]) < 0.4 for r in archive)
    assert results["evaluations"] == 2 + 4 + below == rows["best"]["evals"]
    for name in ("best", "sparse"):
        model = AutoModelForCausalLM.from_pretrained(run_dir / "models" / name)
        assert measure_sparsity(model).overall == pytest.approx(rows[name]["sparsity"])
        assert rows[name]["sparsity"] >= 0.4 - 1e-9  # the target is reached, and measured
    assert rows["sparse"]["sparsity"] >= rows["best"]["sparsity"]


def test_steps_logged(nn_run):
    tmp, _ = nn_run
    lines = [json.loads(x) for x in (tmp / "run" / "log.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x.get("event") == "step"]
    assert [s["step"] for s in steps] == [0, 1, 2, 3]
    assert [s["prune_sparsity"] for s in steps] == [0.0, 0.4, 0.0, 0.4]  # cyclic, period 2
    assert all(len(s["child_scores"]) == 32 for s in steps)  # 16 + 16 selection datapoints


def test_resume_extends_a_finished_run(nn_run):
    tmp, _ = nn_run
    cfg = compose_cfg([*SMALL, "evolver.iterations=6", "resume=true", "save_models=false"], tmp)
    execute(cfg)
    lines = [json.loads(x) for x in (tmp / "run" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x.get("event") == "step"] == [0, 1, 2, 3, 4, 5]
    assert sum(x.get("event") == "initial" for x in lines) == 2  # parents scored once


@pytest.mark.parametrize(
    "override,named",
    [
        ("task.tasks.addition.selection_seed=1", "task.tasks.addition.selection_seed=0 (now 1)"),
        ("search.include_base=true", "search.include_base=False (now True)"),
        ("hardware.dtype=bfloat16", "hardware.dtype='float32' (now 'bfloat16')"),
        ("pruner.granularity=row", "pruner.granularity='layer' (now 'row')"),
        ("scorer.beta=0.5", "scorer.beta=1.0 (now 0.5)"),
        ("seed=1", "seed=0 (now 1)"),
        ("evolver.pop_size=5", "evolver.pop_size='4' (now '5')"),
    ],
)
def test_resume_with_a_setting_outside_the_evolver_changed_is_refused(
    nn_run, tmp_path, monkeypatch, override, named
):
    """The checkpoint holds every config value that shapes the result (the tasks' data seeds,
    the search, the dtype, the pruner's settings ...), not only the evolver's and scorer's: a
    resume that changes one would mix two runs (new selection datapoints against the old
    scores, a float32 archive cast to bfloat16). It is refused before any model loads (at 7B,
    minutes of loading)."""
    tmp, _ = nn_run
    shutil.copytree(tmp / "run", tmp_path / "run")

    def loaded(*args, **kwargs):
        raise AssertionError("a model loaded before the resume was refused")

    monkeypatch.setattr("sparse_merge.pipelines.merge.load_causal_lm", loaded)
    with pytest.raises(ConfigError) as err:
        execute(compose_cfg([*SMALL, "resume=true", override], tmp_path))
    assert err.value.key == "resume" and named in str(err.value)


@pytest.mark.parametrize(
    "option,checks",
    [
        ("ga", {"matchmaker": False}),
        ("nn_no_crossover", {"crossover": "none"}),
        ("nn_no_split", {"crossover": "slerp"}),
        ("nn_no_matchmaker", {"matchmaker": False}),
        ("natural_niches", {"matchmaker": True, "crossover": "slerp_split"}),
    ],
)
def test_evolver_options_instantiate(option, checks):
    cfg = compose_cfg([f"evolver={option}"])
    evolver = instantiate(cfg.evolver, _convert_="all")
    assert isinstance(evolver, NaturalNiches)
    got = {"matchmaker": evolver.matchmaker, "crossover": evolver.crossover.mode}
    assert {k: got[k] for k in checks} == checks
    assert cfg.scorer.alpha == (0.0 if option == "ga" else 1.0)


@pytest.mark.parametrize(
    "option,checks",
    [
        ("nn_no_crossover", {"crossover": "none"}),
        ("nn_no_split", {"split": False}),
        ("nn_no_matchmaker", {"matchmaker": False}),
        ("ga", {"matchmaker": False}),
    ],
)
def test_ablations_stay_off_with_the_task_vector_search(option, checks):
    """search=task_vectors is composed after the evolver and sets the crossover's method (a
    linear merge of coefficients): it must not switch an ablated operator back on."""
    cfg = compose_cfg([f"evolver={option}", "search=task_vectors"])
    evolver = instantiate(cfg.evolver, _convert_="all")
    got = {
        "matchmaker": evolver.matchmaker,
        "crossover": evolver.crossover.mode,
        "split": evolver.crossover.split,
    }
    assert {k: got[k] for k in checks} == checks


def test_baselines_at_equal_budget_in_one_table(tmp_path):
    execute(compose_cfg([*SMALL, "baselines=classic", "save_models=false"], tmp_path))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    rows = {r["model"]: r for r in results["models"]}
    budget = results["evaluations"]
    names = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "slerp"]
    assert list(rows)[6:-2] == names  # base and parents (dense, pruned), baselines, picks
    for name in names:
        assert 0 < rows[name]["evals"] <= budget
        assert rows[name]["sparsity"] >= 0.4 - 1e-9  # pruned like the picks, measured
        assert rows[name]["settings"]["weights"]


def test_task_vector_search_reports_coefficients_and_exact_sparsity(tmp_path):
    execute(compose_cfg([*SMALL, "search=task_vectors", "save_models=false"], tmp_path))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["search"]["search"] == "task_vectors"
    rows = {r["model"]: r for r in results["models"]}
    assert rows["best"]["sparsity"] >= 0.4 - 1e-9
    coef = results["picks"]["best"]["coefficients"]
    assert set(coef) == {"math", "code"} and set(coef["math"]) == {"block0", "block1", "other"}
    names = [r["name"] for r in results["archive"]]
    assert {"base", "math", "code", "task_arithmetic"} & set(names)


@pytest.mark.parametrize(
    "option",
    ["natural_niches", "ga", "nn_no_crossover", "nn_no_split", "nn_no_matchmaker", "one_shot"],
)
def test_every_merge_evolver_has_the_checks_the_pipeline_calls_before_loading(tmp_path, option):
    """pipeline=merge takes an ``Evolver``: ``evolve`` and the two checks it calls before any
    model loads (they were looked up by name, and an evolver without them skipped them)."""
    cfg = compose_cfg(["experiment=smoke", f"evolver={option}"], tmp_path)
    evolver = instantiate(cfg.evolver)
    assert isinstance(evolver, Evolver)
    evolver.check_parents(["math", "code"])  # neither refuses two named parents
    evolver.check_resume(tmp_path / "no_run", SparsityAwareScorer(), seed=0, target=0.5)


@pytest.mark.parametrize("option", ["cma_es", "map_elites", "brute_force", "m2n2_digits"])
def test_a_digits_method_is_refused_before_any_model_loads(tmp_path, monkeypatch, option):
    """The digits methods have no evolve(): pipeline=merge crashed with AttributeError after
    the parents were loaded (minutes at 7B)."""

    def loaded(*args, **kwargs):
        raise AssertionError("a model loaded before the evolver was refused")

    monkeypatch.setattr("sparse_merge.pipelines.merge.load_causal_lm", loaded)
    with pytest.raises(ConfigError) as err:
        execute(compose_cfg(["experiment=smoke", f"evolver={option}"], tmp_path))
    assert err.value.key == "evolver" and "pipeline=digits" in str(err.value)
