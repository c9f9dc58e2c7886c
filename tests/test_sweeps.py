"""Every sweep in conf/experiment/ composes for every value of its grid, with readable lists."""

import shutil
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sparse_merge.config import GROUPS, check_target_keys

from .conftest import CONF_DIR, ROOT, compose_cfg

SWEEPS = {
    p.stem: OmegaConf.load(p).hydra.sweeper.params
    for p in sorted((Path(CONF_DIR) / "experiment").glob("*.yaml"))
    if OmegaConf.select(OmegaConf.load(p), "hydra.sweeper.params") is not None
}


def test_the_standard_grids_exist():
    assert {"sweep_finetune", "sweep_evolution", "sweep_masks", "report_grid"} <= set(SWEEPS)


@pytest.mark.parametrize(
    ("experiment", "key", "value"),
    [
        (name, key, value)
        for name, params in SWEEPS.items()
        for key, values in params.items()
        for value in str(values).split(",")
    ],
)
def test_every_grid_value_composes(experiment, key, value, tmp_path):
    cfg = compose_cfg([f"experiment={experiment}", f"{key}={value}"], tmp_path)
    for group in GROUPS:
        check_target_keys(cfg[group], group)
    if key == "sparsity":
        assert repr(cfg.sparsity) == value  # written out exactly, no float drift


def test_sparsity_grids_are_explicit_lists():
    sweep = SWEEPS["sweep_finetune"]
    assert str(sweep.sparsity) == "0.0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize(
    ("target", "dir_var"),
    [
        ("sweep", "SWEEP_DIR"),
        ("report", "REPORT_DIR"),
        ("compare", "COMPARE_DIR"),
        ("repeat", "REPEAT_DIR"),
    ],
)
def test_a_sweep_with_a_failed_job_is_still_tabulated(target, dir_var, tmp_path):
    """A job that fails or is refused makes run.py exit non-zero once every job ran: the make
    target still runs the analysis (which lists failed runs), then fails with that status."""
    calls = tmp_path / "calls"
    python = tmp_path / "python"  # run.py fails as a sweep with a refused job does (exit 2)
    python.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n[ "$1" = run.py ] && exit 2\nexit 0\n')
    python.chmod(0o755)
    stamp = tmp_path / "installed"
    stamp.touch()  # newer than pyproject.toml: nothing is installed
    proc = subprocess.run(
        ["make", target, f"PY={python}", f"STAMP={stamp}", f"{dir_var}={tmp_path / 'sweep'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0  # the sweep's failure is still the target's
    ran = calls.read_text().splitlines()
    assert ran[0].startswith("run.py -m ") and "sparse_merge.analysis" in ran[1]
