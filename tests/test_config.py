"""Every option of every group composes and instantiates; bad values fail with one clear line."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import open_dict

from sparse_merge.app import execute
from sparse_merge.config import GROUPS, check_target_keys, validate
from sparse_merge.errors import ConfigError

from .conftest import CONF_DIR, compose_cfg

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = [
    (group, p.stem) for group in GROUPS for p in sorted((Path(CONF_DIR) / group).glob("*.yaml"))
]
# options whose YAML leaves a required value for the user to fill in
REQUIRED = {
    ("model", "hf"): ["model.base=/models/base", "+model.parents={a: /models/a, b: /models/b}"]
}
EXPERIMENTS = [p.stem for p in sorted((Path(CONF_DIR) / "experiment").glob("*.yaml"))]


def test_every_group_has_options():
    assert {g for g, _ in OPTIONS} == set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_option_composes_and_matches_its_target(group, option, tmp_path):
    cfg = compose_cfg([f"{group}={option}"], tmp_path)
    check_target_keys(cfg[group], group)  # keys are parameters of the target


@pytest.mark.parametrize(
    ("group", "option"),
    [o for o in OPTIONS if o not in {("hardware", "gpu"), ("hardware", "slurm")}],
)
def test_every_option_instantiates(group, option, tmp_path):
    cfg = compose_cfg([f"{group}={option}", *REQUIRED.get((group, option), [])], tmp_path)
    assert instantiate(cfg[group], _convert_="all") is not None


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment, tmp_path):
    cfg = compose_cfg([f"experiment={experiment}"], tmp_path)
    for group in GROUPS:
        check_target_keys(cfg[group], group)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("sparsity=1.5", "sparsity"),
        ("sparsity=-0.1", "sparsity"),
        ("hardware.device=tpu", "hardware.device"),
        ("pipeline=nope", "pipeline"),
        ("evolver.pop_size=1", "evolver.pop_size"),
        ("evolver.prune_target=both", "evolver.prune_target"),
        ("search=task_vectors search.groups=layer", "search.groups"),
        ("baselines=classic baselines.budget=0", "baselines.budget"),
        ("baselines=classic +baselines.methods.ties.grid.dens=[1]", "baselines.methods.ties.grid"),
        ("evolver=one_shot evolver.split=2", "evolver.split"),
        ("evolver=one_shot evolver.weights=[nan,0.5]", "evolver.weights"),
    ],
)
def test_bad_values_raise_config_error_before_any_model(override, key, tmp_path):
    cfg = compose_cfg([*override.split(), f"model.cache_dir={tmp_path}/cache"], tmp_path)
    with pytest.raises(ConfigError) as err:
        execute(cfg)
    assert err.value.key == key
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # nothing built


def test_unknown_key_in_a_group_file_is_reported(tmp_path):
    cfg = compose_cfg([], tmp_path)
    with open_dict(cfg):
        cfg.pruner.granularty = "row"
    with pytest.raises(ConfigError, match=r"pruner\.granularty.*granularity"):
        execute(cfg)


@pytest.mark.parametrize("experiment", ["smoke", "finetune_smoke"])
def test_smoke_experiments_take_any_task(experiment, tmp_path):
    small = compose_cfg([f"experiment={experiment}"], tmp_path)
    assert small.task.tasks.addition.n_heldout == 16  # the toy tasks, sized down
    cfg = compose_cfg([f"experiment={experiment}", "task=gsm8k"], tmp_path)
    assert list(cfg.task.tasks) == ["gsm8k"]
    validate(cfg)


@pytest.mark.parametrize("task", ["gsm8k", "mbpp", "humaneval", "boolq", "wikitext", "python_docs"])
def test_benchmark_keys_are_checked_through_to_the_base_class(task, tmp_path):
    cfg = compose_cfg([f"task={task}"], tmp_path)
    name = next(iter(cfg.task.tasks))
    with open_dict(cfg):
        cfg.task.tasks[name].n_heldout = 7  # a key of DatasetBenchmark, taken via **kwargs
    validate(cfg)
    with open_dict(cfg):
        cfg.task.tasks[name].n_heldot = 7
    with pytest.raises(ConfigError, match=r"n_heldot.*n_heldout"):
        validate(cfg)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["sparsity=1.5"], "sparsity=1.5 is not allowed: a fraction in [0, 1)"),
        (["sparsty=0.5"], "Key 'sparsty' not in 'Config'"),
        (["hardware.device=tpu"], "hardware.device='tpu' is not allowed"),
    ],
)
def test_cli_exits_nonzero_with_a_clear_line(args, needle):
    proc = subprocess.run(
        [sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cfg_job_prints_composed_config():
    proc = subprocess.run(
        [sys.executable, "run.py", "--cfg", "job"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    assert "sparsity: 0.5" in proc.stdout and "pruner:" in proc.stdout


def test_hf_parents_are_given_on_the_command_line_as_the_docs_show():
    cfg = compose_cfg(["model=hf", "model.base=/m/base", "model.parents={math: /m/a, code: /m/b}"])
    source = instantiate(cfg.model, _convert_="all")
    assert source.parents() == {"math": "/m/a", "code": "/m/b"}
    assert source.base() == "/m/base"
