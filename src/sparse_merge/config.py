"""Config schemas (Hydra ConfigStore) and checks of the composed config before any heavy work.

The top-level schema types the global knobs (a mistyped or ill-typed key fails at compose
time). Group nodes are checked against the signature of their ``_target_``: a key the target
does not take is reported with the keys it does take, before anything is built. Value ranges
are checked by the targets' own constructors (``ConfigError``), which ``app.build`` calls
before any model is loaded.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, ListConfig

from sparse_merge.errors import ConfigError, check_fraction, check_positive
from sparse_merge.finetune.settings import FinetuneSettings
from sparse_merge.finetune.throughput import ThroughputSettings
from sparse_merge.pruning.settings import CalibrationSettings, MasksSettings

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


def validate(cfg: DictConfig) -> None:
    """Check the global knobs and the keys of every group; raises ``ConfigError``."""
    check_fraction("sparsity", cfg.sparsity)
    check_positive("seed", cfg.seed, allow_zero=True)
    for group in GROUPS:
        node = cfg.get(group)
        if node is not None:
            check_target_keys(node, group)
