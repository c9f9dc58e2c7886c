"""The README's default table (the default run with the classic baselines) is what a fresh
run prints."""

import json
import re
from pathlib import Path

import pytest
from omegaconf import open_dict

from sparse_merge.app import execute

from ..conftest import compose_cfg

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_table() -> dict[str, list[str]]:
    """The rows of the table between the README's ``default-run`` markers, by model name."""
    text = README.read_text()
    block = re.search(r"<!-- default-run -->\s*```\n(.*?)```", text, re.S)
    assert block, "README.md has no default-run table"
    lines = block.group(1).strip().splitlines()
    return {cells[0]: cells[1:] for cells in (line.split() for line in lines[2:])}


@pytest.mark.slow  # about a minute with cached toy parents (training them first: 2 minutes)
def test_readme_default_table_matches_a_fresh_run(tmp_path):
    cfg = compose_cfg(
        ["baselines=classic", "hardware.num_threads=1", "save_models=false"], tmp_path
    )
    with open_dict(cfg):  # the toy parents' usual cache, shared with python run.py
        cfg.model.cache_dir = str(Path("~/.cache/sparse_merge").expanduser())
    execute(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    table = readme_table()
    assert set(table) == {r["model"] for r in results["models"]}
    for row in results["models"]:
        want = [f"{row[k]:.3f}" for k in ("addition", "reversal", "mean", "sparsity")]
        assert table[row["model"]][:4] == want, row["model"]
