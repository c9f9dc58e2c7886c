"""The memory plan of an evolution run: what each device will hold, checked before anything heavy.

``ModelShape`` describes a model from its config alone (built on the ``meta`` device: no
weights, no memory). ``plan_evolution`` turns a shape and the run's settings into rows of
(device, what, bytes, formula); ``MemoryPlan.check`` compares the peak of every memory pool
with what is free there and raises a ``ConfigError`` naming the setting to change.

A row is alive during the whole run or only at some *moments*; the peak of a device is the
largest sum over one moment, since working sets of different moments never coexist:

* ``load``: reading the parents (a checkpoint file is memory-mapped while a genome is read);
* ``prune``: one pruning call (the pruner's scores, one layer's keep-mask or, for a global
  ranking, every layer's, calibration activations);
* ``evaluate``: one evaluation batch (logits, KV cache, a layer's activations);
* ``checkpoint``: writing a checkpoint (a host copy of a device archive);
* ``finish``: the evolver's picks (members below the target are pruned and scored one at a
  time; the two picks are copies; the search's scratch genome and pruning cache are freed);
* ``report``: the merge pipeline's report (the picks copied again, a pruned parent).

Where the live model runs on the CPU (or MPS), the device and the host are one memory: their
rows add up against one budget (``host``). Numbers are estimates of the big buffers (anything
proportional to P, the prunable weights, the vocabulary or the calibration activations);
Python objects, CUDA contexts and allocator slack are not counted.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparse_merge.errors import ConfigError
from sparse_merge.evolution.archive import IO_CHUNK  # bytes a disk archive stages at a time
from sparse_merge.evolution.prune_cache import CHUNK as PACK_CHUNK  # elements packed at a time
from sparse_merge.models.blocks import prunable_layers

MOMENTS = ("load", "prune", "evaluate", "checkpoint", "finish", "report")
EVOLVE = frozenset({"prune", "evaluate", "checkpoint", "finish"})  # inside ``evolve``
SEARCH = EVOLVE - {"finish"}  # the search's steps: its own buffers are freed before the end
AFTER = frozenset({"report"})  # what the pipeline does with the result
ARCHIVES = ("device", "cpu", "disk")
# bytes per element of the largest layer that mask selection allocates besides its float32
# scores, at most: the sorted or partitioned copy (4), the keep and tied masks (2) and, where
# many ties need ordering, their int32 running count and its comparisons (6), or a row's
# entries above its minimum (5) (``pruning.base.keep_smallest_out``); rounded up
SELECT_BYTES = 16
FILE_HEADER = 256  # bytes of a genome file's safetensors header (an upper bound)


# ---- the model --------------------------------------------------------------------------------


def _first(config: Any, names: tuple[str, ...], default: int | None = None) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if value:
            return int(value)
    return default


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about a causal LM, read from its config.

    ``numel`` is P, the unique parameters (tied embeddings once, as in ``ParamSpace``);
    ``prunable`` the weights of the decoder blocks' linears (``prunable_layers``); ``largest``
    the [out, in] of the largest of them; ``block`` the [out, in] of every linear of one block
    (a fused expert parameter as its [E * out, in] rows); ``block_hessian`` the entries of one
    block's SparseGPT Hessians (in^2 per linear, one per expert for fused experts).
    """

    numel: int  # P
    prunable: int  # N
    largest: tuple[int, int]  # [out, in]
    block: tuple[tuple[int, int], ...]  # [out, in] per linear of one decoder block
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_layers: int
    num_heads: int
    kv_dim: int  # key (or value) features per token per layer: kv heads x head dim
    block_hessian: int = 0  # sum of in^2 (x experts) over one block's linears

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> ModelShape:
        """The shape of a built model (weights or ``meta``; nothing is read from the weights)."""
        config = model.config
        numel = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=True))
        layers = prunable_layers(model)
        shapes = [tuple(layer.weight.shape) for layer in layers]
        hidden = _first(config, ("hidden_size", "n_embd", "d_model"))
        heads = _first(config, ("num_attention_heads", "n_head"), 1)
        kv_heads = _first(config, ("num_key_value_heads",), heads)
        head_dim = _first(config, ("head_dim",), hidden // heads)
        return cls(
            numel=int(numel),
            prunable=sum(o * i for o, i in shapes),
            largest=max(shapes, key=lambda s: s[0] * s[1]),
            block=tuple(s for layer, s in zip(layers, shapes) if layer.block == 0),
            hidden_size=hidden,
            intermediate_size=_first(
                config, ("intermediate_size", "n_inner", "ffn_dim"), 4 * hidden
            ),
            vocab_size=int(config.vocab_size),
            num_layers=int(config.num_hidden_layers),
            num_heads=heads,
            kv_dim=kv_heads * head_dim,
            block_hessian=sum(
                (layer.num_experts or 1) * s[1] ** 2
                for layer, s in zip(layers, shapes)
                if layer.block == 0
            ),
        )

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """The shape of the ``AutoModelForCausalLM`` of a transformers config, built on the
        ``meta`` device (no weights are allocated: milliseconds even for 7B models)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return cls.from_model(model)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelShape:
        """The shape of a saved model, from its ``config.json`` only (no weights are read)."""
        from transformers import AutoConfig

        return cls.from_config(AutoConfig.from_pretrained(str(path)))

    @property
    def largest_numel(self) -> int:
        """Weights of the largest prunable layer."""
        return self.largest[0] * self.largest[1]


# ---- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryRow:
    """One buffer (or group of buffers) of the run."""

    device: str  # "cuda:0", "cpu", "host", "disk"
    what: str
    bytes: int
    formula: str
    when: frozenset[str] | None = None  # moments it is alive; None: the whole run
    setting: str | None = None  # the config key that changes it


def human(n: float) -> str:
    """Bytes in binary units: ``1.5 GiB``."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def pool_of(device: str) -> str:
    """The memory a row's device draws from: the CPU (and MPS) device is host memory."""
    return "host" if device.split(":")[0] in ("cpu", "host", "mps") else device


def device_label(device: str | torch.device) -> str:
    """``cuda`` -> ``cuda:0`` (the current device), others as they are."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return f"cuda:{index}"
    return str(device)


def _peak(rows: list[MemoryRow]) -> tuple[int, str]:
    """(largest sum over one moment, that moment) of ``rows``."""
    always = sum(r.bytes for r in rows if r.when is None)
    moments = sorted({m for r in rows if r.when is not None for m in r.when}, key=MOMENTS.index)
    best, at = always, "run"
    for m in moments:
        total = always + sum(r.bytes for r in rows if r.when is not None and m in r.when)
        if total > best:
            best, at = total, m
    return best, at


@dataclass
class MemoryPlan:
    """Rows of (device, what, bytes, formula); ``settings`` are the arguments of
    ``plan_evolution`` that made it (the check re-plans with a smaller population to say what
    fits)."""

    rows: list[MemoryRow]
    settings: dict[str, Any] = field(default_factory=dict)
    header: str = ""

    def devices(self) -> list[str]:
        """Device labels in order of first appearance."""
        return list(dict.fromkeys(r.device for r in self.rows))

    def pools(self) -> list[str]:
        """Memory pools in order of first appearance (the model's device first)."""
        return list(dict.fromkeys(pool_of(d) for d in self.devices()))

    def peak(self, pool: str) -> tuple[int, str]:
        """(peak bytes, moment of the peak) of one memory pool."""
        return _peak([r for r in self.rows if pool_of(r.device) == pool])

    def totals(self) -> dict[str, int]:
        """Peak bytes per device label (``cpu`` and ``host`` apart; ``peak`` adds them)."""
        return {d: _peak([r for r in self.rows if r.device == d])[0] for d in self.devices()}

    def format(self) -> str:
        """The rows as a table, then the peak of every memory pool."""
        from sparse_merge.tracking.report import format_table

        table = format_table(
            [
                {
                    "device": r.device,
                    "what": r.what,
                    "when": "always"
                    if r.when is None
                    else ",".join(sorted(r.when, key=MOMENTS.index)),
                    "size": human(r.bytes),
                    "formula": r.formula,
                }
                for r in self.rows
            ]
        )
        peaks = []
        for pool in self.pools():
            need, at = self.peak(pool)
            members = sorted({r.device for r in self.rows if pool_of(r.device) == pool})
            peaks.append(f"peak {pool} ({' + '.join(members)}): {human(need)} at {at}")
        return "\n".join([*([self.header] if self.header else []), table, *peaks])

    def check(self, available: Mapping[str, int] | None = None) -> None:
        """Raise ``ConfigError`` if a pool's peak exceeds what is free there (``available``:
        bytes by pool, ``host`` / ``cuda:N`` / ``disk``; pools it leaves out are not checked;
        default: measured now)."""
        free = (
            dict(available)
            if available is not None
            else available_memory(self.pools(), self.settings.get("run_dir"))
        )
        for pool in self.pools():
            if pool not in free:
                continue
            need, at = self.peak(pool)
            if need > free[pool]:
                raise self._refusal(pool, need, int(free[pool]), at)

    # ---- saying what to change ---------------------------------------------------------------

    def _refusal(self, pool: str, need: int, free: int, at: str) -> ConfigError:
        rows = [
            r for r in self.rows if pool_of(r.device) == pool and (r.when is None or at in r.when)
        ]
        by_setting: dict[str, int] = {}
        for r in rows:
            if r.setting is not None:
                by_setting[r.setting] = by_setting.get(r.setting, 0) + r.bytes
        where = "host memory" if pool == "host" else pool
        head = f"the run needs {human(need)} of {where} at its peak ({at}) where {human(free)} are free"
        s = self.settings
        archive_bytes = by_setting.get("evolver.archive", 0)
        biggest = max(by_setting, key=by_setting.get, default=None)
        if archive_bytes and (need - archive_bytes <= free or biggest == "evolver.archive"):
            archive = s["archive"]
            # a storage in another memory; a disk archive that does not fit goes to memory
            others = [a for a in ARCHIVES if a != archive and _archive_pool(a, s) != pool]
            fits = self._largest_pop(pool, free)
            pop = f"at most {fits} fits" if fits else "no population of 2 or more fits"
            return ConfigError(
                "evolver.archive",
                archive,
                f"{head}, {human(archive_bytes)} of it for the archive ({s['pop_size']} genomes "
                f"of {human(s['shape'].numel * s['dtype'].itemsize)}); set evolver.archive="
                f"{' or '.join(others)}, "
                f"or lower evolver.pop_size ({pop})",
            )
        cache = by_setting.get("evolver.prune_cache_mb", 0)
        if cache and need - cache <= free:
            # the row holds the masks (what the setting caps) plus one mask being packed and
            # a chunk, which any cache needs: only the first shrinks with the setting
            fixed = -(-s["shape"].numel // 8) + PACK_CHUNK
            room = math.floor((free - (need - cache) - fixed) / 2**20)
            advice = f"to at most {room}" if room >= 1 else "to 0 (no cache)"
            return ConfigError(
                "evolver.prune_cache_mb",
                s["prune_cache_mb"],
                f"{head}, {human(cache)} of it for cached pruning masks; set "
                f"evolver.prune_cache_mb {advice}",
            )
        pop_bytes = by_setting.get("evolver.pop_size", 0)
        if pop_bytes and need - pop_bytes <= free:
            fits = self._largest_pop(pool, free)
            pop = f"at most {fits} fits" if fits else "no population of 2 or more fits"
            return ConfigError(
                "evolver.pop_size",
                s["pop_size"],
                f"{head}, {human(pop_bytes)} of it growing with the population (checkpoints, "
                f"copies of the members at the end); lower evolver.pop_size ({pop})",
            )
        dtype = s["dtype"]
        if dtype == torch.float32:
            return ConfigError(
                "hardware.dtype",
                "float32",
                f"{head}; set hardware.dtype=bfloat16 (halves every genome) or use a device with "
                "more memory",
            )
        largest = max(rows, key=lambda r: r.bytes)
        return ConfigError(
            "hardware.device",
            s["device"],
            f"{head} (largest: {largest.what}, {human(largest.bytes)}); use a device with more "
            "memory, a smaller model or fewer parents",
        )

    def _largest_pop(self, pool: str, free: int) -> int:
        """The largest population whose plan fits ``free`` bytes of ``pool`` (0: none)."""
        lo, hi = 1, int(self.settings["pop_size"]) - 1  # lo: known to fit (1 stands for none)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            plan = plan_evolution(**{**self.settings, "pop_size": mid})
            if plan.peak(pool)[0] <= free:
                lo = mid
            else:
                hi = mid - 1
        return lo if lo >= 2 else 0


def _archive_pool(archive: str, settings: Mapping[str, Any]) -> str:
    if archive == "disk":
        return "disk"
    if archive == "cpu":
        return "host"
    return pool_of(device_label(settings["device"]))


def available_memory(pools: list[str], run_dir: str | Path | None = None) -> dict[str, int]:
    """Free bytes of each pool now: ``host`` (MemAvailable), ``cuda:N`` (``mem_get_info``),
    ``disk`` (free space where ``run_dir`` is, or would be)."""
    out: dict[str, int] = {}
    for pool in pools:
        if pool == "host":
            out[pool] = host_available()
        elif pool.startswith("cuda") and torch.cuda.is_available():
            out[pool] = int(torch.cuda.mem_get_info(torch.device(pool))[0])
        elif pool == "disk" and run_dir is not None:
            path = Path(run_dir).expanduser().resolve()
            while not path.exists():
                path = path.parent
            out[pool] = int(shutil.disk_usage(path).free)
    return out


def host_available() -> int:
    """Host memory a new allocation can get without swapping (psutil, else /proc/meminfo)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


# ---- what each part holds ---------------------------------------------------------------------


Part = tuple[str, int, str]  # (what, bytes, formula)


def pruner_memory(
    pruner: Any, shape: ModelShape, dtype: torch.dtype, calibration: tuple[int, int]
) -> list[Part]:
    """What one pruning call holds on the model's device at its peak.

    A pruner may describe itself with ``memory(shape, dtype, calibration) -> [(what, bytes,
    formula)]``; the known ones are modelled from their code: the layer-wise pruners (Wanda,
    SparseGPT) keep the calibration inputs of one block, in and out, plus per-layer statistics
    (SparseGPT: the Hessians of a block's linears, float32; Wanda's in-loop reference norms:
    one dense calibration pass, once per search); the score pruners hold the float32 scores of
    one layer at a time where the importance scores layers on their own (magnitude, random; not
    with ``global`` granularity), else of every prunable layer (gradient, Taylor, Wanda
    importance). Any other pruner is assumed to hold what a score pruner holds.
    """
    if hasattr(pruner, "memory"):
        return list(pruner.memory(shape, dtype, calibration))
    from sparse_merge.pruning.base import holds_every_mask, ranks_globally
    from sparse_merge.pruning.importance import (
        GradientImportance,
        TaylorImportance,
        WandaImportance,
    )
    from sparse_merge.pruning.layerwise import CalibratedPruner
    from sparse_merge.pruning.scored import ScorePruner
    from sparse_merge.pruning.sparsegpt import SparseGPTPruner

    b = dtype.itemsize
    n_prunable, big = shape.prunable, shape.largest_numel
    hidden, inter = shape.hidden_size, shape.intermediate_size
    glob = ranks_globally(pruner)
    # a search prunes with ``prune_in_place``: one layer's keep-mask at a time (in the
    # selection below) unless ``holds_every_mask``
    held = holds_every_mask(pruner)
    masks = [("keep-masks (bool per prunable weight)", n_prunable, "N x 1 B")] if held else []
    if isinstance(pruner, CalibratedPruner):
        n = min(calibration[0], pruner.n_calibration)
        length, bs = calibration[1], min(pruner.batch_size, n)
        parts = [
            (
                "calibration inputs of a block (in and out)",
                2 * n * length * hidden * b,
                f"2 x n {n} x T {length} x hidden {hidden} x {b} B",
            ),
            (
                "one calibration batch through a block",
                bs * length * ((3 * inter + 4 * hidden) * b + 2 * 4 * max(inter, hidden)),
                f"batch {bs} x T {length} x ((3 x inter + 4 x hidden) x {b} B + float32 inputs)",
            ),
            *masks,
        ]
        if isinstance(pruner, SparseGPTPruner):
            n_in = max(i for _, i in shape.block)
            parts += [
                (
                    "Hessians of one block (float32)",
                    shape.block_hessian * 4,
                    "sum(in^2, one per expert) over a block's linears x 4 B",
                ),
                (
                    "OBS update of the largest layer",
                    big * (4 + 1) + 4 * n_in * n_in * 4,
                    "float32 copy + mask of [out, in], 4 x in^2 float32 (inverse, Cholesky)",
                ),
            ]
        else:
            parts.append(
                (
                    "scores and selection of the largest layer",
                    big * (4 + SELECT_BYTES),
                    f"{shape.largest[0]} x {shape.largest[1]} x (4 + {SELECT_BYTES}) B",
                )
            )
        if getattr(pruner, "in_loop", None) == "reference":
            # once per search, never during a layer-wise pruning: the larger of the two counts
            reference = [
                (
                    "copy of the workspace while the reference norms are measured",
                    shape.numel * b,
                    f"P x {b} B",
                ),
                (
                    "one dense calibration batch (reference norms)",
                    bs * length * ((3 * inter + 4 * hidden) * b + shape.vocab_size * b),
                    f"batch {bs} x T {length} x ((3 x inter + 4 x hidden) + vocab) x {b} B",
                ),
            ]
            parts = max(parts, reference, key=lambda ps: sum(p[1] for p in ps))
        return parts
    importance = getattr(pruner, "importance", None)
    if isinstance(pruner, ScorePruner) and pruner.layer_at_a_time:
        scores = (
            "importance scores of one layer at a time (float32)",
            4 * big,
            "largest layer x 4 B",
        )
    else:
        scores = ("importance scores of every prunable layer (float32)", 4 * n_prunable, "N x 4 B")
    parts = [
        scores,
        *masks,
        (
            "global selection over all layers" if glob else "selection in the largest layer",
            (n_prunable if glob else big) * (4 * glob + SELECT_BYTES),
            f"N x (4 + {SELECT_BYTES}) B" if glob else f"largest layer x {SELECT_BYTES} B",
        ),
    ]
    if isinstance(importance, GradientImportance | TaylorImportance):
        bs, length = importance.batch_size, calibration[1]
        parts += [
            (
                "gradients (model dtype and float32)",
                n_prunable * (b + 4),
                f"N x ({b} + 4) B",
            ),
            (
                "activations kept for the backward pass",
                bs * length * shape.num_layers * (6 * hidden + 3 * inter) * b
                + bs * length * shape.vocab_size * (b + 8),
                "batch x T x (layers x (6 hidden + 3 inter) x b + vocab x (b + 8))",
            ),
        ]
        if isinstance(importance, TaylorImportance):
            parts.append(("|W * grad| besides the gradients", 4 * n_prunable, "N x 4 B"))
    elif isinstance(importance, WandaImportance):
        bs = min(importance.batch_size, calibration[0])
        parts.append(
            (
                "one calibration batch forward",
                bs * calibration[1] * ((3 * inter + 4 * hidden) * b + shape.vocab_size * b),
                "batch x T x ((3 inter + 4 hidden) + vocab) x b",
            )
        )
    return parts


def evaluation_memory(
    shape: ModelShape, dtype: torch.dtype, batch: int, length: int, full_logits: bool
) -> list[Part]:
    """What one evaluation batch holds: logits (model dtype, a float32 copy and its
    log-softmax; generation keeps only the last position's), the KV cache, one layer's
    activations."""
    b = dtype.itemsize
    positions = length if full_logits else 1
    return [
        (
            "logits of one batch" if full_logits else "next-token logits of one batch",
            batch * positions * shape.vocab_size * (b + 8),
            f"batch {batch} x {'T ' + str(length) if full_logits else '1'} x vocab "
            f"{shape.vocab_size} x ({b} + 8) B",
        ),
        (
            "KV cache",
            2 * shape.num_layers * batch * length * shape.kv_dim * b,
            f"2 x layers {shape.num_layers} x batch {batch} x T {length} x kv {shape.kv_dim} x {b} B",
        ),
        (
            "activations of one layer",
            batch * length * (3 * shape.intermediate_size + 4 * shape.hidden_size) * b,
            f"batch x T x (3 x inter + 4 x hidden) x {b} B",
        ),
    ]


def plan_evolution(
    shape: ModelShape,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    pop_size: int,
    archive: str | None = "device",
    n_initial: int = 2,
    base: bool = False,
    pruner: Any = None,
    target: float = 0.5,
    prune_target: str = "parents",
    final_prune: bool = True,
    iterations: int | None = None,
    calibration_n: int = 128,
    calibration_length: int = 128,
    eval_batch: int = 16,
    eval_length: int = 256,
    full_logits: bool = True,
    prune_cache_mb: float = 0.0,
    prune_sparsities: int | None = None,
    checkpoint_every: int = 10,
    run_dir: str | Path | None = None,
    weights: bool = True,
    report: bool = False,
    saved_models: int = 0,
    baselines: int = 0,
) -> MemoryPlan:
    """The memory an evolution over ``shape`` needs, per device (see the module docstring).

    Args:
        shape: the model (``ModelShape.from_config`` / ``from_pretrained``).
        dtype, device: the live model's (``hardware.dtype``, ``hardware.device``).
        pop_size: archive slots; ``archive``: where their genomes live (``device``, ``cpu``,
            ``disk``), or None for an evolver that keeps no archive (then no archive rows).
        n_initial: parent genomes the pipeline keeps on the device; ``base``: a base genome too.
        pruner: the run's pruner (None: no pruning); ``target``: the run's sparsity (0: no
            pruning); ``prune_target``: ``parents`` (a scratch genome stages the first parent),
            ``child`` or ``none``; ``final_prune``: members below the target are copied and
            pruned at the end (counted for every filled slot: the dense parents always are,
            children may be).
        iterations: children made (bounds how many slots fill; None: all of them).
        calibration_n, calibration_length: the pruner's calibration sequences and their length.
        eval_batch, eval_length: the largest evaluation batch and its tokens; ``full_logits``:
            logits at every position (log-likelihood scoring) or only the last (generation).
        prune_cache_mb: host memory for cached keep-masks (MiB, 0: off); ``prune_sparsities``:
            distinct pruning sparsities of the schedule (bounds the cache; None: the cap).
        checkpoint_every: steps between checkpoints; ``run_dir``: where checkpoints and a disk
            archive go (None: nothing is written, no disk rows).
        weights: genomes are model weights [P] (``search=weights``); False for a search over a
            few coefficients (``search=task_vectors``), whose genomes are negligible.
        report: add the merge pipeline's report after the evolution; ``saved_models``: models
            it saves (safetensors, on disk); ``baselines``: classic merge methods it searches
            (``baselines=classic``), each keeping its best genome on the model's device.
    """
    if archive is not None and archive not in ARCHIVES:
        raise ConfigError("evolver.archive", archive, "one of " + ", ".join(ARCHIVES))
    if archive == "disk" and run_dir is None:
        raise ConfigError("evolver.archive", "disk", "device or cpu when a run has no folder")
    settings = dict(locals())  # the arguments, to re-plan with a smaller population
    b = dtype.itemsize
    P = shape.numel
    genome = P * b
    dev = device_label(device)
    on_cpu = pool_of(dev) == "host"
    pruning = pruner is not None and target > 0
    # archive members and the genomes copied from them live where the archive is (a disk
    # archive's members are memory-mapped into host memory when read whole)
    home = dev if archive in (None, "device") or not weights else "host"
    gsize = genome if weights else 0
    filled = pop_size if iterations is None else min(pop_size, n_initial + int(base) + iterations)
    rows: list[MemoryRow] = []

    def add(device_: str, what: str, nbytes: int, formula: str, when=None, setting=None) -> None:
        rows.append(MemoryRow(device_, what, int(nbytes), formula, when, setting))

    g = f"P x {b} B"
    add(dev, "live model (workspace)", genome, g, setting="hardware.dtype")
    if n_initial:
        add(
            dev,
            "parent genomes",
            n_initial * genome,
            f"{n_initial} x {g}",
            setting="hardware.dtype",
        )
    if base:
        add(dev, "base genome", genome, g, setting="hardware.dtype")
    # loading: a checkpoint file is memory-mapped while a genome is read; on an accelerator
    # the genome passes through host memory first
    add("host", "checkpoint file mapped while read", genome, g, frozenset({"load"}))
    if not on_cpu:
        add("host", "host copy of a genome being loaded", genome, g, frozenset({"load"}))

    if archive is not None and pop_size and weights:
        formula = f"pop {pop_size} x {g}"
        if archive == "device":
            add(dev, "archive", pop_size * genome, formula, EVOLVE | AFTER, "evolver.archive")
        elif archive == "cpu":
            pinned = not on_cpu and dev.startswith("cuda")
            nbytes = 2 ** math.ceil(math.log2(pop_size * genome)) if pinned else pop_size * genome
            what = "archive (pinned: rounded up to a power of two)" if pinned else "archive"
            add("host", what, nbytes, formula, EVOLVE | AFTER, "evolver.archive")
        else:
            files = filled + max(min(checkpoint_every, iterations or checkpoint_every), 1)
            add(
                "disk",
                "archive files",
                files * (genome + FILE_HEADER),
                f"(filled {filled} + checkpoint_every) x {g}",
                None,
                "evolver.archive",
            )
            if not on_cpu:
                add("host", "staging buffers of genome files", 2 * IO_CHUNK, "2 x 16 MiB", EVOLVE)
        staged = archive != "device"
        if staged or (pruning and prune_target == "parents"):
            add(dev, "scratch genome (first parent)", genome, g, SEARCH)
        if run_dir is not None and archive != "disk":
            add(
                "disk",
                "checkpoint (the last one and the one being written)",
                2 * pop_size * genome,
                f"2 x {formula}",
                None,
                "evolver.pop_size",
            )
            if archive == "device" and not on_cpu:
                add(
                    "host",
                    "host copy of the archive for a checkpoint",
                    pop_size * genome,
                    formula,
                    frozenset({"checkpoint"}),
                    "evolver.archive",
                )

    work: dict[str, list[Part]] = {
        "evaluate": evaluation_memory(shape, dtype, eval_batch, eval_length, full_logits)
    }
    if pruning:
        work["prune"] = pruner_memory(pruner, shape, dtype, (calibration_n, calibration_length))
        cached = (
            prune_target == "parents"
            and prune_cache_mb > 0
            and not getattr(pruner, "updates_weights", False)
            and archive is not None
        )
        if cached:
            mask = -(-P // 8)
            cap = int(prune_cache_mb * 2**20)
            keys = None if prune_sparsities is None else filled * (prune_sparsities + 1)
            held = cap if keys is None else min(cap, keys * mask)
            add(
                "host",
                "pruning cache (packed keep-masks)",
                held + mask + PACK_CHUNK,
                f"min(prune_cache_mb, members x sparsities x P/8) + P/8 + {human(PACK_CHUNK)}",
                SEARCH,
                "evolver.prune_cache_mb",
            )
    # the larger working set is also there while the evolver (and the pipeline) finish
    larger = max(work, key=lambda k: sum(p[1] for p in work[k]))
    for moment, parts in work.items():
        when = frozenset({moment}) | (
            frozenset({"finish", "report"}) if moment == larger else set()
        )
        for what, nbytes, formula in parts:
            add(dev, f"{moment}: {what}", nbytes, formula, when)

    if archive is not None and weights:
        if final_prune and pruning:
            add(
                home,
                "final prune: one member below the target, copied and pruned",
                genome,
                g,
                frozenset({"finish"}),
            )
        add(home, "picks (best, sparse)", 2 * gsize, f"2 x {g}", frozenset({"finish"}) | AFTER)
    if report:
        add(home, "picks copied for the report", 2 * genome, f"2 x {g}", AFTER)
        if pruning:
            add(dev, "pruned copy of a parent (reference rows)", genome, g, AFTER)
        if not on_cpu or archive == "disk":
            add("host", "a genome hashed for the held-out memo", genome, g, AFTER)
        if saved_models and run_dir is not None:
            add("disk", "saved models", saved_models * genome, f"{saved_models} x {g}")
        if baselines:  # each method's best so far, and the one taking its place
            add(
                dev,
                "baselines: each method's best genome, and a new best being copied",
                (baselines + 1) * genome,
                f"({baselines} + 1) x {g}",
                AFTER,
                "baselines",
            )

    header = (
        f"memory plan: P = {P:,} parameters (N = {shape.prunable:,} prunable), "
        f"{str(dtype).removeprefix('torch.')} ({b} B) on {dev}, archive "
        f"{archive if archive is not None else 'none'}"
        + (f" x {pop_size}" if archive is not None else "")
    )
    return MemoryPlan(rows, settings, header)


# ---- the merge pipeline's settings --------------------------------------------------------------


def schedule_sparsities(evolver: Any, target: float) -> int | None:
    """Distinct pruning sparsities an evolver's schedule gives over its iterations (None: no
    schedule, or too many iterations to enumerate)."""
    schedule, iterations = getattr(evolver, "schedule", None), getattr(evolver, "iterations", None)
    if schedule is None or iterations is None or iterations > 100_000:
        return None
    if hasattr(schedule, "bind"):
        schedule = schedule.bind(target)
    return len({float(schedule(step)) for step in range(int(iterations))})


def evolver_settings(evolver: Any, target: float) -> dict[str, Any]:
    """The plan's evolver arguments, read from any evolver (with defaults for the knobs it
    lacks: an evolver without ``pop_size`` keeps no archive the plan knows of)."""
    pop_size = getattr(evolver, "pop_size", None)
    return {
        "pop_size": int(pop_size or 0),
        "archive": getattr(evolver, "archive", "device") if pop_size else None,
        "prune_cache_mb": float(getattr(evolver, "prune_cache_mb", 0.0)),
        "prune_sparsities": schedule_sparsities(evolver, target),
        "checkpoint_every": int(getattr(evolver, "checkpoint_every", 0) or 0),
        "iterations": getattr(evolver, "iterations", None),
        "prune_target": getattr(evolver, "prune_target", "parents"),
        "final_prune": bool(getattr(evolver, "final_prune", False)),
    }


def evaluation_size(tasks: Any, tokenizer: Any, default_length: int) -> dict[str, Any]:
    """The largest evaluation batch of a ``TaskSuite``'s selection split: its batch size, its
    tokens (the longest prompt, tokenized, plus ``max_new_tokens``; for a task whose prompts
    cannot be listed its ``window`` or ``max_length``, else ``default_length``) and whether
    logits are kept at every position (any task that is not a generation task)."""
    batch, length, full = 1, 1, False
    for bench in tasks.tasks.values():
        task = bench.selection
        new = int(getattr(task, "max_new_tokens", 0) or 0)
        prompts: Callable | None = getattr(task, "prompts", None)
        if callable(prompts) and len(task):
            ids = tokenizer(list(prompts(tokenizer)), add_special_tokens=False)["input_ids"]
            longest = max(len(x) for x in ids) + 1
        else:  # a corpus window, a task's own length cap, or the default
            longest = getattr(task, "window", None) or getattr(task, "max_length", None)
            longest = int(longest or default_length)
        batch = max(batch, min(int(getattr(task, "batch_size", 16) or 16), max(len(task), 1)))
        length = max(length, longest + new)
        full = full or not new
    return {"eval_batch": batch, "eval_length": length, "full_logits": full}


def plan_merge(
    first: str | Path,
    evolver: Any,
    pruner: Any,
    tasks: Any,
    tokenizer: Any,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    n_parents: int,
    base: bool,
    target: float,
    calibration: Any,
    run_dir: str | Path | None,
    write: bool = True,
    weights: bool = True,
    save_models: bool = False,
    baselines: int = 0,
) -> MemoryPlan:
    """The plan of a merge run (``pipelines.merge.run_merge``), from the first parent's config
    and the run's parts, before any model is loaded. ``write=False`` (the other processes of a
    multi-process run): a disk archive is kept in host memory there, as the evolver does."""
    settings = evolver_settings(evolver, target)
    if settings["archive"] == "disk" and not write:
        settings["archive"] = "cpu"
    return plan_evolution(
        ModelShape.from_pretrained(first),
        dtype=dtype,
        device=device,
        n_initial=n_parents,
        base=base,
        pruner=pruner,
        target=target,
        calibration_n=calibration.n,
        calibration_length=calibration.length,
        run_dir=run_dir,
        weights=weights,
        report=True,
        saved_models=2 if save_models and write else 0,  # the picks (best and sparse)
        baselines=baselines,  # full models, whatever the search
        **settings,
        **evaluation_size(tasks, tokenizer, calibration.length),
    )
