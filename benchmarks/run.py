"""Run the benchmarks: ``python benchmarks/run.py [name ...]`` (``make bench``).

Each ``benchmarks/bench_<name>.py`` defines ``run() -> list[dict]`` (rows of one table). The
rows are printed as a table and written to ``benchmarks/results/<name>.json`` with the machine
they ran on.
"""

from __future__ import annotations

import importlib.util
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from sparse_merge.tracking.io import write_json  # noqa: E402
from sparse_merge.tracking.report import format_table  # noqa: E402


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    return {
        "platform": platform.platform(),
        "cpus": torch.get_num_threads(),
        # the vector instructions torch's kernels use (AVX512, AVX2, ...): fused-loop speeds
        # and the toy models' last bits depend on them
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def main(names: list[str]) -> None:
    files = sorted(HERE.glob("bench_*.py"))
    if names:
        files = [f for f in files if f.stem.removeprefix("bench_") in names]
    for file in files:
        name = file.stem.removeprefix("bench_")
        spec = importlib.util.spec_from_file_location(file.stem, file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        start = time.perf_counter()
        rows = module.run()
        seconds, on = time.perf_counter() - start, machine()
        print(f"\n== {name} ({seconds:.1f} s, {on['cpu_capability']})\n{format_table(rows)}")
        write_json(HERE / "results" / f"{name}.json", {"machine": on, "rows": rows})


if __name__ == "__main__":
    main(sys.argv[1:])
