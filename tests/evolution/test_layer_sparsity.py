"""The near-zero threshold of the sparsity selection sees (``scorer.epsilon``) and the child's
per-layer sparsity in every step record (``evolver.log_layer_sparsity``)."""

import json
import math

import pytest
import torch

from sparse_merge.analysis import merge_table
from sparse_merge.analysis.plots import layer_sparsity_heatmap
from sparse_merge.app import execute
from sparse_merge.errors import ConfigError
from sparse_merge.evolution.natural_niches import NaturalNiches
from sparse_merge.evolution.problem import slots_layer_sparsity, slots_sparsity
from sparse_merge.evolution.scoring import SparsityAwareScorer
from sparse_merge.models.blocks import prunable_layers
from sparse_merge.models.paramspace import Slot
from sparse_merge.pruning.sparsity import measure_sparsity
from sparse_merge.tracking.logger import RunLogger

from ..conftest import compose_cfg
from .linear_problem import LinearProblem

EPS = 0.3  # about a quarter of N(0, 1) weights lie within it


class NearZeroLinearProblem(LinearProblem):
    """The linear problem measuring ``|w| <= epsilon`` like the real problems do."""

    def sparsity(self, genome: torch.Tensor, epsilon: float = 0.0) -> float:
        return slots_sparsity(genome, [Slot("w", 0, torch.Size(self.shape))], epsilon)


def evolve(run_dir, problem, scorer, target=0.0, **kw):
    logger = RunLogger(console=False).start(run_dir)
    engine = NaturalNiches(**{"pop_size": 5, "iterations": 20, "checkpoint_every": 5, **kw})
    try:
        return engine.evolve(problem, scorer, seed=3, target=target, run_dir=run_dir, logger=logger)
    finally:
        logger.close()


def records(run_dir, event="step"):
    lines = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return [x for x in lines if x.get("event") == event]


def untimed(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "time" and not k.endswith("_s")}


# ---- epsilon ---------------------------------------------------------------------------------


