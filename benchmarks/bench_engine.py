"""Evolution engine at scale: the per-step overhead (everything but the child's forward passes)
of in-loop pruning on the default run and on SmolLM2-135M, and what checkpoints cost with each
archive storage.

* ``overhead`` rows run the default experiment's evolver (``conf/evolver/natural_niches.yaml``:
  pop 8, 60 children, cyclic schedule of period 10 up to 50 %, parents pruned before crossover)
  on the default toy parents, one thread, once with magnitude and once with Wanda pruning. The
  SmolLM2 rows run ``experiment=smollm2_merge``'s evolver (pop 4, period 4, Wanda in both in-loop
  forms, and magnitude) for its 16 children on its skill tasks (set
  ``SPARSE_MERGE_BENCH_SMOLLM2=0`` to skip them: they take minutes). Overhead is per step;
  ``setup s`` is the one-time work before the first step (Wanda's reference norms, the first
  touch of the scratch genome), and
  ``overhead with setup`` shares it out over the run's children.
* ``checkpoint`` rows: an archive of SmolLM2-sized genomes (134.5 M parameters, bf16) at pop 8,
  filled once; then per storage mode the seconds and bytes of one checkpoint and the seconds to
  store one child.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sparse_merge.config import settings_of
from sparse_merge.evolution.archive import Archive
from sparse_merge.evolution.llm import LLMProblem
from sparse_merge.evolution.natural_niches import NaturalNiches
from sparse_merge.models.hf import load_causal_lm, load_genome, load_tokenizer
from sparse_merge.models.paramspace import ParamSpace
from sparse_merge.pruning.base import Calibration, uses_calibration
from sparse_merge.pruning.importance import MagnitudeImportance
from sparse_merge.pruning.scored import ScorePruner
from sparse_merge.pruning.settings import CalibrationSettings
from sparse_merge.tracking.logger import RunLogger

CONF = Path(__file__).resolve().parents[1] / "conf"
CACHE = os.environ.get("SPARSE_MERGE_CACHE", "~/.cache/sparse_merge")
SMOLLM2_STEPS = None  # the experiment's own 16 children
SMOLLM2_NUMEL = 134_515_008


def _problem(model_cfg, task_cfg, pruner_cfg, calibration: CalibrationSettings) -> LLMProblem:
    """The merge pipeline's problem (parents, tasks, pruner, calibration), without a run."""
    zoo = instantiate(model_cfg)
    tasks = instantiate(task_cfg)
    tasks.prepare()
    tok = load_tokenizer(zoo.tokenizer())
    paths = zoo.parents()
    space = ParamSpace(load_causal_lm(next(iter(paths.values()))))
    parents = {n: load_genome(space, p) for n, p in paths.items()}
    pruner = instantiate(pruner_cfg)
    calib = (
        Calibration.from_settings(tok, tasks, calibration, 0) if uses_calibration(pruner) else None
    )
    return LLMProblem(space, tok, parents, tasks, pruner, calib)


def _config(*overrides: str):
    """The composed run config with ``overrides`` (Hydra, as ``run.py`` composes it)."""
    from hydra import compose, initialize_config_dir

    from sparse_merge.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["seed=0", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} interpolations resolve
    return cfg


def _steps(cfg, iterations: int | None = None) -> dict:
    """Mean per-step timings of ``cfg``'s evolver and pruner (one run, no checkpoints)."""
    cfg.model.cache_dir = str(Path(CACHE).expanduser())
    pruner_cfg = OmegaConf.to_container(cfg.pruner, resolve=True)
    calibration = settings_of(cfg, "calibration", CalibrationSettings)
    problem = _problem(cfg.model, cfg.task, pruner_cfg, calibration)
    evolver_cfg = OmegaConf.to_container(cfg.evolver, resolve=True)
    evolver_cfg["checkpoint_every"] = 0
    evolver_cfg["final_prune"] = False  # the picks' final pruning is not a step
    if iterations is not None:
        evolver_cfg["iterations"] = iterations
    engine: NaturalNiches = instantiate(evolver_cfg)
    scorer = instantiate(cfg.scorer)
    with tempfile.TemporaryDirectory() as tmp:
        logger = RunLogger(console=False).start(tmp)
        start = time.perf_counter()
        result = engine.evolve(problem, scorer, seed=0, target=float(cfg.sparsity), logger=logger)
        wall = time.perf_counter() - start
        logger.close()
        lines = (Path(tmp) / "log.jsonl").read_text().splitlines()
        records = list(map(json.loads, lines))
    recs = [r for r in records if r.get("event") == "step"]
    setup = sum(r["setup_s"] for r in records if r.get("event") == "setup")
    mean = {k: statistics.mean(r[k] for r in recs) for k in ("step_s", "eval_s", "prune_s")}
    spread = setup / len(recs)  # the one-time setup shared out over the run's children
    pruned = sum(r["prune_sparsity"] > 0 for r in recs) * 2
    hits = sum(r["prune_hits"] for r in recs)
    agreement = {}
    if getattr(problem.pruner, "in_loop", None) == "reference":
        agreement = _agreement(problem, result.archive, float(cfg.sparsity))
    return {
        "children": len(recs),
        "step s": mean["step_s"],
        "eval s": mean["eval_s"],
        "prune s": mean["prune_s"],
        "overhead fraction": (mean["step_s"] - mean["eval_s"]) / mean["step_s"],
        "setup s": setup,
        "overhead with setup": (mean["step_s"] + spread - mean["eval_s"])
        / (mean["step_s"] + spread),
        "cache hits": f"{hits}/{pruned}",
        "run s": wall,
        **agreement,
    }


