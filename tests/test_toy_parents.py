"""The toy parents: cached by config, safe under concurrent processes, skills that differ."""

import multiprocessing as mp

import pytest

from sparse_merge.models.hf import load_causal_lm, load_tokenizer
from sparse_merge.models.toy import ToyZoo
from sparse_merge.tasks.toy import AdditionTask, ReversalTask

from .conftest import ROOT, small_zoo


def _zoo(cache, steps=(20, 10), arch=None):
    return small_zoo(
        cache,
        "t",
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
    """The default zoo (conf/model/toy.yaml, trained here from scratch, ~2 min): each child
    clearly wins its own skill (its comment: math 0.89-0.91 / 0, code 0.32-0.44 /
    0.97-0.99)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    zoo = instantiate(OmegaConf.load(ROOT / "conf" / "model" / "toy.yaml"), cache_dir=tmp_path)
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


def test_child_replay_is_checked_and_part_of_the_cache_key(tmp_path):
    from sparse_merge.errors import ConfigError

    zoo = _zoo(tmp_path)
    replay = ToyZoo(
        "t", str(tmp_path), zoo.base_skills, zoo.children, zoo.arch, 20, 10, 8, child_replay=0.5
    )
    assert replay.root != zoo.root
    with pytest.raises(ConfigError, match="child_replay"):
        ToyZoo("t", str(tmp_path), zoo.base_skills, zoo.children, child_replay=1.0)


def test_train_lm_mixes_skills_by_weight(tokenizer, monkeypatch):
    import sparse_merge.models.toy as toy

    seen = []
    encode = toy.encode_examples
    monkeypatch.setattr(toy, "encode_examples", lambda tok, ex: seen.extend(ex) or encode(tok, ex))
    model = toy.toy_llama(tokenizer, hidden_size=32, intermediate_size=64)
    skills = [
        AdditionTask(1, 1, n_select=0, n_heldout=0),
        ReversalTask(1, 3, n_select=0, n_heldout=0),
    ]
    toy.train_lm(model, tokenizer, skills, 3, 1e-3, 8, 0, "t", weights=[1.0, 0.0])
    assert len(seen) == 24 and not any(e.prompt.startswith("rev:") for e in seen)
    seen.clear()
    toy.train_lm(model, tokenizer, skills, 3, 1e-3, 8, 0, "t")  # uniform: both skills
    assert any(e.prompt.startswith("rev:") for e in seen) and any("+" in e.prompt for e in seen)


@pytest.mark.slow  # trains the default toy zoo once (about 2 minutes), cached with python run.py
def test_default_zoo_has_skills_to_combine():
    """conf/model/toy.yaml: the base knows neither hard skill, each child learns its own, and
    task arithmetic (math at 0.5, code at 1) beats both children on the mean."""
    from pathlib import Path

    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from sparse_merge.models.hf import load_genome
    from sparse_merge.models.paramspace import ParamSpace

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / "toy.yaml")
    cfg.cache_dir = str(Path("~/.cache/sparse_merge").expanduser())
    zoo = instantiate(cfg)
    tok = load_tokenizer(zoo.tokenizer())
    add = AdditionTask(2, 2, n_select=0, n_heldout=256)
    rev = ReversalTask(4, 6, n_select=0, n_heldout=256)
    space = ParamSpace(load_causal_lm(zoo.base()))
    base = space.genome()
    g = {n: load_genome(space, p) for n, p in zoo.parents().items()}

    def acc(genome: torch.Tensor) -> tuple[float, float]:
        model = space.load(genome)
        return tuple(float(t.heldout.score(model, tok).float().mean()) for t in (add, rev))

    b, m, c = acc(base), acc(g["math"]), acc(g["code"])
    ta = acc(base + 0.5 * (g["math"] - base) + (g["code"] - base))
    assert b[0] < 0.5 and b[1] < 0.1  # the base: neither hard skill
    assert m[0] > b[0] + 0.3 and c[1] > b[1] + 0.8  # each child learns its own
    assert sum(ta) > max(sum(m), sum(c)) + 0.05  # a merge with both skills beats both
