"""The run directory's hygiene: one process at a time (an exclusive lock the main process holds
for the whole run), and what killed runs left behind (temporary files of atomic writes) removed
on resume, real files untouched."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sparse_merge.analysis.collect import find_runs, load_run
from sparse_merge.app import execute, run
from sparse_merge.evolution.natural_niches import NaturalNiches
from sparse_merge.evolution.scoring import SparsityAwareScorer
from sparse_merge.tracking.io import (
    RUN_LOCK,
    RunDirBusy,
    is_main_process,
    lock_run_dir,
    remove_temp_files,
    temp_affixes,
    write_atomic,
    write_atomic_dir,
)

from .conftest import compose_cfg
from .evolution.linear_problem import LinearProblem

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}

HOLD = """
import sys
from sparse_merge.tracking.io import lock_run_dir
with lock_run_dir(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # holds the lock until the test closes stdin (or kills it)
"""


def _hold(run_dir: Path) -> subprocess.Popen:
    """Another process, returned once it holds the lock of ``run_dir`` (no race: it says so)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)],
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def held(tmp_path):
    """``tmp_path/run`` locked by another process (which holds it until the test ends)."""
    run_dir = tmp_path / "run"
    proc = _hold(run_dir)
    yield run_dir, proc
    if proc.poll() is None:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_a_second_process_stops_at_once_naming_the_folder(held):
    run_dir, _ = held
    began = time.monotonic()
    with pytest.raises(RunDirBusy) as err, lock_run_dir(run_dir):
        pytest.fail("two processes hold one run directory")
    assert time.monotonic() - began < 5  # no waiting for the holder (it never lets go)
    message = str(err.value)
    assert "\n" not in message and f"another process is running in {run_dir}" in message
    assert err.value.key == "output_dir"


def test_the_lock_is_free_again_when_its_holder_ends_or_is_killed(held):
    run_dir, proc = held
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0
    with lock_run_dir(run_dir):
        pass
    again = _hold(run_dir)
    again.send_signal(signal.SIGKILL)  # no clean-up of any kind
    again.wait(timeout=30)
    with lock_run_dir(run_dir):
        pass


def test_other_processes_of_a_run_take_no_lock_and_never_wait(held, tmp_path):
    run_dir, _ = held
    with lock_run_dir(run_dir, main=False):  # a non-main rank while the main one holds it
        pass
    fresh = tmp_path / "fresh"
    with lock_run_dir(fresh, main=False):
        pass
    assert not fresh.exists()  # not even a lock file


@pytest.mark.parametrize(
    ("env", "main"),
    [({}, True), ({"RANK": "0"}, True), ({"RANK": "1"}, False), ({"PMI_RANK": "3"}, False)],
)
def test_the_main_process_is_rank_0_of_a_launch(monkeypatch, env, main):
    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert is_main_process() is main


# two fresh Python processes under accelerate launch (gloo on CPU): about 10 s
def test_a_two_process_run_takes_one_lock_and_finishes(tmp_path):
    """Were the second process to take the lock too, one of the two would stop."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate is not None, "the accelerate CLI is installed next to python"
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    cmd += [str(ROOT / "run.py"), "experiment=finetune_smoke", "hardware.num_threads=1"]
    cmd += [f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**ENV, "SPARSE_MERGE_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["processes"] == 2 and (tmp_path / "run" / RUN_LOCK).exists()


def test_the_lock_is_reentrant_in_a_process(tmp_path):
    with lock_run_dir(tmp_path / "run"), lock_run_dir(Path(str(tmp_path / "run") + "/")):
        pass  # the app and a pipeline may both hold it
    with lock_run_dir(tmp_path / "run"):
        pass  # and it was released


@pytest.mark.parametrize("experiment", ["finetune_smoke", "smoke"])
def test_a_run_in_a_busy_folder_is_refused_with_one_line(held, experiment, capsys):
    run_dir, _ = held
    cfg = compose_cfg([f"experiment={experiment}", "hardware.num_threads=1"], run_dir.parent)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exit_:
            run(cfg)
    finally:
        torch.set_num_threads(threads)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"another process is running in {run_dir}" in lines[0]
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "checkpoint.pt").exists()


def test_the_lock_file_leaves_run_collection_alone(tmp_path):
    cfg = compose_cfg(["experiment=finetune_smoke", "hardware.num_threads=1"], tmp_path)
    threads = torch.get_num_threads()
    try:
        execute(cfg)
    finally:
        torch.set_num_threads(threads)
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # what Hydra writes for a job
    assert (run_dir / RUN_LOCK).exists()
    assert find_runs(tmp_path) == [run_dir]
    row = load_run(run_dir, tmp_path)
    assert row["status"] == "finished" and row["metric/accuracy"] is not None
    assert remove_temp_files(run_dir) == [] and (run_dir / RUN_LOCK).exists()


KILLED_WRITE = """
import os, sys
from pathlib import Path
from sparse_merge.tracking.io import write_atomic, write_atomic_dir

