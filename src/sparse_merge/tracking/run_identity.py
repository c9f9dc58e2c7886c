"""Which run a run directory's files belong to, so two runs never mix their files in one folder.

When a run starts, ``claim_run_dir`` writes ``run_identity.json`` into its directory: the
pipeline, the experiment, the run's composed config (exactly as Hydra saves it in
``.hydra/config.yaml``, interpolations unresolved, with ``resume`` and ``output_dir`` left out:
how and where a run goes, not which run it is) and its SHA-256 (``config_digest``). It refuses,
with one line, to start in a directory that holds another run's files:

- an identity with another digest (a run of other settings, another pipeline or experiment);
- the finished results (``status.json``) of this very run, unless the run continues it;
- a ``status.json`` with no identity (a run from before identities were recorded), unless the
  run continues it.

A run *continues* its directory with ``resume=true``, or when its pipeline reuses its own files
by their recorded settings (``CONTINUES_IN_PLACE`` in the pipeline module: the digits
comparison keeps one file per job and reruns only jobs whose settings changed). Continuing is
allowed only for the same pipeline and experiment; the pipeline checks the rest (a resume
refuses changed settings against its checkpoint). Hydra rewrites ``.hydra/`` before a job
starts, so a refused run has already replaced that folder: the analysis
(``analysis/collect.py``) compares ``.hydra/config.yaml`` with the identity's config
(``disagreements``) and leaves out a directory where a value differs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparse_merge.errors import ConfigError
from sparse_merge.tracking.io import flat_keys, write_json

IDENTITY_FILE = "run_identity.json"
STATUS_FILE = "status.json"  # written by app.execute: running, failed or finished
NOT_IDENTITY = ("resume", "output_dir", "hydra")  # how and where a run goes, not which run


def identity_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A composed config as plain data (``OmegaConf.to_container(cfg)``, not resolved, as
    ``.hydra/config.yaml`` holds it) without the keys of ``NOT_IDENTITY``, JSON-normalised."""
    kept = {str(k): v for k, v in config.items() if k not in NOT_IDENTITY}
    return json.loads(json.dumps(kept, default=str))


def config_digest(config: Mapping[str, Any]) -> str:
    """SHA-256 of ``identity_config(config)``."""
    text = json.dumps(identity_config(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def disagreements(recorded: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    """The keys whose value in ``config`` (``.hydra/config.yaml``) is not the one the identity
    ``recorded``, as ``key=<value in config> (results: <recorded value>)``; a key ``config``
    does not hold is not compared."""
    saved = flat_keys(recorded)
    return [
        f"{key}={value!r} (results: {saved.get(key)!r})"
        for key, value in flat_keys(identity_config(config)).items()
        if saved.get(key) != value
    ]


@dataclass(frozen=True)
class RunIdentity:
    """What makes a run this run: its pipeline, experiment (``None``: none) and composed config
    (``identity_config``; its digest compares two runs)."""

    pipeline: str
    experiment: str | None
    config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)
    # how Hydra launched it (the command line's overrides, the group choices): what the sweep
    # analysis groups by, read from here rather than from .hydra/, which every launch into the
    # folder rewrites, a refused one too
    overrides: tuple[str, ...] = field(default=(), compare=False, hash=False, repr=False)
    choices: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)
    config_sha256: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", identity_config(self.config))
        object.__setattr__(self, "config_sha256", config_digest(self.config))

    def record(self) -> dict[str, Any]:
        """What ``run_identity.json`` holds (and when the run claimed its folder)."""
        return {
            "pipeline": self.pipeline,
            "experiment": self.experiment,
            "config_sha256": self.config_sha256,
            "claimed": time.time(),
            "config": self.config,
            "overrides": list(self.overrides),
            "choices": dict(self.choices),
        }

    def same_kind(self, other: Mapping[str, Any]) -> bool:
        """Whether ``other`` (a stored identity) is of this run's pipeline and experiment."""
        return (other.get("pipeline"), other.get("experiment")) == (
            self.pipeline,
            self.experiment,
        )


def describe(identity: Mapping[str, Any]) -> str:
    """``pipeline=merge, experiment=smoke`` of a stored identity (``experiment=none``)."""
    return f"pipeline={identity.get('pipeline')}, experiment={identity.get('experiment') or 'none'}"


def read_json(path: Path) -> dict[str, Any] | None:
    """The object in ``path``, or ``None`` when it is missing or not a JSON object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class RunDirTaken(ConfigError):
    """The run directory holds another run's files (``claim_run_dir``); one line."""

    def __init__(self, run_dir: Path, holds: str, advice: str | None = None) -> None:
        advice = advice or (
            "pass resume=true to continue that run, or give this run a directory of its own "
            "(another output_dir or hydra.run.dir; hydra.sweep.dir for a sweep)"
        )
        super().__init__("output_dir", str(run_dir), f"it holds {holds}; {advice}")


def claim_run_dir(
    run_dir: str | Path, identity: RunIdentity, *, continues: bool, write: bool = True
) -> None:
    """Refuse (``RunDirTaken``) to start the run ``identity`` in ``run_dir`` when the folder
    holds another run's files (see the module docstring), else record ``identity`` there
    (``write``: the main process; the others only check). Call it while holding the folder's
    lock (``lock_run_dir``), so two runs cannot both claim it."""
    run_dir = Path(run_dir)
    held = read_json(run_dir / IDENTITY_FILE)
    status = read_json(run_dir / STATUS_FILE)
    state = (status or {}).get("status", "unknown")
    finished = state == "finished"
    files = "the finished results" if finished else "the files"

    def run_of(*notes: str) -> str:  # (pipeline=merge, experiment=smoke, ..., status failed)
        return ", ".join([*notes, *([] if finished else [f"status {state}"])])

    if held is not None:
        if continues and not identity.same_kind(held):
            raise RunDirTaken(
                run_dir,
                f"{files} of a run of another kind ({run_of(describe(held))})",
                f"a run continues only a run of its own pipeline and experiment "
                f"({describe(identity.record())}); give it a directory of its own "
                "(another output_dir or hydra.run.dir; hydra.sweep.dir for a sweep)",
            )
        if not continues and held.get("config_sha256") != identity.config_sha256:
            holds = f"{files} of another run ({run_of(describe(held), 'other settings')})"
            raise RunDirTaken(run_dir, holds)
        if not continues and finished:
            raise RunDirTaken(run_dir, f"the finished results of this same run ({describe(held)})")
    elif status is not None and not continues:
        holds = f"{files} of a run that recorded no identity ({run_of('an older run')})"
        raise RunDirTaken(run_dir, holds)
    if write:
        write_json(run_dir / IDENTITY_FILE, identity.record())
