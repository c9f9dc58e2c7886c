"""`make help` lists every target that has a description."""

import re
import shutil
import subprocess

import pytest

from .conftest import ROOT


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_help_lists_every_described_target():
    """Targets with digits in their names (smollm2-masks, ...) were left out of the list."""
    described = re.findall(r"^([^\s:]+):.*## ", (ROOT / "Makefile").read_text(), re.M)
    assert {"smollm2-masks", "smollm2-finetune", "smollm2-experts", "smollm2-merge"} <= set(
        described
    )
    shown = subprocess.run(
        ["make", "-s", "--no-print-directory", "help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert [line.split()[0] for line in shown.splitlines()] == described
