"""``task.weights`` reach selection: a benchmark's share of the selection mean (the picks, the
baselines' choice) and of the competition fitness is its weight, whatever its size."""

import functools

import pytest
import torch

from sparse_merge.evolution.baselines import Baselines
from sparse_merge.evolution.problem import selection_mean
from sparse_merge.evolution.scoring import SparsityAwareScorer, competition_fitness
from sparse_merge.evolution.selection import matchmaker_weights
from sparse_merge.merging.slerp import Slerp
from sparse_merge.tasks.suite import TaskSuite


class _Split:
    def __init__(self, scores_of):
        self.scores_of = scores_of

    def __len__(self):
        return len(self.scores_of(0.0))

    def score(self, model, tokenizer):
        return self.scores_of(model)


class _Bench:
    def __init__(self, scores_of):
        self.selection = self.heldout = _Split(scores_of)


def _suite(weights):
    """Benchmark a (2 datapoints) is solved by the model t = 0, half of b (6) by t = 1."""
    a = _Bench(lambda t: torch.ones(2) if t == 0 else torch.zeros(2))
    b = _Bench(lambda t: torch.tensor([1.0, 1, 1, 0, 0, 0]) * (t == 1))
    return TaskSuite({"a": a, "b": b}, weights)


class _Problem:
    """Two parents; the model a merge stands for is the SLERP ``t`` of its weights."""

    parents = {"p0": torch.zeros(1), "p1": torch.ones(1)}

    def __init__(self, suite):
        self.suite, self.ws = suite, torch.zeros(1)
        self.column_weights = suite.selection_weights()

    def merge_(self, method, weights, rng=None, split=None):
        self.ws.fill_(weights[1])
        return self.ws

    def prune_(self, genome, target):
        pass

    def evaluate(self, genome):
        return self.suite.score_selection(float(genome[0]), None)

    def sparsity(self, genome):
        return 0.0


@pytest.mark.parametrize(("weights", "chosen"), [({}, 0.0), ({"a": 0.2, "b": 1.0}, 1.0)])
def test_baselines_choose_by_the_weighted_selection_mean(weights, chosen):
    """Equal weights: a's 2 datapoints count as much as b's 6, so t = 0 (a solved, 0.5) beats
    t = 1 (half of b, 0.25); the plain column mean (0.25 against 0.375) chose t = 1."""
    baselines = Baselines({"slerp": {"method": functools.partial(Slerp), "grid": {"t": [0, 1]}}})
    (result,) = baselines.run(_Problem(_suite(weights)), budget=2, target=0.0, seed=0)
    assert result.settings["weights"][1] == chosen
    w = {"a": 1.0, "b": 1.0, **weights}
    expected = w["a"] / sum(w.values()) if chosen == 0 else 0.5 * w["b"] / sum(w.values())
    assert result.pick.selection_mean == pytest.approx(expected)


def test_competition_fitness_and_matchmaker_weigh_each_benchmark_by_its_weight():
    suite = _suite({})
    columns = suite.selection_weights()  # a: 1 * 8 / (2 * 2) = 2, b: 1 * 8 / (6 * 2)
    assert torch.allclose(columns, torch.tensor([2.0] * 2 + [2 / 3] * 6, dtype=torch.float64))
    scores = torch.stack([suite.score_selection(t, None) for t in (0.0, 1.0)])  # [2, 8]
    plain = competition_fitness(scores, 1.0)
    weighted = competition_fitness(scores, 1.0, weights=columns)
    assert plain.tolist() == [2.0, 3.0]  # the bigger benchmark wins unweighted
    assert weighted.tolist() == pytest.approx([4.0, 2.0])  # a: 2 x 2, b: 3 x 2/3
    scorer = SparsityAwareScorer().weighing(columns)
    assert torch.equal(scorer.fitness(scores), weighted)
    assert SparsityAwareScorer().column_weights is None  # weighing makes a copy
    attraction = matchmaker_weights(scores, torch.ones(2, dtype=torch.bool), 0, 1.0, columns)
    assert attraction.tolist() == pytest.approx([0.0, 2.0])
    assert selection_mean(scores, columns).tolist() == pytest.approx([0.5, 0.25])
