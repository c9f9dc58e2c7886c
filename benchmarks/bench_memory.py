"""Memory plan against measurement: predicted host peak (``evolution.memory.plan_evolution``)
vs the peak RSS of a real Natural Niches run, per model, population and archive storage; on a
machine with CUDA, also two steps of two Qwen2-1.5B-config models in bfloat16 on the GPU per
storage: step time and peak GPU memory against the plan's.

Each configuration runs in a fresh subprocess, so its peak RSS is its own: the subprocess
imports torch and transformers, measures its idle RSS (the baseline), then builds
the model from its config with random bfloat16 weights on the CPU, two random parents, and runs
2 steps of Natural Niches (magnitude pruning of the parents at 50 %, each child scored by one
forward pass of 2 sequences of 16 tokens through the real model, the archive where the row
says, a checkpoint at the end). ``measured`` is peak RSS minus the baseline, the peak read
from Linux's ``VmHWM`` (``finetune.throughput.PeakRss``), not ``ru_maxrss``, which a process
keeps across ``exec``: launched by a larger process (``make bench`` runs it after the engine
benchmark's SmolLM2 runs), a configuration would read that one's peak as its own. ``error`` is
(predicted - measured) / measured. A configuration the plan says does not fit in this
machine's free memory is not run: it is listed as skipped by the plan (which is the feature).
The GPU rows build the model on the GPU and measure ``torch.cuda.max_memory_allocated`` (what
PyTorch's allocator handed out; its cache and the CUDA context are not in the plan either) and
the mean seconds of a step (``step_s`` of the run's log: crossover, pruning, scoring, storing);
without CUDA they are listed as not measured.

``python benchmarks/run.py memory``; one configuration: ``python benchmarks/bench_memory.py
--one smollm2-135m 8 disk cpu`` (or ``qwen2-1.5b 4 disk cuda``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHIVES = ("device", "cpu", "disk")
# every population and storage on SmolLM2-135M; on Qwen2-0.5B (1 to 2 min a run on 2 cores)
# fewer, up to the largest population, where only the disk archive fits a 24 GB machine; and
# the smallest size users merge, Qwen2-1.5B (~3 min), with the storage that fits one
CONFIGS = [
    *(("smollm2-135m", pop, archive) for pop in (4, 8, 16) for archive in ARCHIVES),
    ("qwen2-0.5b", 4, "device"),
    ("qwen2-0.5b", 4, "disk"),
    ("qwen2-0.5b", 8, "device"),
    *(("qwen2-0.5b", 16, archive) for archive in ARCHIVES),
    ("qwen2-1.5b", 4, "device"),
    ("qwen2-1.5b", 4, "disk"),
]
STEPS = 2
BATCH, LENGTH = 2, 16  # sequences and tokens of the one forward pass that scores a child
# two steps of two Qwen2-1.5B-config models per storage, where there is a GPU
GPU_CONFIGS = [("qwen2-1.5b", 4, archive) for archive in ARCHIVES]
TARGET = 0.5
TIMEOUT_S = 480
GIB = 2**30


def _plan(name: str, pop: int, archive: str, run_dir: str, device: str = "cpu"):
    import torch

    from sparse_merge.evolution.memory import ModelShape, plan_evolution
    from sparse_merge.models.configs import load_config
    from sparse_merge.pruning.magnitude import MagnitudePruner

    return plan_evolution(
        ModelShape.from_config(load_config(name)),
        dtype=torch.bfloat16,
        device=device,
        pop_size=pop,
        archive=archive,
        n_initial=2,
        pruner=MagnitudePruner(),
        target=TARGET,
        prune_target="parents",
        final_prune=True,
        iterations=STEPS,
        eval_batch=BATCH,
        eval_length=LENGTH,
        full_logits=True,
        prune_cache_mb=1024,  # the evolver's default
        prune_sparsities=1,  # a constant schedule
        checkpoint_every=10,
        run_dir=run_dir,
    )


def measure(name: str, pop: int, archive: str, run_dir: str, device: str = "cpu") -> dict:
    """Run one configuration in this process, its model on ``device``; returns baseline and
    peak RSS (bytes), the peak bytes PyTorch allocated on a CUDA device, and the mean seconds
    of a step."""
    import gc

    import torch
    import transformers  # noqa: F401  (part of the idle baseline)
    from transformers import AutoModelForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM  # noqa: F401

    from sparse_merge.evolution.llm import LLMProblem
    from sparse_merge.evolution.natural_niches import NaturalNiches
    from sparse_merge.evolution.schedules import ConstantSchedule
    from sparse_merge.evolution.scoring import SparsityAwareScorer
    from sparse_merge.finetune.throughput import PeakRss
    from sparse_merge.models.configs import load_config
    from sparse_merge.models.paramspace import ParamSpace
    from sparse_merge.models.tokenizer import char_tokenizer
    from sparse_merge.pruning.magnitude import MagnitudePruner
    from sparse_merge.tasks.suite import TaskSuite
    from sparse_merge.tasks.toy import AdditionTask
    from sparse_merge.tracking.logger import RunLogger

    torch.set_num_threads(2)
    config = load_config(name)
    tokenizer = char_tokenizer()
    tasks = TaskSuite({"addition": AdditionTask(1, 1, n_select=BATCH, n_heldout=0)})
    gc.collect()
    rss = PeakRss()
    rss.start()  # the idle RSS, and the high-water mark reset to it
    if rss.start_mb is None:
        raise RuntimeError("no resettable peak RSS (Linux's /proc/self/clear_refs)")
    start = time.perf_counter()

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    space = ParamSpace(model)
    g = torch.Generator(device).manual_seed(1)
    other = torch.empty_like(space.flat)  # [P] a second random model, drawn in chunks
    for s in range(0, other.numel(), 1 << 24):
        other[s : s + (1 << 24)].normal_(0.0, 0.02, generator=g)
    parents = {"a": space.genome(), "b": other}
    ids = torch.randint(0, config.vocab_size, (BATCH, LENGTH), generator=g, device=device)

    @torch.inference_mode()
    def score(model, _tokenizer) -> torch.Tensor:  # [BATCH] mean log-prob of the next tokens
        logits = model(input_ids=ids).logits  # [B, T, V]
        logp = torch.log_softmax(logits.float(), dim=-1)
        return logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].mean(-1)

    problem = LLMProblem(space, tokenizer, parents, tasks, MagnitudePruner(), score_selection=score)
    engine = NaturalNiches(
        pop_size=pop,
        iterations=STEPS,
        schedule=ConstantSchedule(),
        checkpoint_every=10,
        archive=archive,
    )
    with tempfile.TemporaryDirectory() as logs:
        logger = RunLogger(console=False).start(logs)
        engine.evolve(
            problem, SparsityAwareScorer(), seed=0, target=TARGET, run_dir=run_dir, logger=logger
        )
        logger.close()
        lines = (Path(logs) / "log.jsonl").read_text().splitlines()
    steps = [r["step_s"] for r in map(json.loads, lines) if r.get("event") == "step"]
    rss.stop()
    return {
        "baseline": round(rss.start_mb * 2**20),
        "peak": round(rss.peak_mb * 2**20),
        "device_peak": torch.cuda.max_memory_allocated(device) if cuda else None,
        "step_s": sum(steps) / len(steps),
        "seconds": time.perf_counter() - start,
    }


def _run_one(name: str, pop: int, archive: str, run_dir: str, device: str = "cpu") -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--one", name, str(pop), archive, device, run_dir]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr else "failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _attempt(row: dict, *args) -> dict | None:
    """``_run_one(*args)``, or None with why it failed in ``row``'s note."""
    try:
        return _run_one(*args)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        row["note"] = f"failed: {str(exc)[:100]}"
        return None


