"""One logger for a run: console, a JSONL file that always exists, and W&B when switched on.

W&B never blocks or breaks a run: it runs offline when no API key is configured or when its
server cannot be reached (a 3-second connection test, instead of W&B's own minute of waiting),
and any error it raises is reported once and logging continues locally.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sparse_merge.tracking.io import reachable, to_jsonable, write_json

log = logging.getLogger("sparse_merge")


def _number(v: Any) -> bool:
    return isinstance(v, int | float)


def wandb_scalars(record: Mapping[str, Any]) -> dict[str, Any]:
    """The scalars of a JSONL record for W&B: its numbers (not ``time``), and the numbers of
    any flat mapping of numbers under ``<key>/<name>``; lists and nested mappings stay local."""
    out: dict[str, Any] = {}
    for k, v in record.items():
        if _number(v) and k != "time":
            out[k] = v
        elif isinstance(v, Mapping) and v and all(_number(x) for x in v.values()):
            out.update({f"{k}/{name}": x for name, x in v.items()})
    return out


def server_url() -> str:
    """The W&B server runs are sent to (``WANDB_BASE_URL``, else W&B's cloud)."""
    return os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"


def server_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the W&B server opens within ``timeout`` seconds."""
    url = urlparse(server_url())
    return reachable(
        url.hostname or "", url.port or (443 if url.scheme == "https" else 80), timeout
    )


class WandbSink:
    """Forwards metrics to a W&B run (offline unless an API key or ``mode`` says otherwise)."""

    def __init__(
        self,
        project: str = "sparse_merge",
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        mode: str | None = None,
    ) -> None:
        self.kwargs = dict(
            project=project, entity=entity, group=group, name=name, tags=tags or None
        )
        self.mode = mode
        self.run: Any = None

    def start(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        """Open the W&B run (offline when its server does not answer); on failure warn and
        stay off."""
        mode = self.mode or os.environ.get("WANDB_MODE")
        if mode is None:
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        if mode == "online" and not server_reachable():
            log.warning(
                "W&B server %s not reachable: logging offline (`wandb sync` uploads it later)",
                server_url(),
            )
            mode = "offline"
        try:
            import wandb

            self.run = wandb.init(
                dir=str(run_dir),
                config=dict(config),
                mode=mode,
                reinit="finish_previous",
                settings=wandb.Settings(init_timeout=60, silent=True),
                **{k: v for k, v in self.kwargs.items() if v is not None},
            )
            # records carry their step as a value, plotted against: W&B's own step counts
            # every record, so records without a step (the initial members, the setup) would
            # have moved it past the first steps, which W&B then dropped as out of order
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")
        except Exception as exc:  # W&B must never stop a run
            log.warning("W&B disabled for this run: %s", exc)
            self.run = None

    def log(self, metrics: Mapping[str, Any], step: int | None) -> None:
        """Log scalars: a record's ``step`` is among them (``wandb_scalars``), the value the
        charts plot against; W&B's own step is left to count the records."""
        if self.run is not None:
            try:
                self.run.log(dict(metrics))
            except Exception as exc:
                log.warning("W&B log failed, continuing locally: %s", exc)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        """Set summary values."""
        if self.run is not None:
            try:
                self.run.summary.update(dict(metrics))
            except Exception as exc:
                log.warning("W&B summary failed: %s", exc)

    def close(self) -> None:
        """Finish the W&B run (a failure is reported, never raised: the run's results stand)."""
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as exc:
                log.warning("W&B finish failed (the run's own files are complete): %s", exc)
            finally:
                self.run = None


class RunLogger:
    """Logs metrics to ``<run_dir>/log.jsonl`` (always) and to W&B when ``wandb`` is given."""

    def __init__(self, wandb: WandbSink | None = None, console: bool = True) -> None:
        self.wandb = wandb
        self.console = console
        self.run_dir: Path | None = None
        self._file = None
        self._summary: dict[str, Any] = {}

    def start(self, run_dir: str | Path, config: Mapping[str, Any] | None = None) -> RunLogger:
        """Open the JSONL file (appending, so a resumed run continues it) and W&B."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "log.jsonl", "a", buffering=1)  # noqa: SIM115
        if self.wandb is not None:
            self.wandb.start(self.run_dir, config or {})
        return self

    def log(
        self, metrics: Mapping[str, Any], step: int | None = None, console: bool = False
    ) -> None:
        """One JSONL record (with ``step`` and wall time); scalars also go to W&B, and so do the
        numbers of a flat mapping of numbers, as ``<key>/<name>`` (the per-layer sparsity of a
        step: ``layer_sparsity/<layer>``)."""
        record = {
            "time": time.time(),
            **({"step": step} if step is not None else {}),
            **to_jsonable(dict(metrics)),
        }
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
        if self.console and console:
            log.info(" ".join(f"{k}={v}" for k, v in record.items() if k != "time"))
        if self.wandb is not None:
            self.wandb.log(wandb_scalars(record), step)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        """Final metrics: kept in ``summary.json`` and set as the W&B summary."""
        self._summary.update(to_jsonable(dict(metrics)))
        if self.run_dir is not None:
            write_json(self.run_dir / "summary.json", self._summary)
        if self.wandb is not None:
            self.wandb.summary(metrics)

    def close(self) -> None:
        """Close the file and W&B (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.wandb is not None:
            self.wandb.close()
