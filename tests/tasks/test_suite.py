"""Several benchmarks as one evaluation: fixed, aligned columns and per-task weights."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from sparse_merge.errors import ConfigError
from sparse_merge.evolution.problem import selection_mean
from sparse_merge.tasks.suite import TaskSuite

from ..conftest import compose_cfg
from .conftest import FIXTURES

FILES = [
    f"task.tasks.gsm8k.data_files={{train: {FIXTURES}/gsm8k_train.jsonl, test: {FIXTURES}/gsm8k_test.jsonl}}",
    "task.tasks.gsm8k.n_select=3",
    "task.tasks.gsm8k.n_heldout=2",
    f"task.tasks.mbpp.data_files={FIXTURES}/mbpp.jsonl",
    "task.tasks.mbpp.n_select=2",
    "task.tasks.mbpp.n_heldout=2",
    "task.tasks.mbpp.num_fewshot=1",
]


@pytest.fixture
def suite(tmp_path) -> TaskSuite:
    cfg = compose_cfg(["task=math_code", *FILES, "task.weights={gsm8k: 3.0, mbpp: 1.0}"], tmp_path)
    return instantiate(cfg.task, _convert_="all")


def test_columns_are_aligned_and_weighted(suite, monkeypatch):
    assert suite.names == ["gsm8k", "mbpp"] and suite.n_selection == 5
    assert suite.spans() == {"gsm8k": slice(0, 3), "mbpp": slice(3, 5)}
    weights = suite.selection_weights()  # 3 * 5 / (3 * 4) and 1 * 5 / (2 * 4): mean 1
    assert torch.allclose(weights, torch.tensor([1.25] * 3 + [0.625] * 2, dtype=torch.float64))
    gsm, mbpp = suite.tasks["gsm8k"].selection, suite.tasks["mbpp"].selection
    monkeypatch.setattr(gsm, "predict", lambda m, t: [f"#### {g}" for g in gsm.golds[:2]] + ["0.5"])
    monkeypatch.setattr(mbpp, "predict", lambda m, t: ["pass", mbpp.rows[1]["code"]])
    scores = suite.score_selection(None, None)
    assert scores.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert torch.equal(scores, suite.score_selection(None, None))  # same order every call
    weighted = selection_mean(scores, weights)  # gsm8k's share 3/4, mbpp's 1/4
    assert weighted == pytest.approx((3 * 2 / 3 + 1 * 1 / 2) / 4)


def test_heldout_mean_uses_the_task_weights(suite, monkeypatch):
    monkeypatch.setattr(
        suite.tasks["gsm8k"].heldout, "score", lambda m, t: torch.tensor([1.0, 1.0])
    )
    monkeypatch.setattr(suite.tasks["mbpp"].heldout, "score", lambda m, t: torch.tensor([0.0, 1.0]))
    acc = suite.evaluate_heldout(None, None)
    assert acc == {"gsm8k": 1.0, "mbpp": 0.5, "mean": pytest.approx((3 * 1.0 + 0.5) / 4)}


def test_a_task_with_the_wrong_number_of_scores_is_an_error(suite, monkeypatch):
    monkeypatch.setattr(suite.tasks["mbpp"].selection, "score", lambda m, t: torch.zeros(3))
    monkeypatch.setattr(suite.tasks["gsm8k"].selection, "score", lambda m, t: torch.zeros(3))
    with pytest.raises(ValueError, match="'mbpp' gave 3 scores for 2 selection datapoints"):
        suite.score_selection(None, None)


def test_a_task_node_without_target_is_a_config_error():
    with pytest.raises(ConfigError, match="tasks.addition"):
        TaskSuite({"addition": {"n_select": 16}})
