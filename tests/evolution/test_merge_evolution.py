"""The merge pipeline with the Natural Niches evolver, end to end on the smoke model."""

import csv
import json

import pytest
from hydra.utils import instantiate
from transformers import AutoModelForCausalLM

from sparse_merge.app import execute
from sparse_merge.evolution.natural_niches import NaturalNiches
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
    assert set(rows) == {"math", "code", "best", "sparse"}
    assert metric == rows["best"]["mean"] == results["accuracy"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["accuracy"] == metric and summary["sparsity"] == rows["best"]["sparsity"]
    with open(run_dir / "archive.csv") as f:
        archive = list(csv.DictReader(f))
    assert len(archive) == 4 and {"accuracy", "sparsity"} <= set(archive[0])
    assert max(float(r["accuracy"]) for r in archive) == pytest.approx(metric)
    for name in ("best", "sparse"):
        model = AutoModelForCausalLM.from_pretrained(run_dir / "models" / name)
        assert measure_sparsity(model).overall == pytest.approx(rows[name]["sparsity"])
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
