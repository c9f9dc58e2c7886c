"""The composition root: the only module (with ``config``) that knows Hydra.

``run(cfg)`` validates the composed config, builds every part with
``hydra.utils.instantiate`` (cheap constructors that check their values, so bad input fails
before any model is loaded), checks that the run directory is writable and holds no other run's
files (``tracking/run_identity.py``), runs the pipeline named by ``cfg.pipeline`` and always
closes the loggers. A config error, a run directory of another run and a write the OS refuses
(disk full, file-size limit, read-only folder) end in one line on stderr, not a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import pkgutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

import sparse_merge.pipelines
from sparse_merge.config import GROUPS, check_parts, config_error_in, validate
from sparse_merge.errors import ConfigError
from sparse_merge.tracking.io import (
    RunDirBusy,
    WriteError,
    check_writable,
    fit_file_name,
    is_main_process,
    lock_run_dir,
    write_atomic,
    write_json,
)
from sparse_merge.tracking.run_identity import (
    IDENTITY_FILE,
    STATUS_FILE,
    RunDirTaken,
    RunIdentity,
    claim_run_dir,
)

log = logging.getLogger("sparse_merge")
REFUSED_JOBS: list[str] = []  # the job folders of this sweep whose config was refused


def _instantiate(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """``instantiate`` with a ``ConfigError`` raised anywhere inside reported under the full key
    of the node that raised it (``evolver.schedule.low``)."""
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as exc:
        error = config_error_in(exc, key)  # keyed by the full path of the node that raised it
        if error is not None:
            raise error from None
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
    check_processes(cfg.pipeline)
    _name_wandb_run(cfg)
    parts = {}
    for group in GROUPS:  # cheap constructors: nothing heavy is loaded here
        node = cfg.get(group)
        parts[group] = None if node is None or "_target_" not in node else _instantiate(node, group)
    check_parts(cfg, parts)  # values that clash only together (pruner x schedule, lora x model)
    return parts


def pipelines() -> list[str]:
    """Pipeline names: every module of ``sparse_merge.pipelines`` with a ``run(cfg, parts,
    run_dir)`` function (a new pipeline is one file, no edits here)."""
    pkg = sparse_merge.pipelines
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def _pipeline(name: str):
    return importlib.import_module(f"sparse_merge.pipelines.{name}").run


def launched_processes() -> int:
    """How many processes the launch this process belongs to has (``torchrun``, ``accelerate
    launch``, MPI: read from the environment, as Accelerate reads it); 1 on its own."""
    from accelerate.utils import get_cpu_distributed_information

    return int(get_cpu_distributed_information().world_size)


def check_processes(name: str) -> None:
    """Refuse, before anything loads, a multi-process launch of a pipeline that does not split
    its work (``MULTI_PROCESS`` in its module: merge, fine-tuning, throughput): every process
    would run the whole pipeline and write its files (masks, results, log records) beside the
    others, unlocked."""
    processes = launched_processes()
    if processes <= 1:
        return

    def splits(pipeline: str) -> bool:
        module = importlib.import_module(f"sparse_merge.pipelines.{pipeline}")
        return bool(getattr(module, "MULTI_PROCESS", False))

    if not splits(name):
        able = ", ".join(p for p in pipelines() if splits(p))
        raise ConfigError(
            "pipeline",
            name,
            f"{able} under a launch of {processes} processes (every process would run the "
            f"whole {name} pipeline and write its files); run it as one process: python run.py",
        )


def _suffix(name: str | None) -> str:
    """``_<name>``, or nothing for ``None``: ``${sm.suffix:...}`` in the run and sweep directory
    names of ``conf/config.yaml`` (``outputs/<day>/<time>_<experiment>``)."""
    return f"_{name}" if name not in (None, "") else ""


def _job_dirname(num: int | str, overrides: str) -> str:
    """``<num>_<overrides>``, Hydra's sweep job folder name (``${sm.dirname:...}`` in
    ``conf/config.yaml``), fitted to a file name's length (``fit_file_name``): a sweep with
    many overrides made a longer one, the OS refused the folder, and the sweep ended at its
    first job."""
    return fit_file_name(f"{num}_{overrides}")


def register_resolvers() -> None:
    """The config's own interpolations (``run.py`` calls it before Hydra reads the config)."""
    OmegaConf.register_new_resolver("sm.suffix", _suffix, replace=True)
    OmegaConf.register_new_resolver("sm.dirname", _job_dirname, replace=True)