def test_epsilon_zero_gives_exactly_the_run_without_the_knob(tmp_path):
    kw = dict(target=0.5, prune_target="child")
    absent = evolve(tmp_path / "a", LinearProblem(), SparsityAwareScorer(beta=1.0), **kw)
    zero = evolve(tmp_path / "b", LinearProblem(), SparsityAwareScorer(beta=1.0, epsilon=0.0), **kw)
    a, b = absent.archive, zero.archive
    for key in ("scores", "sparsity", "valid", "ids"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert all(torch.equal(a.genomes[s], b.genomes[s]) for s in range(a.pop_size))
    assert absent.lineage == zero.lineage
    assert {k: p.sparsity for k, p in absent.picks.items()} == {
        k: p.sparsity for k, p in zero.picks.items()
    }
    steps_a, steps_b = records(tmp_path / "a"), records(tmp_path / "b")
    assert [untimed(r) for r in steps_a] == [untimed(r) for r in steps_b]
    # a default run logs no optional field
    assert not {"child_sparsity_eps", "layer_sparsity", "layer_sparsity_s"} & set(steps_b[0])
    assert all("sparsity_eps" not in r for r in records(tmp_path / "b", "initial"))


def test_epsilon_counts_small_weights_as_zero_in_selection_only(tmp_path):
    # no pruning: no weight is ever exactly zero, so only the threshold makes sparsity differ
    exact = evolve(tmp_path / "exact", NearZeroLinearProblem(), SparsityAwareScorer(beta=1.0))
    problem = NearZeroLinearProblem()
    near = evolve(tmp_path / "near", problem, SparsityAwareScorer(beta=1.0, epsilon=EPS))
    a = near.archive
    for slot in a.occupied():  # the archive holds what selection saw: |w| <= epsilon
        genome = a.genomes[slot]
        assert float(a.sparsity[slot]) == problem.sparsity(genome, EPS)
        assert problem.sparsity(genome) == 0.0
    assert float(a.sparsity.max()) > 0.2
    assert float(exact.archive.sparsity.max()) == 0.0
    # so selection took other parents and kept other children
    assert exact.archive.ids.tolist() != a.ids.tolist()
    steps = records(tmp_path / "near")
    assert all(r["child_sparsity"] == 0.0 for r in steps)  # the log's sparsity stays exact
    assert all(r["child_sparsity_eps"] > 0.0 for r in steps)
    assert all(
        r["sparsity"] == 0.0 < r["sparsity_eps"] for r in records(tmp_path / "near", "initial")
    )
    assert all(v["sparsity"] == 0.0 for v in near.lineage.values() if "sparsity" in v)
    for pick in near.picks.values():  # reported sparsity: exact zeros
        assert pick.sparsity == problem.sparsity(pick.genome) == 0.0
    # the threshold is a setting of the run: resuming with another one is refused
    with pytest.raises(ConfigError, match="scorer.epsilon=0.3"):
        NaturalNiches(pop_size=5, iterations=25, checkpoint_every=5).evolve(
            NearZeroLinearProblem(),
            SparsityAwareScorer(beta=1.0),
            seed=3,
            run_dir=tmp_path / "near",
            resume=True,
        )


def test_epsilon_picks_report_exact_sparsity_after_final_pruning(tmp_path):
    problem = NearZeroLinearProblem()
    res = evolve(
        tmp_path,
        problem,
        SparsityAwareScorer(beta=1.0, epsilon=EPS),
        target=0.5,
        prune_target="parents",
    )
    for pick in res.picks.values():
        assert pick.sparsity == problem.sparsity(pick.genome) >= 0.5


@pytest.mark.parametrize("bad", [-0.1, "small", math.nan, math.inf, True, None])
def test_bad_epsilon_is_refused(bad):
    with pytest.raises(ConfigError, match=r"^epsilon=.* a finite number >= 0"):
        SparsityAwareScorer(epsilon=bad)


def test_bad_epsilon_in_the_config_is_refused_before_any_model(tmp_path):
    cfg = compose_cfg(["scorer.epsilon=-0.01", f"model.cache_dir={tmp_path}/cache"], tmp_path)
    with pytest.raises(ConfigError) as err:
        execute(cfg)
    assert err.value.key == "scorer.epsilon"
    assert not (tmp_path / "cache").exists()


def test_a_problem_that_cannot_measure_the_knobs_is_refused_before_any_evaluation(tmp_path):
    problem = LinearProblem()  # sparsity() counts exact zeros only, no per-layer layout
    with pytest.raises(ConfigError, match="scorer.epsilon=0.1.*LinearProblem"):
        NaturalNiches().evolve(problem, SparsityAwareScorer(epsilon=0.1))
    with pytest.raises(ConfigError, match="evolver.log_layer_sparsity=True.*LinearProblem"):
        NaturalNiches(log_layer_sparsity=True).evolve(problem, SparsityAwareScorer())
    assert problem.evaluations == 0
    with pytest.raises(ConfigError, match="log_layer_sparsity"):
        NaturalNiches(log_layer_sparsity="yes")


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Two smoke merge runs (no pruning: the toy models have no exact zeros), one with the
    default threshold and one with ``scorer.epsilon=0.01``, sharing the trained toy models."""
    root = tmp_path_factory.mktemp("reports")
    out = {}
    for name, eps in (("exact", []), ("near", ["scorer.epsilon=0.01"])):
        overrides = [
            "experiment=smoke",
            "sparsity=0.0",
            "evolver.pop_size=3",
            "evolver.iterations=2",
            "save_models=false",
            "hardware.num_threads=1",
            *eps,
        ]
        (root / name).mkdir()
        execute(compose_cfg(overrides, root / name))
        run_dir = root / name / "run"
        (run_dir / ".hydra").mkdir()  # what Hydra writes for a job: the merge table reads it
        (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\nsparsity: 0.0\n")
        (run_dir / ".hydra" / "overrides.yaml").write_text(json.dumps(eps))
        out[name] = run_dir
    return out


def test_report_states_the_threshold_and_keeps_exact_sparsity(reports):
    exact = json.loads((reports["exact"] / "results.json").read_text())
    assert exact["sparsity_epsilon"] == 0.0
    assert all("sparsity_eps" not in r for r in exact["models"] + exact["archive"])
    near = json.loads((reports["near"] / "results.json").read_text())
    assert near["sparsity_epsilon"] == 0.01
    for row in near["models"] + near["archive"]:
        assert row["sparsity"] == 0.0 < row["sparsity_eps"]  # exact zeros: none; |w| <= 0.01
    summary = json.loads((reports["near"] / "summary.json").read_text())
    assert summary["sparsity_epsilon"] == 0.01 and summary["sparsity"] == 0.0
    headline = next(r for r in near["models"] if r["model"] == near["headline"])
    assert summary["sparsity_eps"] == headline["sparsity_eps"]
    text = merge_table.report(reports["near"])
    assert "sparsity = exact zeros (selection's sparsity_epsilon: 0.01)" in text
    header = text.split("\n\n")[1].splitlines()[0]
    assert "| sparsity | sparsity_eps |" in header and "| sparsity_eps | mean" not in header
    assert "sparsity_epsilon: 0.0)" in merge_table.report(reports["exact"])


# ---- per-layer sparsity ----------------------------------------------------------------------


def sparse_parents(problem, seed=5):
    """Zero a random share (a different one per parent and layer) of every prunable weight."""
    g = torch.Generator().manual_seed(seed)
    for genome in problem.parents.values():
        for slot in problem.prunable_slots:
            w = genome[slot.offset : slot.stop]
            share = float(torch.rand(1, generator=g)) * 0.8
            w.masked_fill_(torch.rand(w.shape, generator=g) < share, 0.0)


def test_step_records_hold_the_exact_sparsity_of_each_layer_of_the_child(tmp_path, based_problem):
    problem = based_problem
    sparse_parents(problem)
    children = []
    evaluate = problem.evaluate

    def capture(genome):
        children.append(genome.detach().clone())
        return evaluate(genome)

    problem.evaluate = capture
    evolve(
        tmp_path,
        problem,
        SparsityAwareScorer(beta=1.0),
        pop_size=3,
        iterations=4,
        log_layer_sparsity=True,
    )
    steps = records(tmp_path)
    layers = {layer.name: layer.param_name for layer in prunable_layers(problem.model)}
    assert len(layers) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    space = problem.space
    for rec in steps:
        child = children[2 + rec["step"]]  # after the two parents' evaluations
        per_layer = rec["layer_sparsity"]
        assert list(per_layer) == list(layers)  # one entry per prunable layer, in model order
        for name, value in per_layer.items():
            w = space.view(child, layers[name])
            assert value == int((w == 0).sum()) / w.numel()
        space.load(child)
        reference = measure_sparsity(problem.model)
        assert reference.layers == per_layer  # the names and values of measure_sparsity
        # the overall sparsity is the count-weighted mean of the layers'
        sizes = {name: space.slot(param).numel for name, param in layers.items()}
        weighted = sum(per_layer[n] * sizes[n] for n in layers) / sum(sizes.values())
        assert rec["child_sparsity"] == pytest.approx(weighted, abs=1e-12)
        assert rec["child_sparsity"] == reference.overall
        assert rec["layer_sparsity_s"] >= 0.0
    assert len({round(v, 6) for rec in steps for v in rec["layer_sparsity"].values()}) > 5
    path = layer_sparsity_heatmap(tmp_path / "log.jsonl", tmp_path / "layers.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fused_experts_give_a_row_per_expert():
    dense = Slot("mlp.down.weight", 0, torch.Size([2, 3]))
    experts = Slot("mlp.experts.weight", 6, torch.Size([3, 2, 4]))  # [experts, out, in]
    genome = torch.ones(6 + 24)
    genome[0:3] = 0.0  # half of the dense matrix
    view = genome[6:].view(3, 2, 4)
    view[0, 0, :2] = 0.0  # expert 0: 2 of 8
    view[2] = 0.0  # expert 2: all
    assert slots_layer_sparsity(genome, [dense, experts]) == {
        "mlp.down.weight": 0.5,
        "mlp.experts.weight[0]": 0.25,
        "mlp.experts.weight[1]": 0.0,
        "mlp.experts.weight[2]": 1.0,
    }
    assert slots_sparsity(genome, [dense, experts]) == (3 + 2 + 8) / 30
    named = slots_layer_sparsity(genome, [dense, experts], ["mlp.down", "mlp.experts.up_proj"])
    assert list(named) == ["mlp.down", *(f"mlp.experts.up_proj[{e}]" for e in range(3))]


def test_layer_sparsity_goes_to_wandb_as_one_scalar_per_layer(tmp_path):
    class Sink:  # a WandbSink stand-in: what would be sent
        def __init__(self):
            self.sent = []

        def start(self, run_dir, config):
            pass

        def log(self, metrics, step):
            self.sent.append((dict(metrics), step))

        def close(self):
            pass

    sink = Sink()
    logger = RunLogger(wandb=sink, console=False).start(tmp_path)
    layers = {"model.layers.0.mlp.up_proj.weight": 0.5, "e.weight[1]": 0.25}
    logger.log({"event": "step", "child_sparsity": 0.4, "layer_sparsity": layers, "x": [1]}, 7)
    logger.close()
    metrics, step = sink.sent[0]
    assert step == 7
    assert metrics == {
        "step": 7,
        "child_sparsity": 0.4,
        "layer_sparsity/model.layers.0.mlp.up_proj.weight": 0.5,
        "layer_sparsity/e.weight[1]": 0.25,
    }
