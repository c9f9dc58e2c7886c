"""Shared fixtures: composed configs for run(cfg), tiny models built in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from sparse_merge.config import register_configs
from sparse_merge.models.tokenizer import char_tokenizer
from sparse_merge.models.toy import toy_llama

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: one thread is fastest, and steady on shared cores

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")
# the environment of a `python run.py` the tests start: this checkout's package, no hub
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
DIGITS = ["pipeline=digits", "model=digits_mlp", "task=digits", "evolver=map_elites"]  # quick run
register_configs()


def compose_cfg(overrides: list[str], tmp: Path | None = None) -> DictConfig:
    """The config ``python run.py <overrides>`` would run, with outputs and caches under ``tmp``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    if tmp is not None:
        with open_dict(cfg):
            cfg.output_dir = str(tmp / "run")
            if "cache_dir" in cfg.model:
                cfg.model.cache_dir = str(tmp.parent / "model_cache")
            if cfg.masks.get("dense_cache"):
                cfg.masks.dense_cache = str(tmp / "dense_perplexity")
    return cfg


@pytest.fixture(scope="session")
def tokenizer():
    """The character tokenizer."""
    return char_tokenizer()


@pytest.fixture
def tiny_llama(tokenizer):
    """A 2-layer Llama with hidden size 32 (random, seeded)."""
    return toy_llama(tokenizer, seed=0, hidden_size=32, intermediate_size=64)


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    """A directory shared by the whole session (caches of tiny trained models)."""
    return tmp_path_factory.mktemp("session")


def small_zoo(cache: Path, name: str, base_addition: tuple[int, int] = (1, 1), **kwargs):
    """A ``ToyZoo`` of the real zoo's skills at small sizes, cached under ``cache``: the base
    learns addition of ``base_addition`` digits and short reversals, the children longer ones
    (``kwargs``: arch, steps, batch size...)."""
    from sparse_merge.models.toy import ToyZoo
    from sparse_merge.tasks.toy import AdditionTask, ReversalTask

    return ToyZoo(
        name,
        str(cache),
        base_skills={
            "a": AdditionTask(*base_addition, n_select=0, n_heldout=0),
            "r": ReversalTask(1, 3, n_select=0, n_heldout=0),
        },
        children={
            "math": AdditionTask(2, 2, n_select=0, n_heldout=0),
            "code": ReversalTask(4, 6, n_select=0, n_heldout=0),
        },
        **kwargs,
    )


def make_dry_run(*args: str) -> tuple[str, str]:
    """``(launch, analysis)``: the ``run.py -m`` line and the analysis line that ``make -n
    <args>`` prints in the project root. Found by content: under ``make test`` the inner make
    adds lines of its own."""
    import subprocess

    dry = subprocess.run(
        ["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    (launch,) = [line for line in dry if " run.py -m " in line]
    (analysis,) = [line for line in dry if "sparse_merge.analysis" in line]
    # the commands alone, without the shell that keeps the sweep's exit status for the end
    return launch.partition(" || ")[0], analysis.partition(" && ")[0]


def launch_run_py(argv: list[str]) -> None:
    """``python run.py <argv>`` in this process: the same ``hydra.main`` over ``app.run``
    (Hydra's basic launcher runs a multirun's jobs in turn)."""
    import sys

    import hydra

    from sparse_merge.app import register_resolvers, run

    register_resolvers()  # as run.py does: the sweep's job folders are named by ${sm.dirname:...}

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    def main(cfg):
        return run(cfg)

    saved = sys.argv
    GlobalHydra.instance().clear()
    try:
        sys.argv = ["run.py", *argv]
        main()
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()
