"""The composition root: the only module (with ``config``) that knows Hydra.

``run(cfg)`` validates the composed config, builds every part with
``hydra.utils.instantiate`` (cheap constructors that check their values, so bad input fails
before any model is loaded), runs the pipeline named by ``cfg.pipeline`` and always closes the
loggers.
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

import sparse_merge.pipelines
from sparse_merge.config import GROUPS, validate
from sparse_merge.errors import ConfigError
from sparse_merge.tracking.io import write_json

log = logging.getLogger("sparse_merge")


def _instantiate(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """``instantiate`` with a ``ConfigError`` raised anywhere inside reported under ``key``."""
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, ConfigError):
            raise cause.under(key) from None
        raise


def _name_wandb_run(cfg: DictConfig) -> None:
    """W&B defaults from Hydra: one group per sweep (its directory name), the run named by its
    overrides; values set in the config win."""
    wandb = cfg.logger.get("wandb") if cfg.get("logger") else None
    if wandb is None or not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    with open_dict(cfg):
        if wandb.get("name") is None:
            wandb.name = hc.job.override_dirname or "default"
        if wandb.get("group") is None and hc.mode == RunMode.MULTIRUN:
            wandb.group = Path(hc.sweep.dir).name


def build(cfg: DictConfig) -> dict[str, Any]:
    """Validate ``cfg`` and instantiate every group; raises ``ConfigError`` on bad input."""
    validate(cfg)
    if cfg.pipeline not in pipelines():
        raise ConfigError("pipeline", cfg.pipeline, "one of " + ", ".join(pipelines()))
    _name_wandb_run(cfg)
    parts = {}
    for group in GROUPS:  # cheap constructors: nothing heavy is loaded here
        node = cfg.get(group)
        parts[group] = None if node is None or "_target_" not in node else _instantiate(node, group)
    return parts


def pipelines() -> list[str]:
    """Pipeline names: every module of ``sparse_merge.pipelines`` with a ``run(cfg, parts,
    run_dir)`` function (a new pipeline is one file, no edits here)."""
    pkg = sparse_merge.pipelines
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def _pipeline(name: str):
    return importlib.import_module(f"sparse_merge.pipelines.{name}").run


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The run's config as a plain dict, interpolations resolved, Hydra's own node left out."""
    keys = [k for k in cfg if k != "hydra"]
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True)


def execute(cfg: DictConfig) -> float | None:
    """Build the parts and run the pipeline; raises ``ConfigError`` on bad input."""
    parts = build(cfg)
    run_dir = Path(cfg.output_dir)
    logger = parts["logger"]
    logger.start(run_dir, resolved(cfg))
    # status.json lets sweep analysis tell finished, failed and running runs apart; under
    # `accelerate launch` only the main process (RANK 0) writes it, so a late rank cannot
    # overwrite the main process's metric
    main = int(os.environ.get("RANK", "0")) == 0

    def status(**fields: Any) -> None:
        if main:
            write_json(run_dir / "status.json", fields)

    status(status="running", started=time.time())
    try:
        metric = _pipeline(cfg.pipeline)(cfg, parts, run_dir)
    except BaseException as exc:
        status(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        logger.close()
    status(status="finished", metric=metric, finished=time.time())
    return metric


def run(cfg: DictConfig) -> float | None:
    """Entry point of ``run.py``: like ``execute`` but a bad value exits with one clear line."""
    try:
        return execute(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
