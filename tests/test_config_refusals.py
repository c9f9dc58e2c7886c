"""Values that used to fail late (a traceback, or a silently different run) are refused before
any model loads, with one line naming the full config key, the value and what is allowed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_merge.app import build, execute
from sparse_merge.errors import ConfigError
from sparse_merge.evolution.schedules import ConstantSchedule, CyclicSchedule, schedule_values
from sparse_merge.finetune.lora import LoraAdapter
from sparse_merge.pruning.base import accepted_sparsities
from sparse_merge.pruning.magnitude import MagnitudePruner
from sparse_merge.pruning.scored import ScorePruner
from sparse_merge.pruning.wanda import WandaPruner

from .conftest import ROOT, compose_cfg


def refused(overrides: list[str], tmp_path: Path, smoke: bool = True) -> ConfigError:
    """The ``ConfigError`` a run of ``overrides`` (on the seconds-long smoke setup) stops with,
    checked to come before any model was trained, loaded or written."""
    cfg = compose_cfg(
        [*(["experiment=smoke"] if smoke else []), *overrides, f"model.cache_dir={tmp_path}/cache"],
        tmp_path,
    )
    with pytest.raises(ConfigError) as err:
        execute(cfg)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # nothing built
    assert "\n" not in str(err.value)
    return err.value


# ---- 1. a pruner with fixed sparsities (N:M) against the target, the schedule, the search


def test_pruners_declare_the_sparsities_they_accept():
    assert accepted_sparsities(MagnitudePruner()) is None  # any fraction
    assert accepted_sparsities(MagnitudePruner(nm="2:4")) == (0.0, 0.5)
    assert accepted_sparsities(WandaPruner(nm="1:4")) == (0.0, 0.75)
    assert accepted_sparsities(None) is None


@pytest.mark.parametrize(
    "overrides",
    [
        ["pruner=nm"],  # Wanda 2:4 under the default cyclic schedule
        ["pruner=magnitude", "pruner.nm=4:8"],
        ["pruner=nm", "evolver.schedule.low=0.2"],
    ],
)
def test_nm_pruner_refuses_a_schedule_it_cannot_follow(overrides, tmp_path):
    error = refused(overrides, tmp_path)
    assert error.key == "evolver.schedule"
    assert "0 or 0.5" in error.allowed and "pruner.nm=" in error.allowed


def test_nm_pruner_refuses_a_target_it_cannot_reach(tmp_path):
    error = refused(["pruner=nm", "sparsity=0.3", "evolver.schedule=null"], tmp_path)
    assert (error.key, error.value) == ("sparsity", 0.3)
    assert "0 or 0.5" in error.allowed


def test_nm_pruner_refuses_the_task_vector_search(tmp_path):
    error = refused(["pruner=nm", "search=task_vectors", "evolver.schedule=null"], tmp_path)
    assert error.key == "search"


@pytest.mark.parametrize(
    "overrides",
    [
        ["evolver.schedule.low=0.5"],  # constant at the target
        ["evolver.schedule=null"],  # ConstantSchedule at the target
        ["evolver.schedule.period=1"],  # one-step cycles: every step is `high`
        ["evolver.prune_target=none"],  # no pruning in the loop
        ["sparsity=0.0"],  # no pruning at all
    ],
)
def test_nm_pruner_takes_a_schedule_of_allowed_values(overrides, tmp_path):
    cfg = compose_cfg(["experiment=smoke", "pruner=nm", *overrides], tmp_path)
    build(cfg)


def test_schedule_values_are_the_steps_distinct_sparsities():
    for low, period, mult, steps in [(0.0, 10, 1.0, 60), (0.2, 3, 1.5, 37), (0.0, 1, 2.0, 5)]:
        schedule = CyclicSchedule(low, None, period, mult)
        bound = schedule.bind(0.5)
        expected = list(dict.fromkeys(bound(step) for step in range(steps)))
        assert schedule_values(schedule, 0.5, steps) == expected
    assert schedule_values(ConstantSchedule(), 0.5, 60) == [0.5]
    assert schedule_values(CyclicSchedule(low=0.5), 0.5, 10**6) == [0.5]  # cycle by cycle


# ---- 2. LoRA target modules the model does not have


def test_lora_target_modules_checked_on_the_meta_model(tmp_path):
    error = refused(["pipeline=finetune", "lora.target_modules=[q_proj,foo_proj]"], tmp_path)
    assert (error.key, error.value) == ("lora.target_modules", ["q_proj", "foo_proj"])
    assert "foo_proj names none" in error.allowed and "q_proj" in error.allowed
    assert "meta device" in error.allowed


def test_lora_target_modules_checked_from_a_local_models_config(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path / "m")
    cfg = compose_cfg(
        [
            "pipeline=finetune",
            "model=hf",
            f"model.base={tmp_path / 'm'}",
            f"+model.parents={{a: {tmp_path / 'm'}, b: {tmp_path / 'm'}}}",
            "lora.target_modules=[qproj]",
        ],
        tmp_path,
    )
    with pytest.raises(ConfigError, match=r"config\.json") as err:
        build(cfg)
    assert err.value.key == "lora.target_modules"


def test_lora_target_modules_checked_as_the_model_loads_before_pruning(tmp_path, monkeypatch):
    """A model whose config is not cheap to read before it loads (SmolLM2, a hub id) is
    checked right after it loads, before the pruner runs."""
    monkeypatch.setattr("sparse_merge.config.model_arch", lambda source: None)
    pruned = []
    monkeypatch.setattr(ScorePruner, "prune", lambda *args: pruned.append(args))
    cfg = compose_cfg(["experiment=finetune_smoke", "lora.target_modules=[foo_proj]"], tmp_path)
    with pytest.raises(ConfigError, match="loaded model, before pruning") as err:
        execute(cfg)
    assert err.value.key == "lora.target_modules" and not pruned


def test_lora_target_modules_checked_on_a_loaded_model(tiny_llama):
    with pytest.raises(ConfigError, match="loaded model") as err:
        LoraAdapter(target_modules=["foo_proj"]).wrap(tiny_llama, None)
    assert err.value.key == "lora.target_modules"


# ---- 3. task split sizes


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["task.tasks.addition.n_select=0"], "task.tasks.addition.n_select"),  # merge selects
        (["task.tasks.reversal.n_select=-3"], "task.tasks.reversal.n_select"),
        (["task.tasks.addition.n_heldout=0"], "task.tasks.addition.n_heldout"),
        (["pipeline=finetune", "task.tasks.addition.n_select=2.5"], "task.tasks.addition.n_select"),
        (["pipeline=finetune", "task.tasks.addition.n_heldout=0"], "task.tasks.addition.n_heldout"),
        (["+task.tasks.addition.batch_size=0"], "task.tasks.addition.batch_size"),
    ],
)
def test_task_split_sizes_refused_with_their_full_key(overrides, key, tmp_path):
    assert refused(overrides, tmp_path).key == key


def test_fine_tuning_needs_no_selection_split(tmp_path):
    cfg = compose_cfg(["experiment=finetune_smoke"], tmp_path)
    assert cfg.task.tasks.addition.n_select == 0
    build(cfg)


# ---- 4. attention heads that do not divide the hidden size


@pytest.mark.parametrize(
    ("override", "key", "numbers"),
    [
        ("model.arch.num_attention_heads=5", "model.arch.num_attention_heads", ("5", "32")),
        ("model.arch.num_key_value_heads=3", "model.arch.num_key_value_heads", ("3", "4")),
        ("model.arch.hidden_size=30", "model.arch.num_attention_heads", ("4", "30")),
    ],
)
def test_toy_arch_heads_must_divide(override, key, numbers, tmp_path):
    error = refused([override], tmp_path)
    assert error.key == key
    assert all(n in str(error) for n in numbers) and "a divisor of" in error.allowed


# ---- 5. errors inside nested nodes name their full key


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["evolver.schedule.low=2"], "evolver.schedule.low"),
        (["evolver.schedule.period=0"], "evolver.schedule.period"),
        (["evolver.schedule.mult=0.5"], "evolver.schedule.mult"),
        (["task.tasks.reversal.max_len=0"], "task.tasks.reversal.max_len"),
        (["model.children.math.max_digits=12"], "model.children.math.max_digits"),
        (["evolver.pop_size=1"], "evolver.pop_size"),  # the group's own keys as before
    ],
)
def test_nested_errors_name_the_full_key(overrides, key, tmp_path):
    assert refused(overrides, tmp_path).key == key


def test_a_full_key_raised_inside_a_group_is_not_doubled(tmp_path):
    error = refused(["model=smollm2", "model.source=x"], tmp_path, smoke=False)
    assert error.key == "model.source"  # was model.model.source


# ---- the command line: one line, no traceback


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["pruner=nm"], "error: evolver.schedule=CyclicSchedule("),
        (["model.arch.num_attention_heads=5"], "error: model.arch.num_attention_heads=5 is not"),
    ],
)
def test_cli_refuses_with_one_line(args, needle, tmp_path):
    env = {**os.environ, "SPARSE_MERGE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "run.py", "experiment=smoke", *args, f"output_dir={tmp_path}/run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "cache").exists()


# ---- merge methods by their conf/merge names


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["evolver.crossover.method=tie"], "evolver.crossover.method"),
        (["evolver=one_shot", "evolver.method=linera"], "evolver.method"),
        (["search=task_vectors", "search.method=ties_merging"], "search.method"),
        (["evolver.crossover.method=ties", "+evolver.crossover.method.density=0.3"], None),
    ],
)
def test_an_unknown_merge_method_name_is_refused(overrides, key, tmp_path):
    err = refused(overrides, tmp_path)  # key None: a node without _target_ (Hydra's merge)
    assert err.key == (key or "evolver.crossover.method") and "dare_ties" in err.allowed


def test_a_merge_method_is_given_by_its_conf_merge_name(tmp_path):
    """``evolver.crossover.method=ties`` is conf/merge/ties.yaml (it reached the evolver as a
    string and failed after the model loaded)."""
    from sparse_merge.merging.task_arithmetic import TaskArithmetic

    overrides = ["experiment=smoke", "evolver.crossover.method=ties", "search=task_vectors"]
    parts = build(compose_cfg([*overrides, "search.method=dare_ties"], tmp_path))
    method = parts["evolver"].crossover.method
    assert isinstance(method, TaskArithmetic) and method.consensus == "sum"
    assert method.sparsification == "magnitude" and method.density == 0.5
    assert parts["search"].method.sparsification == "random"
    one_shot = build(
        compose_cfg(["experiment=smoke", "evolver=one_shot", "evolver.method=linear"], tmp_path)
    )
    assert type(one_shot["evolver"].method).__name__ == "Linear"


@pytest.mark.parametrize(
    "override,key",
    [
        ("scorer.beta=nan", "scorer.beta"),
        ("scorer.omega=abc", "scorer.omega"),
        ("sparsity=nan", "sparsity"),
        ("scorer.tau=true", "scorer.tau"),
        ("calibration.n=0", "calibration.n"),  # with Wanda it was named pruner.n_calibration
    ],
)
def test_nan_strings_and_bools_are_refused_by_the_range_checks(override, key, tmp_path):
    """NaN passed ``value < 0`` and reached the selection's multinomial after the model loaded;
    a string raised Hydra's TypeError."""
    assert refused([override, "pruner=wanda"], tmp_path).key == key


def test_a_parent_that_is_no_model_is_refused_before_the_first_loads(tmp_path):
    """A parent path that does not exist was taken for a hub id, and a folder without weights
    was found out, only after the first parent had loaded."""
    from sparse_merge.models.source import PretrainedModels

    empty = tmp_path / "empty"
    empty.mkdir()
    for path, allowed in ((tmp_path / "nowhere", "hub id"), (empty, ".safetensors")):
        source = PretrainedModels("m", parents={"a": "org/model", "b": str(path)})
        with pytest.raises(ConfigError, match=allowed) as err:
            source.check()
        assert err.value.key == "model.parents.b"
    PretrainedModels("m", base="HuggingFaceTB/SmolLM2-135M", parents={"a": "x/y", "b": "z"}).check()
