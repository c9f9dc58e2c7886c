"""The default job: the evolved best child beats each toy parent and the archive is sparse."""

import json
from pathlib import Path

import pytest
from omegaconf import open_dict

from sparse_merge.app import execute

from ..conftest import compose_cfg


@pytest.mark.slow  # about a minute with cached toy parents (training them first: minutes)
def test_default_run_beats_both_parents_at_the_target_sparsity(tmp_path):
    cfg = compose_cfg(["hardware.num_threads=1", "save_models=false"], tmp_path)
    with open_dict(cfg):  # the toy parents' usual cache, shared with python run.py
        cfg.model.cache_dir = str(Path("~/.cache/sparse_merge").expanduser())
    execute(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    rows = {r["model"]: r for r in results["models"]}
    assert rows["best"]["mean"] > max(rows["math"]["mean"], rows["code"]["mean"])
    assert results["archive_sparsity"] >= 0.8 * results["target_sparsity"]
