"""Atomic file writes: a crash never leaves a half-written result or checkpoint."""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _fsync(path: str | Path) -> None:
    """Flush a file's (or a directory's) data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it over ``path``;
    the file and the rename are flushed to the disk (``fsync``) before it returns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        _fsync(tmp)  # the data is on disk before the name points at it
        os.replace(tmp, path)
        _fsync(path.parent)  # and the rename itself survives a power loss
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # tensors, numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, default=_jsonable)
    return write_atomic(path, lambda tmp: tmp.write_text(text + "\n"))


def to_jsonable(data: Any) -> Any:
    """``data`` with tensors and paths turned into JSON types."""
    return json.loads(json.dumps(data, default=_jsonable))


def write_atomic_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` on a fresh temporary directory next to ``path``, then move it
    into place (replacing an older ``path``), so a crash never leaves a half-written folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Rows of dicts as CSV (columns of the first row), atomically."""
    columns = list(rows[0]) if rows else []

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    return write_atomic(path, write)


CHECKSUM_KEY = "sha256"  # the digest a checked file stores next to its content


def _digest(obj: Any, h) -> None:
    """Feed ``obj`` (nested dicts, lists and tuples of tensors and plain values) to ``h``."""
    if isinstance(obj, dict):
        for key in sorted(obj, key=str):
            h.update(repr(key).encode())
            _digest(obj[key], h)
    elif isinstance(obj, list | tuple):
        h.update(f"{type(obj).__name__}{len(obj)}".encode())
        for item in obj:
            _digest(item, h)
    elif hasattr(obj, "view") and hasattr(obj, "dtype") and hasattr(obj, "numel"):  # a tensor
        import torch

        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    else:
        h.update(repr(obj).encode())


def save_checked(path: str | Path, state: dict[str, Any]) -> Path:
    """``torch.save`` of ``state`` plus the SHA-256 of its content, atomically (written straight
    into the temporary file, no copy in memory first)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    _digest(state, h)
    checked = {**state, CHECKSUM_KEY: h.hexdigest()}
    return write_atomic(path, lambda tmp: torch.save(checked, tmp))


def load_checked(path: str | Path) -> dict[str, Any]:
    """The state ``save_checked`` wrote, loaded with ``weights_only=True`` (a file that carries
    code is refused, never run); a damaged, truncated or empty file, or one whose content does
    not match its checksum, raises ``ValueError`` with one line saying so."""
    import hashlib
    import pickle

    import torch

    path = Path(path)
    advice = "delete it to start the run afresh, or restore an intact copy"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise  # code in a checkpoint: refused by weights_only, said as torch says it
        raise ValueError(f"{path} is damaged (not a checkpoint file); {advice}") from None
    except Exception as exc:  # noqa: BLE001 - any reader error means a damaged file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path} is damaged ({reason[:120]}); {advice}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a checkpoint; {advice}")
    stored = state.pop(CHECKSUM_KEY, None)
    if stored is not None:
        h = hashlib.sha256()
        _digest(state, h)
        if h.hexdigest() != stored:
            raise ValueError(
                f"{path} is damaged (its content does not match its checksum); {advice}"
            )
    return state
