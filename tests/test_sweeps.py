"""Every sweep in conf/experiment/ composes for every value of its grid, with readable lists."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sparse_merge.config import GROUPS, check_target_keys

from .conftest import CONF_DIR, compose_cfg

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