def _measured(row: dict, predicted: int, measured: int) -> None:
    """The measured peak and the plan's error against it, in ``row``."""
    row["measured GiB"] = measured / GIB
    row["error %"] = 100.0 * (predicted - measured) / measured


def run() -> list[dict]:
    """Rows of the benchmark table: predicted vs measured host peak per configuration."""
    from sparse_merge.errors import ConfigError
    from sparse_merge.evolution.memory import host_available

    rows = []
    for name, pop, archive in CONFIGS:
        row = {"model": name, "pop": pop, "archive": archive}
        with tempfile.TemporaryDirectory() as tmp:
            plan = _plan(name, pop, archive, tmp)
            predicted, moment = plan.peak("host")
            row["predicted GiB"] = predicted / GIB
            row["peak at"] = moment
            try:
                plan.check({"host": host_available()})
            except ConfigError as exc:
                row["note"] = "skipped by the plan: " + exc.allowed.split(",")[0]
                rows.append(row)
                continue
            got = _attempt(row, name, pop, archive, tmp)
        if got is None:
            rows.append(row)
            continue
        _measured(row, predicted, got["peak"] - got["baseline"])
        row["baseline GiB"] = got["baseline"] / GIB
        row["seconds"] = got["seconds"]
        rows.append(row)
        print(row, flush=True)
    rows += gpu_rows()
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return [{c: r.get(c, "") for c in columns} for r in rows]


def gpu_rows(device: str = "cuda") -> list[dict]:
    """Two steps of each ``GPU_CONFIGS`` on ``device``: the plan's device peak against
    ``torch.cuda.max_memory_allocated``, and the step's seconds; not measured without CUDA."""
    import torch

    rows = []
    for name, pop, archive in GPU_CONFIGS:
        row = {"model": name, "pop": pop, "archive": archive, "device": device}
        if not torch.cuda.is_available():
            rows.append({**row, "note": "not measured: no CUDA device"})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            got = _attempt(row, name, pop, archive, tmp, device)
        if got is None:
            rows.append(row)
            continue
        row["predicted GiB"] = got["device_predicted"] / GIB
        _measured(row, got["device_predicted"], got["device_peak"])
        row["step s"] = got["step_s"]
        row["seconds"] = got["seconds"]
        rows.append(row)
        print(row, flush=True)
    return rows


if __name__ == "__main__":
    if len(sys.argv) in (6, 7) and sys.argv[1] == "--one":
        from sparse_merge.evolution.memory import device_label, pool_of

        name, pop, archive, device = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
        with tempfile.TemporaryDirectory() as tmp:
            out = measure(name, pop, archive, sys.argv[6] if len(sys.argv) == 7 else tmp, device)
        plan = _plan(name, pop, archive, tmp, device)
        out["predicted"] = plan.peak("host")[0]
        if device != "cpu":
            out["device_predicted"] = plan.peak(pool_of(device_label(device)))[0]
        print(json.dumps(out))
    else:
        sys.exit(__doc__)
