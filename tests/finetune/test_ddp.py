"""Data parallel on CPU: ``accelerate launch`` with 2 processes (gloo) ends with identical
weights in both processes, equal to one process training on the same global batch.

``--multi_gpu`` only makes the launcher start the processes through torchrun; the trainer's
``Accelerator(cpu=True)`` then joins them on the gloo backend, no GPU needed.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from .ddp_worker import train

ROOT = Path(__file__).resolve().parents[2]


def _launch(out: Path, worker: str = "ddp_worker.py") -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate is not None, "the accelerate CLI is installed next to python"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    cmd += [str(Path(__file__).with_name(worker)), str(out)]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


# two fresh Python processes importing torch/transformers: about 15 s
def test_two_cpu_processes_end_with_identical_weights(tmp_path):
    proc = _launch(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{k}.pt") for k in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    a, b = ranks[0]["weights"], ranks[1]["weights"]
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)

    # the same 4 steps in one process on the same global batch (2 x 4 examples)
    threads = torch.get_num_threads()
    try:
        single, _ = train(batch_size=8)
    finally:
        torch.set_num_threads(threads)
    assert a.keys() == single.keys()
    for n in a:
        torch.testing.assert_close(a[n], single[n], rtol=1e-3, atol=1e-5)
    assert any(not torch.equal(single[n], torch.zeros_like(single[n])) for n in a if "lora_B" in n)


# two fresh Python processes, three short trainings each: about 20 s
def test_a_two_process_resume_with_dropout_ends_where_the_uninterrupted_run_ends(tmp_path):
    """Every process's RNG state is checkpointed and restored: with dropout, a 2-process run
    stopped after step 3 and resumed ends with the uninterrupted run's weights on every rank
    (only the main process's state was restored: rank 1 drew other dropout masks after the
    resume, and the averaged gradients moved both ranks' weights)."""
    proc = _launch(tmp_path, "ddp_resume_worker.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for k in range(2):
        rank = torch.load(tmp_path / f"rank{k}.pt")
        assert rank["world"] == 2
        whole, resumed = rank["whole"], rank["resumed"]
        assert whole.keys() == resumed.keys()
        assert all(torch.equal(whole[n], resumed[n]) for n in whole), f"rank {k}"
