"""Resuming a fine-tuning run (experiment=finetune_smoke through run(cfg)): the checkpoint stores
every setting that shapes the result; a resume with one changed is refused, before the model
loads, naming each changed key with both values; a resume with unchanged settings (or with only
logging, checkpoint or output settings changed) ends exactly where an uninterrupted run ends;
what a killed run was writing is removed on resume."""

import json
import tempfile
from pathlib import Path

import pytest
import torch

import sparse_merge.pipelines.finetune as pipeline
from sparse_merge.app import execute
from sparse_merge.errors import ConfigError
from sparse_merge.finetune.trainer import Trainer
from sparse_merge.tracking.io import load_checked, save_checked, temp_affixes

from ..conftest import compose_cfg

BASE = ["experiment=finetune_smoke", "hardware.num_threads=1"]  # 6 steps, checkpoints at 3, 6


class _Killed(Exception):
    """What stops the first run after step 3 (as a kill would, its checkpoint on disk)."""


def _cfg(tmp, *overrides):
    return compose_cfg([*BASE, *overrides], tmp)


def _state(run_dir):
    return load_checked(run_dir / "checkpoints" / "trainer_state.pt")


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The checkpoint of an uninterrupted run."""
    tmp = tmp_path_factory.mktemp("full")
    threads = torch.get_num_threads()  # hardware.num_threads=1 sets it process-wide
    execute(_cfg(tmp))
    torch.set_num_threads(threads)
    return _state(tmp / "run")


@pytest.fixture
def stopped(tmp_path, monkeypatch):
    """A folder whose run stopped after step 3 of 6."""
    train = Trainer.train

    def train_then_stop(self, *args, **kwargs):
        train(self, *args, **{**kwargs, "stop_at": 3})
        raise _Killed

    with monkeypatch.context() as m:
        m.setattr(Trainer, "train", train_then_stop)
        with pytest.raises(_Killed):
            execute(_cfg(tmp_path))
    assert _state(tmp_path / "run")["step"] == 3
    return tmp_path


def _same_training(state, full):
    assert state["step"] == 6 and state["losses"] == full["losses"]
    assert state["trainable"].keys() == full["trainable"].keys()
    assert all(torch.equal(state["trainable"][n], full["trainable"][n]) for n in full["trainable"])


def test_the_checkpoint_stores_the_settings_that_shape_the_result(full):
    run = full["run"]
    assert run["finetune.lr"] == 0.01 and run["finetune.steps"] == 6 and run["seed"] == 0
    assert run["lora.r"] == 8 and run["lora.mode"] == "sparse_to_dense" and run["sparsity"] == 0.5
    assert run["pruner._target_"].endswith("MagnitudePruner")
    assert run["hardware.dtype"] == "float32" and run["model.name"] == "toy-llama-smoke"
    for free in ("finetune.log_every", "finetune.checkpoint_every", "model.cache_dir"):
        assert free not in run  # a resume may change these
    assert not any(k.startswith(("logger", "hardware.num_threads", "output_dir")) for k in run)


def test_a_resume_with_unchanged_settings_ends_where_an_uninterrupted_run_ends(stopped, full):
    execute(_cfg(stopped, "resume=true"))
    _same_training(_state(stopped / "run"), full)
    results = json.loads((stopped / "run" / "results.json").read_text())
    assert results["steps"] == 6


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["finetune.lr=0.02"], ["finetune.lr=0.01 (now 0.02)"]),
        (["lora.r=4"], ["lora.r=8 (now 4)"]),
        (["lora.mode=sparse_to_sparse"], ["lora.mode='sparse_to_dense' (now 'sparse_to_sparse')"]),
        (["sparsity=0.3"], ["sparsity=0.5 (now 0.3)"]),
        (["finetune.steps=9"], ["finetune.steps=6 (now 9)"]),  # schedule and data depend on it
        (["finetune.steps=2"], ["finetune.steps=6 (now 2)"]),
        (
            ["seed=1"],  # and every key that interpolates it
            [
                "seed=0 (now 1)",
                "lora.init_seed=0 (now 1)",
                "task.tasks.addition.selection_seed=0 (now 1)",
                "task.tasks.reversal.selection_seed=0 (now 1)",
            ],
        ),
        (["pruner.granularity=row"], ["pruner.granularity='layer' (now 'row')"]),
        (["finetune.lr=0.02", "lora.r=4"], ["finetune.lr=0.01 (now 0.02)", "lora.r=8 (now 4)"]),
    ],
)
def test_a_resume_with_changed_settings_is_refused_naming_each(
    stopped, monkeypatch, overrides, named
):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(pipeline, "load_causal_lm", no_model)
    with pytest.raises(ConfigError) as err:
        execute(_cfg(stopped, "resume=true", *overrides))
    message = str(err.value)
    assert err.value.key == "resume" and "\n" not in message
    assert str(stopped / "run" / "checkpoints") in message
    for item in named:
        assert item in message
    assert message.count("(now ") == len(named)  # the unchanged settings are not listed
    assert _state(stopped / "run")["step"] == 3  # the checkpoint is untouched


def test_settings_that_do_not_shape_the_result_may_change(stopped, full):
    changed = ["finetune.log_every=3", "finetune.checkpoint_every=2", "save_models=false"]
    execute(_cfg(stopped, "resume=true", *changed))
    _same_training(_state(stopped / "run"), full)


def test_an_older_checkpoint_without_settings_resumes_with_a_warning(stopped, full, caplog):
    path = stopped / "run" / "checkpoints" / "trainer_state.pt"
    state = load_checked(path)
    del state["run"]
    save_checked(path, state)
    with caplog.at_level("WARNING", logger="sparse_merge"):
        execute(_cfg(stopped, "resume=true"))
    assert "stores no settings" in caplog.text
    _same_training(_state(stopped / "run"), full)


def test_an_older_checkpoint_that_does_not_fit_the_model_is_one_clear_line(stopped):
    path = stopped / "run" / "checkpoints" / "trainer_state.pt"
    state = load_checked(path)
    del state["run"]  # nothing to compare: the tensors themselves tell
    save_checked(path, state)
    with pytest.raises(ValueError, match="does not fit this model's trainable tensors") as err:
        execute(_cfg(stopped, "resume=true", "lora.r=4"))
    assert "\n" not in str(err.value) and "(8, " in str(err.value) and "(4, " in str(err.value)


def test_a_resume_removes_what_a_killed_run_was_writing(stopped, full):
    run = stopped / "run"
    planted = []  # named as the atomic writers name them (write_atomic, write_atomic_dir)
    for target in ("checkpoints/trainer_state.pt", "results.json", "mask_report.json"):
        fd, tmp = tempfile.mkstemp(**temp_affixes(run / target))
        with open(fd, "wb") as f:
            f.write(b"half a file")
        planted.append(Path(tmp))
    for target in ("models/finetuned", "adapter", "masks"):
        (run / target).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(**temp_affixes(run / target)))
        (tmp / "model.safetensors").write_bytes(b"half a model")
        planted.append(tmp)
    keep = {run / "notes.tmp": b"mine", run / ".keep": b"mine too", run / "models" / "x": b"x"}
    for path, data in keep.items():
        path.write_bytes(data)

    execute(_cfg(stopped, "resume=true"))
    assert [p for p in planted if p.exists()] == []
    assert all(path.read_bytes() == data for path, data in keep.items())
    _same_training(_state(run), full)
    assert (run / "models" / "finetuned" / "config.json").exists()


def test_a_resume_with_another_process_count_is_one_line_and_leaves_the_run_as_it_was(
    stopped, monkeypatch
):
    """A checkpoint written by a 2-process launch, resumed by one process: refused before the
    model loads with one line (a ConfigError, not a traceback), and the run folder's status and
    identity are put back as they were (a ValueError left the run marked failed with its
    error)."""
    run = stopped / "run"
    path = run / "checkpoints" / "trainer_state.pt"
    state = load_checked(path)
    state["world_size"] = 2
    save_checked(path, state)
    kept = {name: (run / name).read_bytes() for name in ("status.json", "run_identity.json")}

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the process count was checked")

    monkeypatch.setattr(pipeline, "load_causal_lm", no_model)
    with pytest.raises(ConfigError) as err:
        execute(_cfg(stopped, "resume=true"))
    message = str(err.value)
    assert "\n" not in message and "2 processes (now 1" in message
    assert str(run / "checkpoints") in message
    assert {name: (run / name).read_bytes() for name in kept} == kept
    assert _state(run)["step"] == 3  # the checkpoint is untouched
