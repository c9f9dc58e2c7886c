"""Data-parallel scoring: shards cover the datapoints in order; 2 gloo processes give the
single-process scores."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from sparse_merge.evolution.distributed import ShardedScorer, shard_bounds

from .dist_score_script import suite

ROOT = Path(__file__).resolve().parents[2]


def test_shard_bounds_cover_in_order():
    assert [shard_bounds(7, r, 2) for r in range(2)] == [(0, 3), (3, 7)]
    assert [shard_bounds(5, r, 3) for r in range(3)] == [(0, 1), (1, 3), (3, 5)]
    assert [shard_bounds(1, r, 2) for r in range(2)] == [(0, 0), (0, 1)]


def test_rank_shards_concatenate_to_every_task():
    tasks = suite()
    scorers = [ShardedScorer(tasks, rank=r, world=3) for r in range(3)]
    for i, task in enumerate(scorers[0].tasks):
        joined = [e for s in scorers for e in s.shards[i].examples]
        assert joined == list(task.examples)


# two fresh Python processes importing torch/transformers: about 15 s
def test_two_gloo_processes_score_like_one(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate is not None, "the accelerate CLI is installed next to python"
    out = tmp_path / "scores.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    # --multi_gpu only makes the launcher use torchrun; the scorer joins on gloo without a GPU
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    cmd += [str(Path(__file__).with_name("dist_score_script.py")), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2
    assert res["sharded"] == res["single"]
    assert 0 < sum(res["single"]) < len(res["single"])  # mixed scores: order matters
    assert res["heldout_sharded"] == res["heldout_single"]
    assert 0 < res["heldout_single"]["mean"] < 1


# a 1-process run, then the same run under a 2-process launch: about 25 s
def test_merge_run_under_two_processes_reports_what_one_process_reports(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    args = ["experiment=smoke", "evolver.iterations=4", f"model.cache_dir={tmp_path}/cache"]
    args += ["save_models=false"]
    results = {}
    for procs in (1, 2):
        out = tmp_path / f"run{procs}"
        cmd = [sys.executable] if procs == 1 else [accelerate, "launch", "--multi_gpu"]
        if procs == 2:
            cmd += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
            cmd += ["--dynamo_backend", "no", "--main_process_port", "0"]
        cmd += ["run.py", *args, f"hydra.run.dir={out}"]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[procs] = json.loads((out / "results.json").read_text())
    assert results[2]["models"] == results[1]["models"]
    assert results[2]["archive"] == results[1]["archive"]


def test_every_task_type_shards_all_it_indexes_by_datapoint():
    """A function task's tests, a dataset task's rows, a choice task's items, a corpus task's
    texts and an lm-eval task's documents split with its examples (only ``examples`` was
    sliced: rank 1 judged its prompts against rank 0's tests, and dataset tasks crashed)."""
    from sparse_merge.evolution.distributed import shard_task
    from sparse_merge.tasks.base import Example
    from sparse_merge.tasks.choice import Choice, MultipleChoiceTask
    from sparse_merge.tasks.corpus import CorpusTask
    from sparse_merge.tasks.gsm8k import GSM8KTask
    from sparse_merge.tasks.skills import FunctionTask

    examples = [Example(f"# f{i}\ndef f(x):\n    return", f" x + {i}") for i in range(7)]
    tests = [[f"assert f(1) == {1 + i}"] for i in range(7)]
    functions = FunctionTask("f", examples, tests, sandbox=None, max_new_tokens=8, batch_size=4)
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(7)]
    gsm = GSM8KTask("g", rows, [])
    gsm.examples = tuple(examples)  # as the dataset benchmarks attach them
    items = [Choice(f"c{i}", ("a", "b"), 0) for i in range(7)]
    tasks = [
        functions,
        gsm,
        MultipleChoiceTask("m", items),
        CorpusTask("c", [f"t{i}" for i in range(7)]),
    ]
    for task in tasks:
        for rank, (lo, hi) in enumerate([(0, 3), (3, 7)]):
            sub = shard_task(task, rank, 2)
            assert sub is not None and len(sub) == hi - lo, type(task).__name__
    rank1 = shard_task(functions, 1, 2)
    assert [t[0] for t in rank1.tests] == [
        "assert f(1) == 4",
        "assert f(1) == 5",
        "assert f(1) == 6",
        "assert f(1) == 7",
    ]
    assert rank1.examples[0].answer == " x + 3" and len(functions) == 7  # the whole task stays
    assert [r["question"] for r in shard_task(gsm, 1, 2).rows] == ["q3", "q4", "q5", "q6"]
    assert shard_task(object.__new__(type("Opaque", (), {"__len__": lambda self: 5})), 0, 2) is None
