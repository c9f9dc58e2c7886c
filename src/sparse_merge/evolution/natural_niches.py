"""Natural Niches (M2N2) made sparsity-aware: the evolution engine over any ``Problem``.

Each step: the first parent is drawn in proportion to the total score
``omega * fitness + beta * sparsity_score`` (the scorer), the second by the matchmaker
(attraction ``sum_j max(0, f_kj - f_p1,j)``) or again by total score; pruning at the
schedule's sparsity acts as a mutation on the parents before crossover (as in the sparsity-aware
paper) or on the child after it; crossover (a merge method with a random weight and split
point; by default SLERP over the whole genome) writes the child straight into the problem's
workspace; Gaussian mutation touches only non-zero weights (or the problem's own ``mutate_``);
the child is scored on the fixed selection set, joins the archive, and the individual with the
lowest total leaves (possibly the child). At the end the engine picks ``best`` and ``sparse`` on
the selection split only (members below the target pruned to it and re-scored first); the
held-out split is the pipeline's, for reports.

The GA baseline is this engine with ``alpha = 0`` (no competition) and no matchmaker
(``evolver=ga``). Every individual has a lineage id; every step is logged (JSONL) with its
parents, operator parameters, pruning sparsity, the child's sparsity (exact zeros; with
``log_layer_sparsity`` also per prunable layer) and scores, and whether it entered. The sparsity
selection sees counts weights with ``|w| <= scorer.epsilon`` as zero (exact zeros at the default
0); the picks and every report give the exact sparsity. A checkpoint (archive, scores, RNG
states, schedule phase, lineage) is written atomically every ``checkpoint_every`` steps;
resuming from it gives exactly the archive an uninterrupted run ends with.

Scale: the archive lives on the model's device, in host memory or on disk (``archive``; see
``evolution.archive``); with host or disk storage the two parents are staged into the
workspace and one scratch buffer, so the device holds two genomes whatever the population.
Pruning the parents is cached: the keep-mask of a member at a sparsity is remembered (one bit
per weight, ``prune_cache_mb``) and applied when the same pair comes back, which gives exactly
what pruning again gives (``evolution.prune_cache``). Pruning in the loop uses the problem's
``prune_in_loop_`` when it has one (Wanda's reference norms; ``pruning.wanda``); the final
pruning of the picks uses ``prune_``, the run's pruner itself.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sparse_merge.errors import ConfigError, check_bool, check_choice, check_int, check_positive
from sparse_merge.evolution.archive import ARCHIVE_STORAGE, Archive, replacement_slot
from sparse_merge.evolution.crossover import Crossover
from sparse_merge.evolution.mutation import mutate_
from sparse_merge.evolution.problem import (
    EvolutionResult,
    Evolver,
    Pick,
    Problem,
    column_weights,
    selection_mean,
)
from sparse_merge.evolution.prune_cache import MaskCache
from sparse_merge.evolution.schedules import ConstantSchedule, Schedule
from sparse_merge.evolution.scoring import SparsityAwareScorer
from sparse_merge.evolution.selection import select_parents
from sparse_merge.tracking.io import (
    check_resume_settings,
    load_checked,
    remove_temp_files,
    save_checked,
    write_json,
)
from sparse_merge.tracking.logger import RunLogger

log = logging.getLogger("sparse_merge")

PRUNE_TARGETS = ("parents", "child", "none")
CHECKPOINT = "checkpoint.pt"
ARCHIVE_DIR = "archive"  # genome files of a disk archive, under the run folder


@dataclass
class StepRecord:
    """What one evolution step did (one JSONL line; enough to rebuild the family tree)."""

    step: int
    child_id: int
    parent_ids: list[int]
    weight: float | None
    split: int | None
    prune_sparsity: float
    child_sparsity: float
    child_scores: list[float]
    child_mean: float
    entered: bool
    slot: int | None
    replaced_id: int | None
    best_fitness: float  # highest competition fitness in the archive
    best_selection_mean: float  # highest mean selection score in the archive
    archive_sparsity: float  # mean sparsity the scorer sees (exact zeros at scorer.epsilon 0)
    eval_s: float  # the child's evaluation (its forward passes)
    prune_s: float  # pruning (includes a pruner's own calibration passes, e.g. Wanda's)
    crossover_s: float
    stage_s: float  # copying (reading) the parents into the device buffers
    store_s: float  # storing the child in the archive (a file write on disk)
    prune_hits: int  # parents pruned from the mask cache this step
    step_s: float  # the whole step
    # in the record only when set (OPTIONAL_FIELDS), so a default run logs what it always did
    child_sparsity_eps: float | None = None  # what selection saw: |w| <= scorer.epsilon (> 0)
    layer_sparsity: dict[str, float] | None = None  # exact, per prunable weight (on request)
    layer_sparsity_s: float | None = None  # measuring ``layer_sparsity``

    def to_log(self) -> dict[str, Any]:
        """The JSONL record: every field, the optional ones only when set (``vars``, not
        ``asdict``: asdict deep-copies the D child scores every step, ms per step)."""
        return {k: v for k, v in vars(self).items() if v is not None or k not in OPTIONAL_FIELDS}


OPTIONAL_FIELDS = ("child_sparsity_eps", "layer_sparsity", "layer_sparsity_s")


def selection_epsilon(scorer: SparsityAwareScorer) -> float:
    """The scorer's near-zero threshold (0.0 for a scorer without one: exact zeros)."""
    return float(getattr(scorer, "epsilon", 0.0))


