"""Building blocks of the evolution engine, against hand-computed values."""

import math

import pytest
import torch

from sparse_merge.errors import ConfigError
from sparse_merge.evolution.archive import Archive, replacement_slot
from sparse_merge.evolution.crossover import Crossover
from sparse_merge.evolution.mutation import mutate_
from sparse_merge.evolution.schedules import ConstantSchedule, CyclicSchedule
from sparse_merge.evolution.scoring import (
    SparsityAwareScorer,
    competition_fitness,
)
from sparse_merge.evolution.selection import matchmaker_weights, sample_index, select_parents

# 3 individuals x 4 datapoints
S = torch.tensor(
    [
        [1.0, 1.0, 0.0, 0.0],
        [1.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0, 1.0],
    ]
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- fitness -----------------------------------------------------------------------------


def test_fitness_alpha0_is_plain_sum():
    assert competition_fitness(S, 0.0).tolist() == [2.0, 2.0, 2.0]


def test_fitness_alpha1_shares_each_datapoint():
    # column sums z = [2, 1, 2, 1]: row 0 = 1/2 + 1/1, row 1 = 1/2 + 1/2, row 2 = 1/2 + 1/1
    assert torch.allclose(competition_fitness(S, 1.0), torch.tensor([1.5, 1.0, 1.5]).double())


def test_fitness_ignores_empty_rows_in_z():
    valid = torch.tensor([True, True, False])
    # without row 2: z = [2, 1, 1, 1] -> row 0 = 0.5 + 1, row 1 = 0.5 + 1
    f = competition_fitness(S, 1.0, valid)
    assert f.tolist() == [1.5, 1.5, 0.0]


# ---- selection ---------------------------------------------------------------------------


def test_matchmaker_weights_hand_computed():
    # shares f (alpha 1): row0 [.5,1,0,0], row1 [.5,0,.5,0], row2 [0,0,.5,1]
    # to parent 0: row1 -> max(0, [0,-1,.5,0]) = .5 ; row2 -> [0,0,.5,1] = 1.5
    w = matchmaker_weights(S, torch.ones(3, dtype=torch.bool), 0, 1.0)
    assert torch.allclose(w, torch.tensor([0.0, 0.5, 1.5]).double())
    # alpha 0: raw scores; to parent 1: row0 -> [0,1,0,0] = 1, row2 -> [0,0,0,1] = 1
    w = matchmaker_weights(S, torch.ones(3, dtype=torch.bool), 1, 0.0)
    assert w.tolist() == [1.0, 0.0, 1.0]


def test_sample_index_never_picks_empty_or_zero_weight_slots():
    valid = torch.tensor([True, False, True, True])
    weights = torch.tensor([0.0, 5.0, 1.0, 3.0])  # slot 1 is empty: its weight is ignored
    g = gen()
    counts = torch.bincount(
        torch.tensor([sample_index(weights, valid, g) for _ in range(4000)]), minlength=4
    )
    assert counts[0] == 0 and counts[1] == 0
    assert abs(counts[3] / 4000 - 0.75) < 0.03


def test_sample_index_uniform_when_all_weights_zero_and_rejects_negative():
    valid = torch.tensor([False, True, True])
    picks = {sample_index(torch.zeros(3), valid, gen(i)) for i in range(50)}
    assert picks == {1, 2}
    with pytest.raises(ValueError, match=">= 0"):
        sample_index(torch.tensor([1.0, -0.1, 1.0]), valid, gen())
    with pytest.raises(ValueError):
        sample_index(torch.ones(3), torch.zeros(3, dtype=torch.bool), gen())


def test_select_parents_distinct_and_follow_matchmaker():
    valid = torch.ones(3, dtype=torch.bool)
    total = torch.tensor([1.0, 0.0, 0.0])  # parent 1 is always slot 0
    seconds = [
        select_parents(total, S, valid, gen(i), matchmaker=True, alpha=1.0)[1] for i in range(2000)
    ]
    frac2 = sum(s == 2 for s in seconds) / len(seconds)
    assert set(seconds) <= {1, 2} and abs(frac2 - 0.75) < 0.04  # 1.5 / (0.5 + 1.5)
    # one occupied slot: both parents are that slot
    one = torch.tensor([False, True, False])
    assert select_parents(torch.ones(3), S, one, gen(), matchmaker=True, alpha=1.0) == (1, 1)


# ---- scorer sign safety ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["softmax", "fraction", "rank"])
def test_totals_non_negative_and_zero_on_empty_slots(kind):
    scorer = SparsityAwareScorer(omega=1.0, beta=0.5, tau=0.1, alpha=1.0, kind=kind)
    valid = torch.tensor([True, False, True])
    total = scorer.total(S, torch.tensor([0.5, 0.9, 0.0]), valid)
    assert (total >= 0).all() and total[1] == 0
    assert total[0] > total[2]  # same fitness, sparser


def test_scorer_rejects_zero_weights():
    with pytest.raises(ConfigError, match="beta"):
        SparsityAwareScorer(omega=0.0, beta=0.0)


# ---- replacement -------------------------------------------------------------------------


def _full_archive():
    a = Archive(3, 2, 4)
    for i in range(3):
        a.put(i, torch.full((2,), float(i)), S[i], 0.0, ident=i)
    return a


def test_replacement_fills_empty_slots_first():
    a = Archive(3, 2, 4)
    a.put(0, torch.zeros(2), S[0], 0.0, 0)
    scorer = SparsityAwareScorer(alpha=0.0)
    assert replacement_slot(scorer, a, torch.zeros(4), 0.0) == 1  # even a useless child


def test_replacement_lowest_total_leaves_possibly_the_child():
    scorer = SparsityAwareScorer(alpha=0.0, beta=0.0)
    a = _full_archive()  # fitness (alpha 0) [2, 2, 2]
    assert replacement_slot(scorer, a, torch.tensor([1.0, 0, 0, 0]), 0.0) is None  # child 1 < 2
    a.scores[1] = torch.tensor([1.0, 0, 0, 0])  # now slot 1 is the weakest (1)
    assert replacement_slot(scorer, a, torch.tensor([1.0, 1, 1, 0]), 0.0) == 1
    # a tie at the lowest total: the child leaves, or (the reference's rule) enters
    assert replacement_slot(scorer, a, torch.tensor([0.0, 0, 0, 1]), 0.0) is None
    assert replacement_slot(scorer, a, torch.tensor([0.0, 0, 0, 1]), 0.0, enter_on_tie=True) == 1
    # strictly worst: the child leaves either way
    assert replacement_slot(scorer, a, torch.zeros(4), 0.0, enter_on_tie=True) is None


def test_replacement_uses_competition_over_archive_plus_child():
    # alpha 1: a child solving only datapoint 3 shares it with row 2
    scorer = SparsityAwareScorer(alpha=1.0, beta=0.0)
    a = _full_archive()
    # with child [0,1,0,1]: z = [2,2,2,2]; fitness rows [1, 1, 1], child 1 -> tie -> child leaves
    assert replacement_slot(scorer, a, torch.tensor([0.0, 1, 0, 1]), 0.0) is None
    # with child [0,1,1,1]: z = [2,2,3,2]; rows [1, 0.5+1/3, 1/3+0.5, child 0.5+1/3+0.5]
    # rows 1 and 2 tie lowest (5/6): the first of them leaves
    assert replacement_slot(scorer, a, torch.tensor([0.0, 1, 1, 1]), 0.0) == 1


def test_archive_state_round_trip():
    a = _full_archive()
    b = Archive(3, 2, 4)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(b.genomes[i], a.genomes[i]) for i in range(3))
    assert torch.equal(b.ids, a.ids) and len(b) == 3
    with pytest.raises(ValueError, match="pop_size"):
        Archive(4, 2, 4).load_state_dict(a.state_dict())


