"""Atomic file writes, checked checkpoints and the run directory's hygiene: a crash never leaves
a half-written result or checkpoint; what a killed write left behind is recognised by its name
and removed on resume; a resume whose settings differ from its checkpoint's is refused; one
process at a time runs in a run directory."""

from __future__ import annotations

import csv
import ctypes
import errno
import functools
import json
import os
import re
import resource
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sparse_merge.errors import ConfigError

# The name of a temporary file or folder of ``write_atomic`` / ``write_atomic_dir``:
# ``.<target name>.<random>.tmp`` next to its target; ``is_temp_name`` recognises it.
TEMP_SUFFIX = ".tmp"


def temp_affixes(path: str | Path) -> dict[str, Any]:
    """``tempfile.mkstemp`` / ``mkdtemp`` arguments of the temporary sibling of ``path``."""
    path = Path(path)
    return {"prefix": f".{path.name}.", "suffix": TEMP_SUFFIX, "dir": path.parent}


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one ``temp_affixes`` gives (a write in progress, or one a killed
    process left behind)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX) and name != TEMP_SUFFIX


def remove_temp_files(root: str | Path) -> list[Path]:
    """Remove the temporary files and folders of atomic writes anywhere under ``root`` (what a
    killed run left behind); returns what was removed. Call it only where no other process
    writes (in a run folder: while holding ``lock_run_dir``), or a write in progress goes too."""
    removed = []
    for parent, dirs, files in os.walk(root):  # symlinked folders are not followed
        for name in [*dirs, *files]:
            if not is_temp_name(name):
                continue
            path = Path(parent) / name
            if name in dirs and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        dirs[:] = [d for d in dirs if not is_temp_name(d)]
    return removed


