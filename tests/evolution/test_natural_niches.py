"""The Natural Niches engine on a tiny linear Problem: logs, lineage, sparsity, resume."""

import json

import pytest
import torch

from sparse_merge.errors import ConfigError
from sparse_merge.evolution.natural_niches import NaturalNiches
from sparse_merge.evolution.schedules import CyclicSchedule
from sparse_merge.evolution.scoring import SparsityAwareScorer
from sparse_merge.tracking.logger import RunLogger

from .linear_problem import LinearProblem


def evolve(tmp_path, problem=None, resume=False, scorer=None, target=0.0, **kw):
    logger = RunLogger(console=False).start(tmp_path)
    engine = NaturalNiches(**{"pop_size": 6, "iterations": 25, "checkpoint_every": 5, **kw})
    try:
        return engine.evolve(
            problem or LinearProblem(),
            scorer or SparsityAwareScorer(alpha=1.0),
            seed=3,
            target=target,
            run_dir=tmp_path,
            logger=logger,
            resume=resume,
        )
    finally:
        logger.close()


def records(run_dir, event="step"):
    lines = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return [x for x in lines if x.get("event") == event]


def test_steps_logged_with_lineage_and_archive_full(tmp_path):
    problem = LinearProblem()
    res = evolve(tmp_path, problem=problem)
    a = res.archive
    assert len(a) == 6 and len(set(a.ids.tolist())) == 6
    steps = records(tmp_path)
    assert [r["step"] for r in steps] == list(range(25))
    r = steps[0]
    for key in ("parent_ids", "split", "weight", "prune_sparsity", "child_sparsity"):
        assert key in r
    assert len(r["child_scores"]) == 48 and r["entered"]  # empty slots take any child
    # every archive member's ancestry goes back to the two initial genomes
    for ident in a.ids.tolist():
        stack, seen = [ident], set()
        while stack:
            i = stack.pop()
            seen.add(i)
            stack += res.lineage[i]["parents"]
        assert seen & {0, 1}
    assert {r["child_id"] for r in steps} == set(range(2, 27))
    # the stored scores are the genomes' scores
    p = LinearProblem()
    for slot in a.occupied():
        assert torch.equal(a.scores[slot], p.evaluate(a.genomes[slot]))
    assert (tmp_path / "lineage.json").exists()
    # the picks come from the selection split only: best has the highest selection mean
    assert res.picks["best"].selection_mean == pytest.approx(float(a.scores.double().mean(1).max()))
    assert problem.heldout_calls == 0  # held-out data is for reports, not for the engine
    assert res.evaluations == 2 + 25


def test_final_picks_reach_the_target_exactly_and_count_their_evaluations(tmp_path):
    res = evolve(tmp_path, target=0.5, prune_target="parents", iterations=12)
    members_below = int((res.archive.sparsity[res.archive.valid] < 0.5).sum())
    assert members_below > 0  # children of partly pruned parents and the parents themselves
    assert res.evaluations == 2 + 12 + members_below
    p = LinearProblem()
    for pick in res.picks.values():
        assert pick.sparsity >= 0.5
        assert p.sparsity(pick.genome) == pick.sparsity
        assert torch.equal(p.evaluate(pick.genome), pick.scores)  # re-scored after pruning
    best = res.picks["best"]
    assert res.picks["sparse"].selection_mean >= best.selection_mean - 0.01
    assert res.picks["sparse"].sparsity >= best.sparsity


def test_without_final_prune_the_picks_are_archive_members(tmp_path):
    res = evolve(tmp_path, target=0.5, prune_target="parents", iterations=12, final_prune=False)
    assert res.evaluations == 2 + 12
    ids = set(res.archive.ids.tolist())
    assert all(p.ident in ids and not p.pruned for p in res.picks.values())


def test_children_beat_both_parents_on_selection(tmp_path):
    res = evolve(tmp_path, iterations=60)
    parents = LinearProblem()
    init = parents.initial()
    best_parent = max(float(parents.evaluate(g).mean()) for g in init.values())
    assert float(res.archive.scores.mean(1).max()) > best_parent