# ---- crossover ---------------------------------------------------------------------------


def test_crossover_slerp_split_in_place_matches_drawn_parameters():
    a, b = torch.randn(50, generator=gen(1)), torch.randn(50, generator=gen(2))
    out = torch.empty(50)
    info = Crossover.named("slerp_split")(out, a, b, gen(3))
    w, k = info["weight"], info["split"]
    assert 0.0 <= w < 1.0 and 0 <= k <= 50
    from sparse_merge.evolution.crossover import slerp_

    assert torch.equal(out, slerp_(torch.empty(50), a, b, w, k))
    # written into b itself (the live buffer), same result
    b2 = b.clone()
    Crossover.named("slerp_split")(b2, a, b2, gen(3))
    assert torch.allclose(b2, out)


def test_crossover_without_split_and_none():
    a, b = torch.randn(20, generator=gen(1)), torch.randn(20, generator=gen(2))
    out = torch.empty(20)
    info = Crossover.named("slerp")(out, a, b, gen(0))
    assert info["split"] is None
    from sparse_merge.evolution.crossover import slerp_

    assert torch.equal(out, slerp_(torch.empty(20), a, b, info["weight"]))
    assert Crossover.named("none")(out, a, b, gen(0)) == {"weight": None, "split": None}
    assert torch.equal(out, a)
    with pytest.raises(ConfigError, match="crossover"):
        Crossover.named("uniform")


# ---- mutation ----------------------------------------------------------------------------


def test_mutation_keeps_zeros_and_changes_the_rest():
    g = torch.randn(1000, generator=gen(0))
    g[::3] = 0.0
    before = g.clone()
    n = mutate_(g, 0.1, gen(1))
    assert n == int((before != 0).sum())
    assert (g[::3] == 0).all()
    nz = before != 0
    assert (g[nz] != before[nz]).all() and (g[nz] != 0).all()
    assert abs(float((g[nz] - before[nz]).std()) - 0.1) < 0.01
    assert mutate_(g, 0.0, gen(1)) == 0


# ---- schedules ---------------------------------------------------------------------------


def test_cyclic_schedule_spans_low_to_high_and_restarts():
    s = CyclicSchedule(low=0.1, high=0.5, period=5)
    values = [s(t) for t in range(11)]
    assert values[0] == 0.1 and values[4] == 0.5 and values[5] == 0.1 and values[9] == 0.5
    assert values[2] == pytest.approx(0.3)  # cosine midpoint
    assert all(a < b for a, b in zip(values[:4], values[1:5]))  # rises within a cycle


def test_cyclic_schedule_growing_cycles_and_binding():
    s = CyclicSchedule(low=0.0, high=None, period=2, mult=2.0).bind(0.6)
    # cycles of 2, 4, 8 steps
    assert [s.phase(t) for t in (0, 1, 2, 5, 6)] == [(0, 2), (1, 2), (0, 4), (3, 4), (0, 8)]
    assert s(1) == 0.6 and s(5) == 0.6 and s(6) == 0.0
    assert ConstantSchedule().bind(0.4)(7) == 0.4 and ConstantSchedule(0.2).bind(0.4)(0) == 0.2
    assert math.isclose(CyclicSchedule(0.2, 0.2, 1)(3), 0.2)
    with pytest.raises(ConfigError, match="high"):
        CyclicSchedule(low=0.5, high=0.2)
