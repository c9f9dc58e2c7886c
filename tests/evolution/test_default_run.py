"""The default table (the default run with the classic baselines) is what a fresh run prints,
on the CPU it names: the README's, or another one's in docs/reliability.md."""

import json
import platform
import re
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from sparse_merge.app import execute

from ..conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = (README, ROOT / "docs" / "reliability.md")


def host_cpu() -> str:
    """``<vendor> <torch's CPU capability>`` (``AuthenticAMD AVX512``): what the toy zoo's last
    bits follow. Not the capability alone: an Intel and an AMD CPU, both AVX-512, train the zoo
    to other bits (the BLAS picks its kernels by vendor and model too)."""
    vendor = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"^vendor_id\s*:\s*(\S+)", cpuinfo.read_text(), re.M)
        vendor = found.group(1) if found else vendor
    return f"{vendor} {torch.backends.cpu.get_cpu_capability()}"


def default_tables(path: Path) -> dict[str, dict[str, list[str]]]:
    """The ``<!-- default-run CPU -->`` tables of ``path``: by CPU, the rows by model name."""
    tables = {}
    for cpu, body in re.findall(
        r"<!-- default-run (.+?) -->\s*```\n(.*?)```", path.read_text(), re.S
    ):
        lines = body.strip().splitlines()
        tables[cpu] = {cells[0]: cells[1:] for cells in (line.split() for line in lines[2:])}
    return tables


def test_the_readme_table_names_the_cpu_it_was_made_on():
    """Without its CPU the slow test below would compare every CPU with one CPU's bits."""
    ((cpu, rows),) = default_tables(README).items()
    assert re.fullmatch(r"\S+ (AVX512|AVX2|DEFAULT|ZVECTOR|VSX|SVE\d*)", cpu), cpu
    assert {"base", "math", "code", "best", "sparse", "task_arithmetic", "ties"} <= set(rows)


@pytest.mark.slow  # about a minute with cached toy parents (training them first: 2 minutes)
def test_readme_default_table_matches_a_fresh_run(tmp_path):
    tables, cpu = {c: t for path in DOCS for c, t in default_tables(path).items()}, host_cpu()
    if cpu not in tables:
        pytest.skip(f"default-run tables are given for {', '.join(tables)}; not {cpu}")
    table = tables[cpu]
    cfg = compose_cfg(
        ["baselines=classic", "hardware.num_threads=1", "save_models=false"], tmp_path
    )
    with open_dict(cfg):  # the toy parents' usual cache, shared with python run.py
        cfg.model.cache_dir = str(Path("~/.cache/sparse_merge").expanduser())
    execute(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(table) == {r["model"] for r in results["models"]}
    for row in results["models"]:
        want = [f"{row[k]:.3f}" for k in ("addition", "reversal", "mean", "sparsity")]
        assert table[row["model"]][:4] == want, row["model"]
