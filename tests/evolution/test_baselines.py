"""Classic merges at an equal budget: grids, budgets, pruning to the target."""

import functools

import pytest
import torch

from sparse_merge.errors import ConfigError
from sparse_merge.evolution.baselines import Baselines, grid_points
from sparse_merge.merging.slerp import Slerp
from sparse_merge.merging.task_arithmetic import TaskArithmetic


def test_grid_points_expand_weights_per_parent_and_t():
    pts = grid_points({"density": [0.3, 0.6], "weight": [0.5, 1.0]}, ["a", "b"])
    assert len(pts) == 2 * 4
    assert pts[0] == {"density": 0.3, "weights": [0.5, 0.5]}
    assert {tuple(p["weights"]) for p in pts} == {(0.5, 0.5), (0.5, 1.0), (1.0, 0.5), (1.0, 1.0)}
    assert grid_points({"t": [0.25]}, ["a", "b"]) == [{"weights": [0.75, 0.25]}]
    with pytest.raises(ConfigError, match="grid.t"):
        grid_points({"t": [0.5]}, ["a", "b", "c"])


def test_a_bad_grid_setting_fails_before_any_model_is_loaded():
    with pytest.raises(ConfigError, match="methods.ties.grid"):
        Baselines({"ties": {"method": functools.partial(TaskArithmetic), "grid": {"dens": [1]}}})


@pytest.fixture
def problem(based_problem):
    return based_problem


def test_search_spends_at_most_the_budget_and_prunes_every_candidate(problem):
    calls = []
    score = problem._score
    problem._score = lambda m, t: calls.append(1) or score(m, t)
    baselines = Baselines(
        {
            "task_arithmetic": {
                "method": functools.partial(TaskArithmetic),
                "grid": {"weight": [0.0, 0.5, 1.0]},  # 9 points
            },
            "slerp": {"method": functools.partial(Slerp), "grid": {"t": [0.0, 1.0]}},
        }
    )
    results = baselines.run(problem, budget=5, target=0.5, seed=0)
    assert [r.name for r in results] == ["task_arithmetic", "slerp"]
    assert [(r.evaluations, r.grid_size) for r in results] == [(5, 9), (2, 2)]
    assert len(calls) == 7
    for r in results:
        assert r.pick.sparsity == pytest.approx(0.5)
        assert problem.sparsity(r.pick.genome) == r.pick.sparsity
        assert torch.equal(problem.evaluate(r.pick.genome), r.pick.scores)


def test_the_grid_point_of_a_parent_gives_that_parent_pruned(problem):
    """Task arithmetic at weights (1, 0) is parent a: the search finds it when it is best."""
    baselines = Baselines(
        {"ta": {"method": functools.partial(TaskArithmetic), "grid": {"weight": [0.0, 1.0]}}},
        prune=False,
    )
    (result,) = baselines.run(problem, budget=10, target=0.5, seed=0)
    assert result.evaluations == 4
    best_parent = max(problem.evaluate(g).mean() for g in problem.parents.values())
    assert result.pick.selection_mean >= float(best_parent) - 1e-9
    assert result.pick.sparsity == 0.0  # prune=False


def test_baselines_simple_drops_the_methods_it_sets_to_null(tmp_path):
    from hydra.utils import instantiate

    from ..conftest import compose_cfg

    cfg = compose_cfg(["baselines=simple"], tmp_path)
    baselines = instantiate(cfg.baselines, _convert_="all")
    assert list(baselines.methods) == ["task_arithmetic", "ties", "dare_ties"]
