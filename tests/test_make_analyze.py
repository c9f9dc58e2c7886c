"""`make analyze` without SWEEP=: which folder it analyses."""

import os
import shutil
import subprocess

import pytest

from .conftest import ROOT


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_analyze_defaults_to_the_newest_sweep_folder(tmp_path):
    """The newest folder holding a sweep's multirun.yaml, not one of its jobs
    (multirun/throughput/<job>), and a report_grid sweep is a sweep like another; make report's
    and make compare's own folders are left out."""
    (tmp_path / "pyproject.toml").touch()
    stamp = tmp_path / "installed"
    stamp.touch()

    def sweep(path, jobs, age):
        for job in jobs:
            (tmp_path / path / job).mkdir(parents=True)
        (tmp_path / path / "multirun.yaml").touch()
        for p in (tmp_path / path, *(tmp_path / path / job for job in jobs)):
            os.utime(p, (age, age))

    def analyzed():
        dry = subprocess.run(
            ["make", "-n", "-f", str(ROOT / "Makefile"), "analyze", f"STAMP={stamp}"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        (line,) = [x for x in dry.splitlines() if "-m sparse_merge.analysis" in x]
        return line.split()[-1]

    sweep("multirun/2026-12-01/10-00-00_sweep_masks", ["0_pruner=wanda"], 1_000)
    sweep("multirun/throughput", ["0_finetune.batch_size=1", "1_finetune.batch_size=2"], 2_000)
    assert analyzed() == "multirun/throughput"
    sweep("multirun/2026-12-02/11-00-00_report_grid", ["0_pruner=random"], 3_000)
    sweep("multirun/report", ["0_pruner=random"], 4_000)  # make report's own
    sweep("multirun/compare", ["0_seed=0"], 4_000)  # make compare's own
    assert analyzed() == "multirun/2026-12-02/11-00-00_report_grid"