class WriteProbe(Callback):
    """Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``): before Hydra makes the job
    folder and writes ``.hydra/`` and its log there, check the folder can be written, so a
    read-only folder or a full disk ends in one line, not in Hydra's traceback."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A single run: its ``hydra.run.dir``."""
        _probe(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A sweep: its ``hydra.sweep.dir`` (the jobs' folders lie in it)."""
        _probe(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """A sweep in which jobs were refused (each already said why) exits 2 once all its
        jobs have run, so a script sees it (jobs run by other processes, as joblib's, are not
        counted here; their folders say failed)."""
        if REFUSED_JOBS:
            print(f"error: {len(REFUSED_JOBS)} job(s) of the sweep refused", file=sys.stderr)
            raise SystemExit(2)


def _probe(directory: str) -> None:
    try:
        check_writable(directory)
    except WriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def identity(cfg: DictConfig) -> RunIdentity:
    """The run ``cfg`` is: its pipeline, its experiment and its config as Hydra saved it in
    ``.hydra/config.yaml`` (take it before ``build``, which names W&B runs)."""
    hydra = cfg.get("hydra") or (HydraConfig.get() if HydraConfig.initialized() else None)
    experiment = OmegaConf.select(hydra, "runtime.choices.experiment") if hydra else None
    config = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    overrides = OmegaConf.select(hydra, "overrides.task") if hydra else None
    choices = OmegaConf.select(hydra, "runtime.choices") if hydra else None
    return RunIdentity(
        str(cfg.pipeline),
        experiment,
        config,
        tuple(str(o) for o in overrides or ()),
        {str(k): v for k, v in (choices or {}).items()},
    )


def continues(cfg: DictConfig) -> bool:
    """Whether the run continues what its directory holds: ``resume=true``, or a pipeline that
    reuses its own files by their recorded settings (``CONTINUES_IN_PLACE``: digits)."""
    module = importlib.import_module(f"sparse_merge.pipelines.{cfg.pipeline}")
    return bool(cfg.get("resume", False)) or getattr(module, "CONTINUES_IN_PLACE", False)


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The run's config as a plain dict, interpolations resolved, Hydra's own node left out."""
    keys = [k for k in cfg if k != "hydra"]
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True)


def execute(cfg: DictConfig) -> float | None:
    """Build the parts, claim the run directory and run the pipeline; raises ``ConfigError`` on
    bad input or a directory holding another run's files, ``WriteError`` when it cannot be
    written. Torch's thread count is put back afterwards: the next job of an in-process sweep
    with ``hardware.num_threads=0`` (torch's default) used to inherit this job's count."""
    threads = torch.get_num_threads()
    try:
        return _execute(cfg)
    finally:
        torch.set_num_threads(threads)


def _execute(cfg: DictConfig) -> float | None:
    this_run = identity(cfg)
    parts = build(cfg)
    run_dir = Path(cfg.output_dir)
    # under `accelerate launch` only the main process (rank 0) writes the run's own files, so a
    # late rank cannot overwrite the main process's metric; the other ranks check, not write
    main = is_main_process()
    if main:
        check_writable(run_dir)  # a read-only folder or a full disk: refused before any model loads
    with lock_run_dir(run_dir, main=main):  # one process per run directory, claim included
        kept = _claim_files(run_dir) if continues(cfg) and main else None
        claim_run_dir(run_dir, this_run, continues=continues(cfg), write=main)
        try:
            return _run_pipeline(cfg, parts, run_dir, main)
        except ConfigError:
            if kept is not None:  # a refused resume leaves the run it would continue as it was
                _restore_files(run_dir, kept)
            raise


def _claim_files(run_dir: Path) -> dict[str, bytes | None]:
    """The bytes of the run directory's identity and status files (None: absent)."""
    return {
        name: (run_dir / name).read_bytes() if (run_dir / name).exists() else None
        for name in (IDENTITY_FILE, STATUS_FILE)
    }


def _restore_files(run_dir: Path, kept: dict[str, bytes | None]) -> None:
    """Put back what ``_claim_files`` read: a resume refused (``resume=true`` with a changed
    setting) rewrote the identity with its own settings and the status as failed, and the
    finished results beside them would then have dropped out of every table."""
    for name, data in kept.items():
        path = run_dir / name
        if data is None:
            path.unlink(missing_ok=True)
        else:
            write_atomic(path, lambda tmp, data=data: tmp.write_bytes(data))


def _run_pipeline(cfg: DictConfig, parts: dict[str, Any], run_dir: Path, main: bool) -> Any:
    """Run the pipeline between the loggers' start and close; ``status.json`` lets sweep analysis
    tell finished, failed and running runs apart."""
    logger = parts["logger"]
    if not main and getattr(logger, "wandb", None) is not None:
        logger.wandb = None  # one W&B run per launch, the main process's (the others log nothing)
    logger.start(run_dir, resolved(cfg))

    def status(**fields: Any) -> None:
        if main:
            write_json(run_dir / "status.json", fields)

    status(status="running", started=time.time())
    try:
        metric = _pipeline(cfg.pipeline)(cfg, parts, run_dir)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # on a full disk the run's own error is the news
            status(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        logger.close()
    status(status="finished", metric=metric, finished=time.time())
    return metric


# the OS's reasons that only a write gives: reported as one line even from a writer that is not
# write_atomic (the JSONL log's appends)
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def _write_failure(exc: OSError, run_dir: str) -> str:
    """One line for a write the OS refused: ``WriteError``'s own; for another writer (not
    ``write_atomic``) the file or the function that was writing, the folder and the reason."""
    if isinstance(exc, WriteError):
        return str(exc)
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    what = exc.filename or (tb.tb_frame.f_code.co_qualname if tb is not None else "a writer")
    error = WriteError(exc.filename or run_dir, exc)
    return "; ".join(
        x
        for x in (
            f"could not write in {run_dir} ({what}): {error.reason}",
            error.advice,
            "results and checkpoints written before are intact (each is replaced only by a "
            "complete copy)",
        )
        if x
    )


def _in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _record_refusal(run_dir: Path, exc: ConfigError) -> None:
    """``status.json`` = failed, with the error, in a job folder of this run's own: not in one
    that holds another run's files or is busy (those refusals protect it)."""
    REFUSED_JOBS.append(str(run_dir))
    if isinstance(exc, RunDirTaken | RunDirBusy) or (run_dir / STATUS_FILE).exists():
        return
    with contextlib.suppress(OSError):
        write_json(run_dir / STATUS_FILE, {"status": "failed", "error": f"ConfigError: {exc}"})


def run(cfg: DictConfig) -> float | None:
    """Entry point of ``run.py``: like ``execute`` but a bad value or a run directory holding
    another run's files exits (2), and a write the OS refused exits (1), with one clear line.
    In a sweep a job's bad value ends that job only: its folder records it as failed, with the
    line, and the sweep goes on (an exit ended the whole sweep, and the later jobs never ran)."""
    try:
        return execute(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if _in_sweep():
            _record_refusal(Path(cfg.output_dir), exc)
            return None
        raise SystemExit(2) from None
    except OSError as exc:
        if not isinstance(exc, WriteError) and exc.errno not in WRITE_ERRNOS:
            raise
        print(f"error: {_write_failure(exc, cfg.output_dir)}", file=sys.stderr)
        raise SystemExit(1) from None