def _sparsities(problem: Problem, genome: torch.Tensor, epsilon: float) -> tuple[float, float]:
    """(exact sparsity, the sparsity selection sees) of ``genome``: one measurement at
    ``epsilon`` 0, where both are the exact zero fraction."""
    exact = problem.sparsity(genome)
    return exact, exact if epsilon == 0 else problem.sparsity(genome, epsilon=epsilon)


def _means(scores: torch.Tensor, weights: torch.Tensor | None) -> float | torch.Tensor:
    """The mean selection score of [D] scores, or of each row of [pop, D], for the logs: in
    float32, unweighted, as they always were, or weighted by the columns' ``weights``."""
    return scores.mean(-1) if weights is None else selection_mean(scores, weights)


def _null_logger() -> RunLogger:
    return RunLogger(console=False)


class NaturalNiches(Evolver):
    """The sparsity-aware Natural Niches evolver (see module docstring for the step).

    Args:
        pop_size: archive slots (seeded with the problem's initial genomes; the rest start empty).
        iterations: children to create.
        crossover: a ``Crossover`` (a merge method, with or without a split point), or one of
            the names ``slerp_split`` (M2N2), ``slerp`` (no split point), ``none``.
        matchmaker: draw the second parent by attraction (else by total score, like the first).
        mutation_std: std of Gaussian noise on non-zero weights (0: off, M2N2's default for
            pre-trained parents).
        prune_target: prune the ``parents`` before crossover, the ``child`` after it, or
            ``none``.
        schedule: pruning sparsity per step (``None``: constant at the run's target).
        checkpoint_every: steps between checkpoints (0: only at the end).
        tolerance: the ``sparse`` pick is the sparsest individual whose selection mean is
            within ``tolerance`` of the best one.
        final_prune: at the end, archive members below the run's target sparsity are pruned to
            it with the run's pruner and scored again on the selection split (these evaluations
            count in the budget), so both picks reach the target exactly.
        enter_on_tie: a child whose total ties the lowest enters (the first lowest archive
            member leaves, as in the M2N2 reference code: neutral moves are accepted); by
            default it does not (a newcomer must beat someone).
        archive: where the archive's genomes live: ``device`` (the model's), ``cpu`` (host
            memory) or ``disk`` (one safetensors file per individual under
            ``<run_dir>/archive``; checkpoints then cost O(one child)).
        prune_cache_mb: host memory for cached keep-masks of pruned parents (0: off).
        log_layer_sparsity: add the child's exact sparsity per prunable layer (name ->
            fraction; a 3-D fused expert weight gives a row per expert, ``<param>[<expert>]``)
            to every step record, ``layer_sparsity`` (W&B: ``layer_sparsity/<name>``). It is
            read from the child's genome slices: one pass over the prunable weights, no copy;
            the record's ``layer_sparsity_s`` says what it cost.
    """

    def __init__(
        self,
        pop_size: int = 8,
        iterations: int = 60,
        crossover: str | Crossover = "slerp_split",
        matchmaker: bool = True,
        mutation_std: float = 0.0,
        prune_target: str = "parents",
        schedule: Schedule | None = None,
        checkpoint_every: int = 10,
        tolerance: float = 0.01,
        enter_on_tie: bool = False,
        final_prune: bool = True,
        archive: str = "device",
        prune_cache_mb: float = 1024,
        log_layer_sparsity: bool = False,
    ) -> None:
        self.pop_size = check_int("pop_size", pop_size, minimum=2)
        self.iterations = check_int("iterations", iterations)
        if isinstance(crossover, str):
            crossover = Crossover.named(crossover)
        if not isinstance(crossover, Crossover):
            raise ConfigError("crossover", crossover, "a Crossover or slerp_split, slerp, none")
        self.crossover = crossover
        self.matchmaker = check_bool("matchmaker", matchmaker)
        self.mutation_std = float(check_positive("mutation_std", mutation_std, allow_zero=True))
        self.prune_target = check_choice("prune_target", prune_target, PRUNE_TARGETS)
        if schedule is not None and not isinstance(schedule, Schedule):
            raise ConfigError("schedule", schedule, "a schedule (ConstantSchedule, CyclicSchedule)")
        self.schedule = schedule if schedule is not None else ConstantSchedule()
        self.checkpoint_every = check_int("checkpoint_every", checkpoint_every)
        self.tolerance = float(check_positive("tolerance", tolerance, allow_zero=True))
        self.enter_on_tie = check_bool("enter_on_tie", enter_on_tie)
        self.final_prune = check_bool("final_prune", final_prune)
        self.archive = check_choice("archive", archive, ARCHIVE_STORAGE)
        self.prune_cache_mb = float(
            check_positive("prune_cache_mb", prune_cache_mb, allow_zero=True)
        )
        self.log_layer_sparsity = check_bool("log_layer_sparsity", log_layer_sparsity)
        # the checkpoint ``check_resume`` read, for ``evolve`` to restore: (path, state)
        self._resume_state: tuple[Path, dict[str, Any]] | None = None

    # ---- the engine ----------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The knobs a resumed run must share with the run it continues."""
        return {
            "pop_size": self.pop_size,
            "crossover": self.crossover.describe(),
            "matchmaker": self.matchmaker,
            "mutation_std": self.mutation_std,
            "prune_target": self.prune_target,
        }

    def run_settings(
        self, problem: Problem, scorer: SparsityAwareScorer, seed: int, target: float, schedule
    ) -> dict[str, Any]:
        """Every setting that shapes the result, by config key: a resumed run must share them
        all with the run it continues (the values are plain, so a checkpoint holds them)."""
        pruner = getattr(problem, "pruner", None)
        described = None
        if pruner is not None:
            described = {
                "type": type(pruner).__name__,
                **(pruner.describe() if hasattr(pruner, "describe") else {}),
                "in_loop": getattr(pruner, "in_loop", None),
            }
        return {**self._engine_settings(scorer, seed, target, schedule), "pruner": repr(described)}

    def _engine_settings(
        self, scorer: SparsityAwareScorer, seed: int, target: float, schedule
    ) -> dict[str, Any]:
        """``run_settings`` but the problem's pruner: what is known before any model loads."""
        out: dict[str, Any] = {f"evolver.{k}": repr(v) for k, v in self.settings().items()}
        out.update(
            {
                "seed": int(seed),
                "sparsity": float(target),
                "evolver.schedule": repr({"type": type(schedule).__name__, **vars(schedule)}),
                "evolver.enter_on_tie": self.enter_on_tie,
                "evolver.final_prune": self.final_prune,
                **{
                    f"scorer.{k}": getattr(scorer, k)
                    for k in ("omega", "beta", "tau", "alpha", "kind")
                },
                "scorer.epsilon": selection_epsilon(scorer),
            }
        )
        return out

    def evolve(
        self,
        problem: Problem,
        scorer: SparsityAwareScorer,
        *,
        seed: int = 0,
        target: float = 0.0,
        run_dir: str | Path | None = None,
        logger: RunLogger | None = None,
        resume: bool = False,
        write: bool = True,
        settings: Mapping[str, Any] | None = None,
    ) -> EvolutionResult:
        """Run ``iterations`` steps (continuing a checkpoint in ``run_dir`` when ``resume``, after
        removing the temporary files a killed run left there; a checkpoint made with other
        ``run_settings`` or other ``settings``, the config values that shape the result besides
        the engine's own, is refused, naming each changed key).

        ``write=False`` (the other processes of a multi-process run) reads a checkpoint to
        resume but writes nothing and shows no progress bar.
        """
        logger = logger or _null_logger()
        self._check_sparsity_knobs(problem, scorer)
        scorer = scorer.weighing(column_weights(problem))  # the benchmarks' weights, if any
        run_dir = Path(run_dir) if run_dir is not None else None
        schedule = self.schedule.bind(target) if hasattr(self.schedule, "bind") else self.schedule
        pruning = self.prune_target != "none" and target > 0
        ws = problem.workspace
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + 17)
        noise_gen = torch.Generator(device=ws.device).manual_seed(int(seed) * 1_000_003 + 29)
        archive = self._archive(problem, run_dir, write)
        lineage: dict[int, dict[str, Any]] = {}
        ckpt = run_dir / CHECKPOINT if run_dir is not None else None
        cache = None
        if getattr(problem, "prune_is_mask", False) and self.prune_cache_mb > 0:
            cache = MaskCache(int(self.prune_cache_mb * 2**20))

        run = {**self.run_settings(problem, scorer, seed, target, schedule), **(settings or {})}
        if resume and write and run_dir is not None:
            remove_temp_files(run_dir)  # what a killed run was writing when it stopped
        if resume and ckpt is not None and ckpt.exists():
            start, next_id = self._load(ckpt, archive, lineage, gen, noise_gen, run)
            log.info("resumed from %s at step %d", ckpt, start)
        else:
            if resume:
                log.warning("resume requested but no checkpoint in %s: starting fresh", run_dir)
            if write:
                archive.clear_files()
            epsilon = selection_epsilon(scorer)
            start, next_id = 0, self._seed_archive(problem, archive, lineage, logger, epsilon)

        # one-time costs before the first step, logged as `setup`, not charged to a step
        t = time.perf_counter()
        staged = archive.storage != "device"
        scratch = None
        if staged or (pruning and self.prune_target == "parents"):
            # written now: a fresh buffer's first touch (page faults: ~1.5 s for 135 M float32
            # on a small VM) would otherwise land in the first step that uses it
            scratch = torch.zeros_like(ws)
        self.crossover.warm_up(ws.dtype, ws.device)  # compiled kernels, before the first step
        prepare = pruning and start < self.iterations and hasattr(problem, "prepare_in_loop")
        if prepare:
            problem.prepare_in_loop()  # Wanda's reference norms
        logger.log(
            {"event": "setup", "setup_s": time.perf_counter() - t, "prepared_in_loop": prepare}
        )
        bar = tqdm(
            range(start, self.iterations),
            desc="evolution",
            initial=start,
            total=self.iterations,
            disable=not write,
        )
        for step in bar:
            rec = self._step(
                step,
                next_id,
                problem,
                scorer,
                archive,
                lineage,
                schedule,
                pruning,
                scratch,
                gen,
                noise_gen,
                cache,
            )
            next_id += 1
            logger.log({"event": "step", **rec.to_log()}, step=step)
            bar.set_postfix(
                best_fitness=f"{rec.best_fitness:.3f}",
                best_acc=f"{rec.best_selection_mean:.3f}",
                child_sparsity=f"{rec.child_sparsity:.3f}",
            )
            done = step + 1
            if write and ckpt and self.checkpoint_every and done % self.checkpoint_every == 0:
                self._save(ckpt, done, next_id, archive, lineage, gen, noise_gen, run)
        if write and ckpt is not None:
            last = max(start, self.iterations)
            self._save(ckpt, last, next_id, archive, lineage, gen, noise_gen, run)
        if cache is not None:
            log.info(
                "pruning cache: %d hits, %d misses, %.1f MB",
                cache.hits,
                cache.misses,
                cache.nbytes / 2**20,
            )
        # the search's buffers go before the end, which prunes and copies genomes of its own
        del scratch, cache
        evaluations = len(problem.initial()) + self.iterations
        return self._finish(
            problem, scorer, archive, lineage, run_dir if write else None, target, evaluations
        )

    def _check_sparsity_knobs(self, problem: Problem, scorer: SparsityAwareScorer) -> None:
        """Refuse ``scorer.epsilon > 0`` and ``evolver.log_layer_sparsity`` for a problem that
        cannot measure them, before any evaluation."""
        epsilon = selection_epsilon(scorer)
        if epsilon > 0 and "epsilon" not in inspect.signature(problem.sparsity).parameters:
            raise ConfigError(
                "scorer.epsilon",
                epsilon,
                f"0.0 with {type(problem).__name__}, whose sparsity() counts exact zeros only",
            )
        if self.log_layer_sparsity and not hasattr(problem, "layer_sparsity"):
            raise ConfigError(
                "evolver.log_layer_sparsity",
                True,
                f"false with {type(problem).__name__}, which has no layer_sparsity()",
            )

    def _archive(self, problem: Problem, run_dir: Path | None, write: bool) -> Archive:
        """An empty archive with the configured storage. A disk archive lives in
        ``<run_dir>/archive``; processes that do not write (the other ranks of a multi-process
        run) keep theirs in host memory instead."""
        ws = problem.workspace
        storage = self.archive
        if storage == "disk" and not write:
            storage = "cpu"
        if storage == "disk" and run_dir is None:
            raise ConfigError("evolver.archive", "disk", "device or cpu when a run has no folder")
        root = run_dir / ARCHIVE_DIR if storage == "disk" else None
        return Archive(
            self.pop_size, problem.numel, problem.n_datapoints, ws.dtype, ws.device, storage, root
        )

    def _seed_archive(
        self,
        problem: Problem,
        archive: Archive,
        lineage: dict[int, dict[str, Any]],
        logger: RunLogger,
        epsilon: float = 0.0,
    ) -> int:
        """Evaluate the initial genomes into the first slots (with the sparsity selection sees,
        ``|w| <= epsilon``); returns the next free id."""
        initial = problem.initial()
        if len(initial) > self.pop_size:
            raise ConfigError("pop_size", self.pop_size, f">= the {len(initial)} initial genomes")
        for i, (name, genome) in enumerate(initial.items()):
            scores = problem.evaluate(genome)
            sparsity, seen = _sparsities(problem, genome, epsilon)
            archive.put(i, genome, scores, seen, i)
            lineage[i] = {"name": name, "parents": [], "step": None}
            logger.log(
                {
                    "event": "initial",
                    "id": i,
                    "name": name,
                    "sparsity": sparsity,
                    **({"sparsity_eps": seen} if epsilon > 0 else {}),
                    "scores": scores,
                    "mean": float(_means(scores, column_weights(problem))),
                }
            )
        return len(initial)

    @torch.no_grad()
    def _step(
        self,
        step: int,
        child_id: int,
        problem: Problem,
        scorer: SparsityAwareScorer,
        archive: Archive,
        lineage: dict[int, dict[str, Any]],
        schedule: Schedule,
        pruning: bool,
        scratch: torch.Tensor | None,
        gen: torch.Generator,
        noise_gen: torch.Generator,
        cache: MaskCache | None = None,
    ) -> StepRecord:
        t0 = time.perf_counter()
        ws = problem.workspace
        sparsity = float(schedule(step)) if pruning else 0.0
        total = scorer.total(archive.scores, archive.sparsity, archive.valid)
        p1, p2 = select_parents(
            total,
            archive.scores,
            archive.valid,
            gen,
            matchmaker=self.matchmaker,
            alpha=scorer.alpha,
            weights=scorer.column_weights,
        )
        parent_ids = [int(archive.ids[p1]), int(archive.ids[p2])]  # before the child enters
        prune_parents = pruning and self.prune_target == "parents" and sparsity > 0
        prune_s = stage_s = 0.0
        hits = 0
        if scratch is not None and (prune_parents or archive.storage != "device"):
            # the parents go to the device buffers, the first to scratch and the second to the
            # workspace; a parent is pruned where the model sees it (the workspace), so the
            # first is pruned there and then copied to scratch (one copy, not two), unless the
            # mask cache has it
            for slot, buf in ((p1, scratch), (p2, ws)):
                ident = int(archive.ids[slot])
                cached = cache is not None and cache.has(ident, sparsity)
                into = ws if prune_parents and not cached else buf
                t = time.perf_counter()
                archive.read_into(slot, into)
                stage_s += time.perf_counter() - t
                if prune_parents:
                    t = time.perf_counter()
                    hits += self._prune(problem, into, ident, sparsity, cache)
                    if into is not buf:
                        buf.copy_(into)
                    prune_s += time.perf_counter() - t
            a, b = scratch, ws
        else:
            a, b = archive.genomes[p1], archive.genomes[p2]
        t = time.perf_counter()
        op = self.crossover(
            ws, a, b, gen, getattr(problem, "base", None), getattr(problem, "segments", None)
        )
        crossover_s = time.perf_counter() - t
        getattr(problem, "mutate_", mutate_)(ws, self.mutation_std, noise_gen)
        if pruning and self.prune_target == "child" and sparsity > 0:
            t = time.perf_counter()
            problem.prune_(ws, sparsity)
            prune_s += time.perf_counter() - t
        epsilon = selection_epsilon(scorer)
        child_sparsity, seen = _sparsities(problem, ws, epsilon)  # exact; what selection sees
        layers = layer_s = None
        if self.log_layer_sparsity:
            t = time.perf_counter()
            layers = problem.layer_sparsity(ws)  # from the genome's slices, no copy
            layer_s = time.perf_counter() - t
        t_eval = time.perf_counter()
        scores = problem.evaluate(ws)  # [D]
        eval_s = time.perf_counter() - t_eval
        slot = replacement_slot(scorer, archive, scores, seen, self.enter_on_tie)
        replaced = int(archive.ids[slot]) if slot is not None and archive.valid[slot] else None
        store_s = 0.0
        if slot is not None:
            t = time.perf_counter()
            archive.put(slot, ws, scores, seen, child_id)
            store_s = time.perf_counter() - t
            if replaced is not None and cache is not None:
                cache.forget(replaced)
        lineage[child_id] = {
            "parents": parent_ids,
            "step": step,
            "weight": op["weight"],
            "split": op["split"],
            "prune_sparsity": sparsity,
            "sparsity": child_sparsity,
            "mean": float(_means(scores, scorer.column_weights)),
            "entered": slot is not None,
        }
        fitness = scorer.fitness(archive.scores, archive.valid)
        return StepRecord(
            step=step,
            child_id=child_id,
            parent_ids=parent_ids,
            weight=op["weight"],
            split=op["split"],
            prune_sparsity=sparsity,
            child_sparsity=child_sparsity,
            child_scores=scores.tolist(),
            child_mean=float(_means(scores, scorer.column_weights)),
            entered=slot is not None,
            slot=slot,
            replaced_id=replaced,
            best_fitness=float(fitness.max()),
            best_selection_mean=float(
                _means(archive.scores[archive.valid], scorer.column_weights).max()
            ),
            archive_sparsity=float(archive.sparsity[archive.valid].mean()),
            eval_s=eval_s,
            prune_s=prune_s,
            crossover_s=crossover_s,
            stage_s=stage_s,
            store_s=store_s,
            prune_hits=hits,
            step_s=time.perf_counter() - t0,
            child_sparsity_eps=seen if epsilon > 0 else None,
            layer_sparsity=layers,
            layer_sparsity_s=layer_s,
        )

    @staticmethod
    def _prune(
        problem: Problem, genome: torch.Tensor, ident: int, sparsity: float, cache: MaskCache | None
    ) -> bool:
        """Prune archive member ``ident`` (its copy in ``genome``) to ``sparsity``, through the
        mask cache when there is one; returns whether the cache had it."""
        prune = getattr(problem, "prune_in_loop_", problem.prune_)
        if cache is None:
            prune(genome, sparsity)
            return False
        return cache.prune_(genome, ident, sparsity, prune)

    # ---- checkpoints -----------------------------------------------------------------------

    def _save(
        self,
        path: Path,
        step: int,
        next_id: int,
        archive: Archive,
        lineage: dict[int, dict[str, Any]],
        gen: torch.Generator,
        noise_gen: torch.Generator,
        run: dict[str, Any] | None = None,
    ) -> None:
        state = {
            "step": step,  # the schedule phase is a pure function of the step
            "next_id": next_id,
            "archive": archive.state_dict(),
            "lineage": lineage,
            "rng": gen.get_state(),
            "noise_rng": noise_gen.get_state(),
            "settings": self.settings(),
            "run": run or {},
        }
        # serialised straight into the temporary file (no in-memory copy of the archive first);
        # a disk archive's state names its files, so this costs O(one child) there
        save_checked(path, state)  # with the SHA-256 of its content
        archive.checkpointed()  # files only older checkpoints needed can go now

    def check_resume(
        self,
        run_dir: str | Path,
        scorer: SparsityAwareScorer,
        *,
        seed: int,
        target: float,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        """Read the checkpoint a resume in ``run_dir`` continues, if there is one, and refuse
        it (one line naming each changed key) when a setting known before any model loads
        differs: the engine's, the scorer's, ``seed``, ``sparsity`` and ``settings`` (the
        pipeline's). Called before the parents load, a changed setting is refused in a second,
        not after minutes of loading; ``evolve(resume=True)`` then checks the rest (the
        problem's pruner) and restores the state read here without reading the file again."""
        path = Path(run_dir) / CHECKPOINT
        if not path.exists():
            return
        state = load_checked(path)  # weights_only; a damaged file is one clear error
        schedule = self.schedule.bind(target) if hasattr(self.schedule, "bind") else self.schedule
        now = {**self._engine_settings(scorer, seed, target, schedule), **(settings or {})}
        self._check_state(path, state, now, partial=True)
        self._resume_state = (path, state)

    def _check_state(
        self, path: Path, state: dict[str, Any], run: Mapping[str, Any], partial: bool = False
    ) -> None:
        """Refuse a checkpoint ``state`` made with other settings than ``run`` (``partial``:
        ``run`` holds some of the keys; only those are compared) or at a later step than this
        run's last."""
        saved, now = state.get("run") or {}, run
        if not saved:  # an older checkpoint: only the evolver's own settings
            saved, now = {"evolver": state["settings"]}, {"evolver": self.settings()}
        elif partial:
            saved = {k: v for k, v in saved.items() if k in now}
        check_resume_settings(saved, now, path.parent)
        if self.iterations < int(state["step"]):
            raise ConfigError(
                "evolver.iterations",
                self.iterations,
                f">= {int(state['step'])}, the step of the checkpoint in {path.parent}",
            )

    def _load(
        self,
        path: Path,
        archive: Archive,
        lineage: dict[int, dict[str, Any]],
        gen: torch.Generator,
        noise_gen: torch.Generator,
        run: dict[str, Any] | None = None,
    ) -> tuple[int, int]:
        read, self._resume_state = self._resume_state, None
        state = read[1] if read is not None and read[0] == path else load_checked(path)
        self._check_state(path, state, run or {})
        root = path.parent / ARCHIVE_DIR if "files" in state["archive"] else None
        archive.load_state_dict(state["archive"], root)
        lineage.clear()
        lineage.update(state["lineage"])
        gen.set_state(state["rng"])
        noise_gen.set_state(state["noise_rng"])
        return int(state["step"]), int(state["next_id"])

    # ---- the end ---------------------------------------------------------------------------

    @staticmethod
    def _final_genome(problem: Problem, archive: Archive, slot: int, target: float) -> torch.Tensor:
        """A copy of member ``slot`` pruned to ``target`` with the run's pruner itself (not its
        in-loop form)."""
        genome = archive.genomes[slot].clone()
        problem.prune_(genome, target)
        return genome

    def _finish(
        self,
        problem: Problem,
        scorer: SparsityAwareScorer,
        archive: Archive,
        lineage: dict[int, dict[str, Any]],
        run_dir: Path | None,
        target: float,
        evaluations: int,
    ) -> EvolutionResult:
        """Picks ``best`` (highest selection mean) and ``sparse`` (the sparsest member within
        ``tolerance`` of it), on the selection split only; members below ``target`` are first
        pruned to it and re-scored when ``final_prune``. Writes ``lineage.json``.

        Members are pruned and scored one at a time and only their scores are kept; the two
        picks are pruned again at the end (pruning is deterministic), so the memory this
        takes is two genomes whatever the population."""
        candidates = []  # (slot, scores, sparsity, pruned)
        epsilon = selection_epsilon(scorer)
        for slot in archive.occupied():
            scores, sparsity, pruned = archive.scores[slot], float(archive.sparsity[slot]), False
            if epsilon > 0:  # the archive holds what selection saw; the picks use exact zeros
                sparsity = problem.sparsity(archive.genomes[slot])
            if self.final_prune and target > 0 and sparsity < target:
                genome = self._final_genome(problem, archive, slot, target)
                scores, sparsity, pruned = problem.evaluate(genome), problem.sparsity(genome), True
                evaluations += 1
                del genome
            candidates.append((slot, scores, sparsity, pruned))

        weights = scorer.column_weights  # ``evolve`` weighed it for the problem

        def mean(c) -> float:
            return selection_mean(c[1], weights)

        # highest selection mean; ties go to the sparser, then to the lower slot
        best = max(candidates, key=lambda c: (mean(c), c[2], -c[0]))
        close = [c for c in candidates if mean(c) >= mean(best) - self.tolerance]
        sparse = max(close, key=lambda c: (c[2], mean(c), -c[0]))
        if run_dir is not None:
            write_json(run_dir / "lineage.json", {str(k): v for k, v in sorted(lineage.items())})
        picks = {}
        for name, (slot, scores, sparsity, pruned) in (("best", best), ("sparse", sparse)):
            if picks and slot == best[0]:
                genome = picks["best"].genome.clone()
            elif pruned:
                genome = self._final_genome(problem, archive, slot, target)
            else:
                genome = archive.genomes[slot].clone()
            ident = int(archive.ids[slot])
            picks[name] = Pick(genome, scores.clone(), sparsity, ident, pruned, weights)
        return EvolutionResult(picks, evaluations, archive, lineage)