def test_sparsity_aware_archive_reaches_the_target(tmp_path):
    scorer = SparsityAwareScorer(alpha=1.0, beta=1.0, kind="fraction")
    res = evolve(
        tmp_path,
        scorer=scorer,
        target=0.5,
        iterations=60,
        prune_target="child",
        schedule=CyclicSchedule(0.0, None, period=10),
    )
    a = res.archive
    assert float(a.sparsity[a.valid].mean()) >= 0.8 * 0.5
    steps = records(tmp_path)
    assert steps[0]["prune_sparsity"] == 0.0 and steps[9]["prune_sparsity"] == 0.5
    # pruning the child gives at least the scheduled sparsity (32 weights: multiples of 1/32)
    assert all(r["child_sparsity"] >= round(r["prune_sparsity"] * 32) / 32 for r in steps)
    assert any(r["child_sparsity"] == 0.5 for r in steps)


def test_without_beta_pruned_children_rarely_survive(tmp_path):
    """beta = 0 gives no reason to keep sparse children: the archive ends less sparse."""
    kw = dict(
        target=0.5,
        iterations=60,
        prune_target="child",
        schedule=CyclicSchedule(0.0, None, period=10),
    )
    dense = evolve(tmp_path / "a", **kw).archive
    sparse = evolve(
        tmp_path / "b", scorer=SparsityAwareScorer(alpha=1.0, beta=1.0, kind="fraction"), **kw
    ).archive
    assert float(sparse.sparsity.mean()) > float(dense.sparsity.mean())


def test_parent_pruning_and_mutation_keep_zeros_of_the_parents(tmp_path):
    res = evolve(tmp_path, target=0.5, prune_target="parents", mutation_std=0.01, crossover="none")
    # no crossover: a child is a pruned, mutated copy; pruned zeros stay zero
    steps = records(tmp_path)
    assert all(r["child_sparsity"] >= 0.5 - 1e-9 for r in steps)
    assert all(r["weight"] is None and r["split"] is None for r in steps)
    assert float(res.archive.sparsity.max()) >= 0.5


class Crash(RuntimeError):
    pass


class CrashingProblem(LinearProblem):
    """Fails at the ``fail_at``-th evaluation (a killed job)."""

    def __init__(self, fail_at):
        super().__init__()
        self.fail_at = fail_at

    def evaluate(self, genome):
        if self.evaluations + 1 == self.fail_at:
            raise Crash("killed")
        return super().evaluate(genome)