def _agreement(problem: LLMProblem, archive: Archive, sparsity: float) -> dict:
    """How often in-loop Wanda (reference norms) and magnitude pruning make the same keep/prune
    decision as full Wanda, over the prunable weights of up to two final archive members
    pruned to ``sparsity``."""

    def zeros(genome, prune) -> torch.Tensor:
        g = genome.clone()
        prune(g, sparsity)
        return torch.cat([g[s.offset : s.stop] == 0 for s in problem.prunable_slots])

    magnitude = ScorePruner(MagnitudeImportance(), problem.pruner.granularity)
    same = {"reference": [], "magnitude": []}
    for slot in archive.occupied()[:2]:
        genome = archive.genomes[slot].clone()
        exact = zeros(genome, problem.prune_)
        loop = zeros(genome, problem.prune_in_loop_)
        mag = zeros(genome, lambda g, s: problem.prune_(g, s, magnitude))
        same["reference"].append(float((loop == exact).double().mean()))
        same["magnitude"].append(float((mag == exact).double().mean()))
    return {
        "in-loop = full Wanda": statistics.mean(same["reference"]),
        "magnitude = full Wanda": statistics.mean(same["magnitude"]),
    }


def overhead_rows() -> list[dict]:
    """Per-step overhead with magnitude and Wanda, default run and (optionally) SmolLM2."""
    rows = []
    runs = {
        "default run, magnitude": ["pruner=magnitude"],
        "default run, wanda": ["pruner=wanda"],
        "default run, wanda in_loop=layerwise": ["pruner=wanda", "pruner.in_loop=layerwise"],
    }
    for what, overrides in runs.items():
        rows.append({"what": what, **_steps(_config(*overrides))})
    if os.environ.get("SPARSE_MERGE_BENCH_SMOLLM2", "1") != "0":
        smollm2 = {
            "smollm2_merge, wanda": ["pruner.in_loop=reference"],
            "smollm2_merge, wanda in_loop=layerwise": ["pruner.in_loop=layerwise"],
            "smollm2_merge, magnitude": [
                "pruner=magnitude",
                "pruner.granularity=row",
                "~pruner.batch_size",  # (Wanda's keys the experiment sets)
                "~pruner.in_loop",
            ],
        }
        for what, overrides in smollm2.items():
            try:
                cfg = _config("experiment=smollm2_merge", *overrides)
                rows.append({"what": what, **_steps(cfg, SMOLLM2_STEPS)})
            except Exception as exc:  # one failed row must not lose the others
                rows.append({"what": what, "error": f"{type(exc).__name__}: {exc}"[:120]})
    return rows


def checkpoint_rows(pop: int = 8, numel: int = SMOLLM2_NUMEL) -> list[dict]:
    """Seconds and bytes of one checkpoint, and seconds to store one child, per storage mode,
    for an archive of ``pop`` bf16 genomes of ``numel`` parameters."""
    rows = []
    child = torch.randn(numel, dtype=torch.float32).to(torch.bfloat16)
    engine = NaturalNiches(pop_size=pop)
    gen = torch.Generator()
    for storage in ("device", "cpu", "disk"):
        with tempfile.TemporaryDirectory() as tmp:
            archive = Archive(pop, numel, 64, torch.bfloat16, "cpu", storage, Path(tmp) / "archive")
            for slot in range(pop):
                archive.put(slot, child, torch.rand(64), 0.5, slot)
            t = time.perf_counter()
            archive.put(0, child, torch.rand(64), 0.5, pop)  # one child enters
            store = time.perf_counter() - t
            path = Path(tmp) / "checkpoint.pt"
            t = time.perf_counter()
            engine._save(path, 1, pop + 1, archive, {}, gen, gen)
            seconds = time.perf_counter() - t
            rows.append(
                {
                    "what": f"checkpoint, archive={storage}, pop {pop}, 134.5 M bf16",
                    "checkpoint s": seconds,
                    "checkpoint MB": path.stat().st_size / 1e6,
                    "store child s": store,
                }
            )
            del archive
    return rows


def run() -> list[dict]:
    """Rows of the benchmark table."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = checkpoint_rows() + overhead_rows()
    finally:
        torch.set_num_threads(threads)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return [{c: r.get(c, "") for c in columns} for r in rows]


if __name__ == "__main__":
    from sparse_merge.tracking.report import format_table

    print(format_table(run()))
