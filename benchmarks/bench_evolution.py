"""Evolution engine costs: crossover throughput against a plain copy, the per-step overhead
(everything but the child's forward passes) as a fraction of the step, and pruning time per
step (magnitude and Wanda).

The per-step rows run a few Natural Niches steps on the default toy parents (trained and
cached on first use, like ``python run.py``), one thread, pruning the parents before
crossover at 50 % sparsity.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sparse_merge.evolution.crossover import slerp_
from sparse_merge.evolution.llm import LLMProblem
from sparse_merge.evolution.natural_niches import NaturalNiches
from sparse_merge.evolution.schedules import ConstantSchedule
from sparse_merge.evolution.scoring import SparsityAwareScorer
from sparse_merge.models.hf import load_causal_lm, load_genome, load_tokenizer
from sparse_merge.models.paramspace import ParamSpace
from sparse_merge.pipelines.merge import build_calibration
from sparse_merge.tracking.logger import RunLogger

CONF = Path(__file__).resolve().parents[1] / "conf"
N_CROSSOVER = 1 << 24  # 16 M float32 = 64 MiB per genome
STEPS = 6


def _best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def crossover_rows() -> list[dict]:
    """GB/s of output written: SLERP with a split point vs ``copy_`` of the same size."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(N_CROSSOVER, generator=g), torch.randn(N_CROSSOVER, generator=g)
    out = torch.empty_like(a)
    gb = a.numel() * a.element_size() / 1e9
    copy_s = _best_of(lambda: out.copy_(a))
    slerp_s = _best_of(lambda: slerp_(out, a, b, 0.3, N_CROSSOVER // 3))
    return [
        {"what": "copy_ (64 MiB)", "seconds": copy_s, "GB/s": gb / copy_s, "vs copy": 1.0},
        {
            "what": "slerp_ with split (64 MiB)",
            "seconds": slerp_s,
            "GB/s": gb / slerp_s,
            "vs copy": copy_s / slerp_s,
        },
    ]


def _toy_problem(pruner_cfg: str):
    model_cfg = OmegaConf.load(CONF / "model" / "toy.yaml")
    model_cfg.cache_dir = str(Path("~/.cache/sparse_merge").expanduser())
    zoo = instantiate(model_cfg)
    task_cfg = OmegaConf.load(CONF / "task" / "toy.yaml")
    for t in task_cfg.tasks.values():
        t.selection_seed = 0
    tasks = instantiate(task_cfg)
    tok = load_tokenizer(zoo.tokenizer())
    paths = zoo.parents()
    space = ParamSpace(load_causal_lm(next(iter(paths.values()))))
    parents = {n: load_genome(space, p) for n, p in paths.items()}
    pruner = instantiate(OmegaConf.load(CONF / "pruner" / f"{pruner_cfg}.yaml"))
    calib = build_calibration(tok, tasks, pruner, seed=0)
    return LLMProblem(space, tok, parents, tasks, pruner, calib)


def step_rows() -> list[dict]:
    """Per-step timings of the engine on the toy parents, one row per pruner."""
    rows = []
    for pruner in ("magnitude", "wanda"):
        try:
            problem = _toy_problem(pruner)
        except Exception as exc:  # a pruner config missing on this branch
            rows.append({"what": f"step ({pruner})", "error": str(exc)[:80]})
            continue
        engine = NaturalNiches(
            pop_size=4, iterations=STEPS, checkpoint_every=0, schedule=ConstantSchedule(0.5)
        )
        with tempfile.TemporaryDirectory() as tmp:
            logger = RunLogger(console=False).start(tmp)
            engine.evolve(problem, SparsityAwareScorer(beta=0.5), target=0.5, logger=logger)
            logger.close()
            recs = [
                json.loads(x)
                for x in (Path(tmp) / "log.jsonl").read_text().splitlines()
                if '"event": "step"' in x
            ]
        step = statistics.mean(r["step_s"] for r in recs)
        ev = statistics.mean(r["eval_s"] for r in recs)
        prune = statistics.mean(r["prune_s"] for r in recs)
        cross = statistics.mean(r["crossover_s"] for r in recs)
        rows.append(
            {
                "what": f"step ({pruner} on parents, 50 %)",
                "step s": step,
                "eval s": ev,
                "prune s": prune,
                "crossover s": cross,
                "overhead fraction": (step - ev) / step,
                "overhead w/o pruning": (step - ev - prune) / step,
            }
        )
    return rows


def run() -> list[dict]:
    """Rows of the benchmark table."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = crossover_rows() + step_rows()
    finally:
        torch.set_num_threads(threads)
    columns = list(dict.fromkeys(k for r in rows for k in r))  # one table: every row, every column
    return [{c: r.get(c, "") for c in columns} for r in rows]


if __name__ == "__main__":
    from sparse_merge.tracking.report import format_table

    print(format_table(run()))
