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