def reachable(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds (the W&B
    server, the Hugging Face hub)."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _fsync(path: str | Path) -> None:
    """Flush a file's (or a directory's) data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# What to do about a write the OS refused, by its reason
_WRITE_ADVICE = {
    errno.ENOSPC: "free some space on that disk",
    errno.EDQUOT: "free some space or raise the disk quota",
    errno.EFBIG: "raise the file-size limit (ulimit -f)",
    errno.EROFS: "make the folder writable, or choose another folder",
    errno.EACCES: "make the folder writable, or choose another folder",
    errno.EPERM: "make the folder writable, or choose another folder",
}
PROBE_BYTES = 4096  # what check_writable writes: a full disk has less than one block left


class WriteError(OSError):
    """The OS refused a write (disk full, file-size limit, read-only folder). ``str()`` is one
    line: the file, its folder, the OS's reason, what to do, and that nothing written before
    was lost (``write_atomic`` replaces a file only by a complete copy, so the one already there
    is unchanged). ``probe``: raised by ``check_writable``, before anything was written."""

    def __init__(self, path: str | Path, cause: OSError, *, probe: bool = False) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))
        self.path, self.probe = Path(path), probe

    @property
    def reason(self) -> str:
        """The OS's reason with its code: ``No space left on device (ENOSPC)``."""
        code = errno.errorcode.get(self.errno or 0)
        return f"{self.strerror} ({code})" if code else str(self.strerror)

    @property
    def advice(self) -> str | None:
        """What to do about it, by the reason (``free some space on that disk``)."""
        return _WRITE_ADVICE.get(self.errno)

    def __str__(self) -> str:
        if self.probe:
            what, kept = f"cannot write in {self.path}", "nothing was written"
        else:
            what = f"could not write {self.path.name} in {self.path.parent}"
            kept = (
                f"nothing written before was lost ({self.path.name}, if it existed, is unchanged)"
            )
        return "; ".join(x for x in (f"{what}: {self.reason}", self.advice, kept) if x)


def check_writable(directory: str | Path) -> Path:
    """Make ``directory`` and write, flush and remove a small file in it, so a read-only folder,
    a full disk or a tiny file-size limit is found before any work; ``WriteError`` if not."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(**temp_affixes(directory / ".write-probe"))
        try:
            data = memoryview(bytes(PROBE_BYTES))
            while data:  # a write cut short by the file-size limit fails on the next call
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise WriteError(directory, exc, probe=True) from None
    return directory


def write_error(path: str | Path, exc: BaseException, tmp: Path | None = None) -> WriteError | None:
    """``exc``, raised while writing ``path`` (into its temporary file or folder ``tmp``), as a
    ``WriteError`` when the OS refused the write; ``None`` when it is something else (a bug) or
    already a ``WriteError``. ``torch.save`` reports a full disk or the file-size limit only as
    ``RuntimeError("... unexpected pos ...")`` and safetensors as ``"... (os error 28)"``: the
    reason is then read from the text, or from the file-size limit ``tmp`` reached, or from a
    probe write next to it (a disk still full refuses it)."""
    if isinstance(exc, WriteError):
        return None
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__
    if cause is None and (found := re.search(r"\(os error (\d+)\)", str(exc))):
        cause = OSError(int(found[1]), os.strerror(int(found[1])))  # Rust's std::io::Error
    if cause is None and tmp is not None and tmp.exists():
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        files = [tmp] if tmp.is_file() else [p for p in tmp.rglob("*") if p.is_file()]
        if limit != resource.RLIM_INFINITY and any(p.stat().st_size >= limit for p in files):
            cause = OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        else:
            try:
                check_writable(tmp.parent)
            except WriteError as refused:
                cause = refused
    return None if cause is None else WriteError(path, cause)


def _umask() -> int:
    """This process's umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it over ``path``;
    the file and the rename are flushed to the disk (``fsync``) before it returns. A write the
    OS refuses raises ``WriteError`` and leaves an older ``path`` as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(**temp_affixes(path))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from the group
    except OSError as exc:
        raise WriteError(path, exc) from None
    os.close(fd)
    try:
        write(Path(tmp))
        _fsync(tmp)  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except Exception as exc:
        if (error := write_error(path, exc, Path(tmp))) is None:
            raise
        raise error from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync(path.parent)  # and the rename itself survives a power loss
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
    into place, so a crash never leaves a half-written folder. An older ``path`` is swapped
    with the new folder in one step (Linux's ``renameat2(RENAME_EXCHANGE)``) and then removed,
    so ``path`` always holds one whole version; where the OS cannot swap folders, the old one
    is removed just before the new one is renamed in. A write the OS refuses raises
    ``WriteError`` and leaves an older ``path`` as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(**temp_affixes(path)))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide a saved model
    except OSError as exc:
        raise WriteError(path, exc) from None
    try:
        try:
            write(tmp)
        except Exception as exc:
            if (error := write_error(path, exc, tmp)) is None:
                raise
            raise error from exc
        for item in [*tmp.rglob("*"), tmp]:  # the files and folders are on disk before the swap
            _fsync(item)
        if not path.exists():
            tmp.rename(path)
            _fsync(path.parent)
        elif _exchange(tmp, path):  # the old folder is now at tmp, removed below
            _fsync(path.parent)
        else:  # no atomic exchange: a crash between these two lines loses the old folder
            shutil.rmtree(path)
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


_RENAME_EXCHANGE = 2  # renameat2 flag (linux/fs.h)
_AT_FDCWD = -100


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """libc's ``renameat2``, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` atomically; False where the OS or the file system cannot
    (nothing moved then)."""
    fn = _renameat2()
    if fn is None:
        return False
    flags = (_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if fn(*flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False  # not supported here
    raise OSError(err, os.strerror(err), str(b))


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Rows of dicts as CSV (columns of the first row), atomically."""
    columns = list(rows[0]) if rows else []

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    return write_atomic(path, write)


NAME_MAX = 255  # bytes in one file name (Linux, macOS)


def fit_file_name(stem: str, suffix: str = "") -> str:
    """``stem + suffix`` as a file name: one longer than a file name may be (a sweep job named
    by many overrides: the OS refused to make it) keeps the first bytes of ``stem`` that fit
    and ends in a hash of the whole name, then ``suffix``, so it stays unique and stable."""
    import hashlib

    name = f"{stem}{suffix}"
    raw = name.encode()
    if len(raw) <= NAME_MAX:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:12]
    keep = NAME_MAX - len(digest) - 1 - len(suffix.encode())
    return f"{stem.encode()[:keep].decode(errors='ignore')}-{digest}{suffix}"


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
        # memory-mapped: a resumed archive is copied from the file, not from a second copy of
        # it in memory (pop x P more at the peak than the plan counts)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
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


def flat_keys(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and empty mappings stay values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume_settings(
    saved: Mapping[str, Any], now: Mapping[str, Any], where: str | Path
) -> None:
    """Refuse a resume whose settings differ from those its checkpoint (in ``where``) was made
    with: one ``ConfigError`` line naming each changed key with both values. Keys the checkpoint
    does not hold (settings added since it was written) are not compared."""
    changed = [
        f"{key}={saved[key]!r} (now {now.get(key)!r})"
        for key in saved
        if saved[key] != now.get(key)
    ]
    if changed:
        raise ConfigError(
            "resume",
            True,
            f"the settings the checkpoint in {where} was made with: "
            + ", ".join(changed)
            + "; resume with them, or start a new run in another folder",
        )


RUN_LOCK = ".run.lock"  # the lock file of a run directory (empty; hidden from listings)


class RunDirBusy(ConfigError):
    """Another process holds the lock of the run directory (``lock_run_dir``)."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(
            "output_dir",
            str(run_dir),
            f"another process is running in {run_dir} (it holds {run_dir / RUN_LOCK}); "
            "wait for it to end, or run in another folder",
        )


def is_main_process() -> bool:
    """Whether this process writes the run's files: rank 0 of a launch (``torchrun``,
    ``accelerate launch``, MPI; the rank Accelerate reads from the environment) or a process
    started on its own."""
    from accelerate.utils import get_cpu_distributed_information

    return get_cpu_distributed_information().rank == 0


@contextmanager
def lock_run_dir(run_dir: str | Path, *, main: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` for the ``with`` block; while another process holds
    it, ``RunDirBusy`` is raised at once (one line naming the folder), no waiting.

    Only the process that writes (``main``) takes it: the other processes of a multi-process run
    take nothing and never wait. Re-entrant in a process (the app and a pipeline may both hold
    it). The lock is the kernel's (``flock`` on ``RUN_LOCK``), so a killed process frees it; the
    empty lock file stays behind, which is harmless.
    """
    if not main:
        yield
        return
    from filelock import FileLock, Timeout

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / RUN_LOCK, blocking=False, is_singleton=True, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise RunDirBusy(run_dir) from None
    try:
        yield
    finally:
        lock.release()