def same_archive(a, b):
    """Whether two archives hold the same individuals, genomes and scores, slot by slot."""
    for key in ("scores", "sparsity", "valid", "ids"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    for slot in range(a.pop_size):
        assert torch.equal(a.genomes[slot], b.genomes[slot]), slot
    return True


@pytest.mark.parametrize(
    "prune_target,archive",
    [("parents", "device"), ("child", "device"), ("parents", "cpu"), ("parents", "disk")],
)
def test_resume_gives_the_same_archive_as_an_uninterrupted_run(tmp_path, prune_target, archive):
    kw = dict(
        target=0.4,
        prune_target=prune_target,
        mutation_std=0.05,
        schedule=CyclicSchedule(0.0, None, period=4),
        scorer=SparsityAwareScorer(alpha=1.0, beta=0.5),
        archive=archive,
    )
    full = evolve(tmp_path / "full", **kw)
    with pytest.raises(Crash):  # 2 initial evaluations + 13 children: dies in step 13
        evolve(tmp_path / "cut", problem=CrashingProblem(fail_at=16), **kw)
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 10
    resumed = evolve(tmp_path / "cut", resume=True, **kw)
    assert same_archive(resumed.archive, full.archive)
    assert resumed.lineage == full.lineage
    assert [r["step"] for r in records(tmp_path / "cut")][-15:] == list(range(10, 25))


def test_disk_archive_keeps_one_file_per_member_and_small_checkpoints(tmp_path):
    kw = dict(target=0.4, scorer=SparsityAwareScorer(alpha=1.0, beta=0.5))
    disk = evolve(tmp_path / "disk", archive="disk", **kw)
    files = sorted(p.name for p in (tmp_path / "disk" / "archive").iterdir())
    assert files == [f"{i:08d}.safetensors" for i in sorted(disk.archive.ids.tolist())]
    ckpt = torch.load(tmp_path / "disk" / "checkpoint.pt", weights_only=True)
    assert "genomes" not in ckpt["archive"] and len(ckpt["archive"]["files"]) == 6
    host = evolve(tmp_path / "cpu", archive="cpu", **kw)
    assert same_archive(disk.archive, host.archive)  # where the genomes live changes nothing


def test_pruned_parents_come_from_the_mask_cache_with_the_same_result(tmp_path):
    kw = dict(
        target=0.5,
        schedule=CyclicSchedule(0.0, None, period=4),
        scorer=SparsityAwareScorer(alpha=1.0, beta=0.5),
    )
    cached, uncached = LinearProblem(), LinearProblem()
    a = evolve(tmp_path / "a", problem=cached, **kw)
    b = evolve(tmp_path / "b", problem=uncached, prune_cache_mb=0, **kw)
    assert same_archive(a.archive, b.archive) and a.lineage == b.lineage
    hits = sum(r["prune_hits"] for r in records(tmp_path / "a"))
    assert hits > 0 and sum(r["prune_hits"] for r in records(tmp_path / "b")) == 0
    assert cached.prunes <= uncached.prunes - hits  # (the final pruning may hit too)


def test_resume_refuses_other_settings(tmp_path):
    evolve(tmp_path, iterations=5)
    with pytest.raises(ConfigError, match="resume"):
        evolve(tmp_path, iterations=10, resume=True, pop_size=7)


def test_bad_values_raise_config_errors():
    with pytest.raises(ConfigError, match="prune_target"):
        NaturalNiches(prune_target="both")
    with pytest.raises(ConfigError, match="pop_size"):
        NaturalNiches(pop_size=1)
    with pytest.raises(ConfigError, match="crossover"):
        NaturalNiches(crossover="uniform")


class _Payload:
    """Runs code when unpickled (what a hostile checkpoint file carries)."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('ran')",))


def test_a_checkpoint_that_carries_code_is_refused_not_run(tmp_path, monkeypatch):
    import pickle

    monkeypatch.chdir(tmp_path)
    torch.save({"step": 1, "evil": _Payload()}, tmp_path / "checkpoint.pt")
    with pytest.raises(pickle.UnpicklingError):
        evolve(tmp_path, resume=True)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    "change,key",
    [
        (dict(target=0.3), "sparsity=0.4"),
        (dict(scorer=SparsityAwareScorer(alpha=1.0, beta=0.7)), "scorer.beta=0.5"),
        (dict(mutation_std=0.1), "evolver.mutation_std"),
        (dict(schedule=CyclicSchedule(0.0, None, period=5)), "evolver.schedule"),
    ],
)
def test_resume_with_changed_settings_is_refused_naming_each_key(tmp_path, change, key):
    kw = dict(target=0.4, scorer=SparsityAwareScorer(alpha=1.0, beta=0.5), iterations=5)
    evolve(tmp_path, **kw)
    with pytest.raises(ConfigError, match="resume") as info:
        evolve(tmp_path, resume=True, **{**kw, **change})
    assert key in str(info.value) and "now" in str(info.value)


def test_resume_with_fewer_iterations_than_done_is_refused(tmp_path):
    evolve(tmp_path, iterations=10)
    with pytest.raises(ConfigError, match="evolver.iterations"):
        evolve(tmp_path, iterations=5, resume=True)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(pop_size=2.5), "pop_size"),
        (dict(iterations=-1), "iterations"),
        (dict(enter_on_tie="maybe"), "enter_on_tie"),
        (dict(matchmaker="yes"), "matchmaker"),
        (dict(checkpoint_every=1.5), "checkpoint_every"),
    ],
)
def test_values_of_the_wrong_kind_are_refused_not_coerced(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        NaturalNiches(**kwargs)


def test_a_negative_thread_count_is_refused():
    from sparse_merge.hardware import Hardware

    with pytest.raises(ConfigError, match="num_threads"):
        Hardware(num_threads=-1)


@pytest.mark.parametrize("damage", ["truncated", "empty", "random bytes inside", "not a zip"])
def test_a_damaged_checkpoint_is_refused_with_one_clear_line(tmp_path, damage):
    evolve(tmp_path, iterations=5)
    path = tmp_path / "checkpoint.pt"
    raw = bytearray(path.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    elif damage == "empty":
        raw = bytearray()
    elif damage == "random bytes inside":
        # the archive's scores are stored raw near the end of the file: 4 KiB of noise there
        g = torch.Generator().manual_seed(0)
        start = len(raw) // 3
        noise = torch.randint(0, 256, (min(4096, len(raw) - start - 512),), generator=g)
        raw[start : start + noise.numel()] = bytes(noise.tolist())
    else:
        raw = bytearray(b"hello" * 100)
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checkpoint.pt is damaged") as info:
        evolve(tmp_path, iterations=10, resume=True)
    assert "\n" not in str(info.value)


def test_a_schedule_starting_above_the_target_is_refused():
    with pytest.raises(ConfigError, match="evolver.schedule.low"):
        CyclicSchedule(0.6, None).bind(0.5)
    assert CyclicSchedule(0.2, None).bind(0.5).high == 0.5