def die(tmp):
    (tmp / "weights" if tmp.is_dir() else tmp).write_bytes(b"half")
    os._exit(9)  # killed mid-write

run = Path(sys.argv[1])
write = write_atomic_dir if sys.argv[2] == "dir" else write_atomic
write(run / sys.argv[3], die)
"""


def test_what_a_killed_write_leaves_is_recognised_and_removed(tmp_path):
    run_dir = tmp_path / "run"
    write_atomic(run_dir / "results.json", lambda tmp: tmp.write_text("{}"))
    write_atomic_dir(run_dir / "models" / "best", lambda tmp: (tmp / "w").write_text("w"))
    for kind, target in [("file", "checkpoint.pt"), ("dir", "models/best"), ("file", "x.json")]:
        cmd = [sys.executable, "-c", KILLED_WRITE, str(run_dir), kind, target]
        assert subprocess.run(cmd, env=ENV).returncode == 9
    left = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob(".*.tmp"))
    assert [Path(p).name.split(".")[1] for p in left] == ["checkpoint", "x", "best"]
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("a: 1\n")
    (run_dir / ".keep").write_text("mine")
    with lock_run_dir(run_dir):
        removed = remove_temp_files(run_dir)
    assert sorted(p.relative_to(run_dir).as_posix() for p in removed) == left
    assert not list(run_dir.rglob(".*.tmp"))
    assert (run_dir / "results.json").read_text() == "{}"
    assert (run_dir / "models" / "best" / "w").read_text() == "w"
    assert (run_dir / ".keep").exists() and (run_dir / ".hydra" / "config.yaml").exists()
    assert (run_dir / RUN_LOCK).exists()


def test_an_evolution_resume_removes_what_a_killed_run_was_writing(tmp_path):
    def evolve(resume):
        engine = NaturalNiches(pop_size=6, iterations=10, checkpoint_every=5, archive="disk")
        problem, scorer = LinearProblem(), SparsityAwareScorer(alpha=1.0)
        return engine.evolve(problem, scorer, seed=3, run_dir=tmp_path, resume=resume)

    evolve(resume=False)
    planted = [Path(tempfile.mkstemp(**temp_affixes(tmp_path / "checkpoint.pt"))[1])]
    planted.append(Path(tempfile.mkstemp(**temp_affixes(tmp_path / "lineage.json"))[1]))
    (tmp_path / "models").mkdir()
    planted.append(Path(tempfile.mkdtemp(**temp_affixes(tmp_path / "models" / "best"))))
    (planted[-1] / "model.safetensors").write_bytes(b"half")
    (tmp_path / "models" / "best").mkdir()
    (tmp_path / "models" / "best" / "config.json").write_text("{}")
    genomes = sorted((tmp_path / "archive").iterdir())
    before = {p: p.read_bytes() for p in genomes}

    evolve(resume=True)
    assert [p for p in planted if p.exists()] == []
    assert (tmp_path / "models" / "best" / "config.json").read_text() == "{}"
    assert {p: p.read_bytes() for p in sorted((tmp_path / "archive").iterdir())} == before
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 10
