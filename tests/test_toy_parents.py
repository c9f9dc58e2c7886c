"""The toy parents: cached by config, safe under concurrent processes, skills that differ."""

import multiprocessing as mp

import pytest

from sparse_merge.models.hf import load_causal_lm, load_tokenizer
from sparse_merge.models.toy import ToyZoo
from sparse_merge.tasks.toy import AdditionTask, ReversalTask


def _zoo(cache, steps=(20, 10), arch=None):
    return ToyZoo(
        "t",
        str(cache),
        base_skills={
            "a": AdditionTask(1, 1, n_select=0, n_heldout=0),
            "r": ReversalTask(1, 3, n_select=0, n_heldout=0),
        },
        children={
            "math": AdditionTask(2, 2, n_select=0, n_heldout=0),
            "code": ReversalTask(4, 6, n_select=0, n_heldout=0),
        },
        arch=arch or {"hidden_size": 32, "intermediate_size": 64},
        base_steps=steps[0],
        child_steps=steps[1],
        batch_size=8,
    )


def _ensure(cache):
    _zoo(cache).ensure()


def test_cache_key_follows_config(tmp_path):
    assert _zoo(tmp_path).root == _zoo(tmp_path).root
    assert _zoo(tmp_path).root != _zoo(tmp_path, steps=(21, 10)).root


def test_two_processes_train_once(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ensure, args=(tmp_path,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    root = _zoo(tmp_path).root
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["base", "code", "math"]
    assert not [
        p for p in root.iterdir() if p.name.startswith(".") and p.name != ".lock"
    ]  # no leftovers


@pytest.mark.slow
def test_default_children_beat_each_other_on_their_own_task(tmp_path):
    """Parents of the easy-skills base (the fine-tuning experiment's zoo, conf/model/toy.yaml
    sizes): each child clearly wins its own skill."""
    zoo = _zoo(tmp_path, steps=(1500, 800), arch={"hidden_size": 128, "intermediate_size": 256})
    tok = load_tokenizer(zoo.tokenizer())
    add, rev = (
        AdditionTask(2, 2, n_select=0, n_heldout=256),
        ReversalTask(4, 6, n_select=0, n_heldout=256),
    )
    acc = {}
    for name, path in zoo.parents().items():
        model = load_causal_lm(path)
        acc[name] = (
            add.heldout.score(model, tok).float().mean(),
            rev.heldout.score(model, tok).float().mean(),
        )
    assert acc["math"][0] > acc["code"][0] + 0.3
    assert acc["code"][1] > acc["math"][1] + 0.3
