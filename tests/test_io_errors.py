"""Writes the OS refuses (disk full, file-size limit, read-only folder) end in one line.

``write_atomic`` / ``write_atomic_dir`` raise ``WriteError`` (the file, its folder, the OS's
reason, what to do) and leave the previous file as it was; ``check_writable`` finds a folder
that cannot be written before any work; ``app.run`` prints either as one line. The tests work
as root too: the OS's refusals come from the file-size limit (``RLIMIT_FSIZE``, which binds root)
in a subprocess or from ``os`` calls made to fail; only the ``chmod`` test needs a non-root user.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparse_merge.app as app
import sparse_merge.tracking.io as io
from sparse_merge.app import run
from sparse_merge.tracking.io import (
    WriteError,
    check_writable,
    load_checked,
    save_checked,
    write_atomic,
    write_atomic_dir,
    write_json,
)

from .conftest import DIGITS, ROOT, SUBPROCESS_ENV, compose_cfg


def _no_temp_files(folder: Path) -> bool:
    return not list(folder.rglob(".*.tmp"))


def _full_disk(tmp: Path) -> None:
    """A write that fills the disk: half the data, then ENOSPC."""
    with open(tmp, "wb") as f:
        f.write(b"half")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --------------------------------------------------------------------------------- the writers


def test_a_refused_write_keeps_the_previous_file_and_says_so_in_one_line(tmp_path):
    path = write_json(tmp_path / "run" / "results.json", {"metric": 0.5})
    with pytest.raises(WriteError) as err:
        write_atomic(path, _full_disk)
    assert str(err.value) == (
        f"could not write results.json in {tmp_path / 'run'}: No space left on device (ENOSPC); "
        "free some space on that disk; nothing written before was lost (results.json, if it "
        "existed, is unchanged)"
    )
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    assert json.loads(path.read_text()) == {"metric": 0.5}
    assert _no_temp_files(tmp_path)


@pytest.mark.parametrize(
    ("call", "code"),
    [("replace", errno.EROFS), ("fsync", errno.EIO), ("mkstemp", errno.EACCES)],
)
def test_every_step_of_an_atomic_write_is_covered(tmp_path, monkeypatch, call, code):
    path = write_json(tmp_path / "results.json", {"metric": 0.5})

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    target = {"replace": (io.os, "replace"), "fsync": (io.os, "fsync")}.get(call)
    monkeypatch.setattr(*(target or (io.tempfile, "mkstemp")), refuse)
    with pytest.raises(WriteError, match=f"could not write results.json in {tmp_path}: ") as err:
        write_json(path, {"metric": 0.9})
    assert err.value.errno == code and "\n" not in str(err.value)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"metric": 0.5}
    assert _no_temp_files(tmp_path)


def test_a_refused_folder_write_keeps_the_previous_folder(tmp_path):
    model = write_atomic_dir(tmp_path / "models" / "best", lambda tmp: (tmp / "w").write_text("1"))

    def half_then_full(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        _full_disk(tmp / "w")

    with pytest.raises(WriteError, match="could not write best in .*No space left on device"):
        write_atomic_dir(model, half_then_full)
    assert [p.name for p in model.iterdir()] == ["w"] and (model / "w").read_text() == "1"
    assert _no_temp_files(tmp_path)


def test_a_replaced_folder_is_never_missing(tmp_path, monkeypatch):
    """The old folder is swapped out in one step: a process killed at any point afterwards
    (here: the removal of the old version fails) leaves a whole version at the path."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    if not io._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this file system cannot exchange two folders atomically")
    (tmp_path / "a").rmdir(), (tmp_path / "b").rmdir()
    model = write_atomic_dir(tmp_path / "best", lambda tmp: (tmp / "w").write_text("1"))
    seen = []

    def removal_killed(path, *args, **kwargs):
        seen.append((model / "w").read_text())  # the path holds the new version already
        raise KeyboardInterrupt

    monkeypatch.setattr(io.shutil, "rmtree", removal_killed)
    with pytest.raises(KeyboardInterrupt):
        write_atomic_dir(model, lambda tmp: (tmp / "w").write_text("2"))
    monkeypatch.undo()
    assert seen == ["2"] and (model / "w").read_text() == "2"
    io.remove_temp_files(tmp_path)  # what a resume does with the old version left behind
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


def test_without_an_atomic_exchange_the_folder_is_still_replaced(tmp_path, monkeypatch):
    model = write_atomic_dir(tmp_path / "best", lambda tmp: (tmp / "w").write_text("1"))
    monkeypatch.setattr(io, "_renameat2", lambda: None)
    write_atomic_dir(model, lambda tmp: (tmp / "w").write_text("2"))
    assert (model / "w").read_text() == "2" and _no_temp_files(tmp_path)


def test_a_bug_in_a_writer_stays_itself(tmp_path):
    path = write_json(tmp_path / "results.json", {"metric": 0.5})
    with pytest.raises(TypeError, match="not JSON serialisable"):
        write_json(path, {"metric": object()})
    with pytest.raises(ZeroDivisionError):
        write_atomic(path, lambda tmp: 1 / 0)
    assert json.loads(path.read_text()) == {"metric": 0.5} and _no_temp_files(tmp_path)


# torch.save says "unexpected pos" and safetensors "(os error 27)" where Python says EFBIG: every
# writer of the project under a file-size limit of 16 KiB, the previous file kept each time
UNDER_A_LIMIT = """
import json, resource, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from sparse_merge.tracking.io import WriteError, save_checked, write_atomic, write_json

run = Path(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))  # SIGXFSZ is ignored by Python
big = {"w": torch.zeros(100_000)}
writers = {
    "torch.save": lambda: save_checked(run / "checkpoint.pt", big),
    "safetensors": lambda: write_atomic(run / "w.st", lambda t: save_file(big, str(t))),
    "json": lambda: write_json(run / "results.json", list(range(100_000))),
}
out = {}
for name, write in writers.items():
    try:
        write()
        out[name] = "written"
    except WriteError as exc:
        out[name] = str(exc)
print(json.dumps(out))
"""


def test_every_writer_reports_the_file_size_limit_and_keeps_the_previous_file(tmp_path):
    save_checked(tmp_path / "checkpoint.pt", {"step": 3, "w": torch.ones(4)})
    write_atomic(tmp_path / "w.st", lambda tmp: tmp.write_bytes(b"weights"))
    write_json(tmp_path / "results.json", {"metric": 0.5})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    proc = subprocess.run(
        [sys.executable, "-c", UNDER_A_LIMIT, str(tmp_path)],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    reports = json.loads(proc.stdout)
    for (name, message), file in zip(reports.items(), ["checkpoint.pt", "w.st", "results.json"]):
        assert message == (
            f"could not write {file} in {tmp_path}: File too large (EFBIG); raise the file-size "
            f"limit (ulimit -f); nothing written before was lost ({file}, if it existed, is "
            "unchanged)"
        ), name
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert load_checked(tmp_path / "checkpoint.pt")["step"] == 3


# ------------------------------------------------------------------------------- the probe


def test_the_probe_finds_a_folder_that_cannot_be_written(tmp_path, monkeypatch):
    assert check_writable(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert _no_temp_files(tmp_path)  # the probe file is gone

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(io.tempfile, "mkstemp", read_only)
    with pytest.raises(WriteError) as err:
        check_writable(tmp_path / "run")
    assert str(err.value) == (
        f"cannot write in {tmp_path / 'run'}: Read-only file system (EROFS); make the folder "
        "writable, or choose another folder; nothing was written"
    )


def test_the_probe_under_a_tiny_file_size_limit(tmp_path):
    code = (
        "import resource, sys\n"
        "from sparse_merge.tracking.io import WriteError, check_writable\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))\n"
        "try:\n    check_writable(sys.argv[1])\nexcept WriteError as exc:\n    print(exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
    )
    assert proc.stdout.startswith(f"cannot write in {tmp_path}: File too large (EFBIG); raise")
    assert _no_temp_files(tmp_path)


# ------------------------------------------------------------------------ through run(cfg)


@pytest.fixture
def no_pipeline(monkeypatch):
    """A pipeline that must not start (nothing may load before the probe)."""

    def never(name):
        raise AssertionError(f"the {name} pipeline started")

    monkeypatch.setattr(app, "_pipeline", never)


def _one_error_line(capsys) -> str:
    """The error line on stderr: its last line, the only one that says error, no traceback
    (progress bars and log lines of a run that got going come before it)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("error: "), err[-2000:]
    assert [line for line in lines if "error" in line.lower()] == lines[-1:]
    return lines[-1]


def test_a_read_only_run_folder_is_one_line_before_any_model_loads(
    tmp_path, monkeypatch, capsys, no_pipeline
):
    """Works as root: the folder's writes fail with EROFS (a read-only mount)."""
    checkpoint = tmp_path / "run" / "checkpoints" / "trainer_state.pt"
    save_checked(checkpoint, {"step": 3})
    before = checkpoint.read_bytes()
    real = io.tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if Path(dir).is_relative_to(tmp_path / "run"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(io.tempfile, "mkstemp", read_only)
    with pytest.raises(SystemExit) as exit_:
        run(compose_cfg(["experiment=finetune_smoke", "resume=true"], tmp_path))
    assert exit_.value.code == 1
    assert _one_error_line(capsys) == (
        f"error: cannot write in {tmp_path / 'run'}: Read-only file system (EROFS); make the "
        "folder writable, or choose another folder; nothing was written"
    )
    assert checkpoint.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]


def test_a_chmod_read_only_run_folder(tmp_path, capsys, no_pipeline):
    """The same with the folder's permissions (root writes through them: skipped as root)."""
    checkpoint = tmp_path / "run" / "checkpoints" / "trainer_state.pt"
    save_checked(checkpoint, {"step": 3})
    before = checkpoint.read_bytes()
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        folder.chmod(0o555)
    try:
        if os.access(tmp_path / "run", os.W_OK):
            pytest.skip("this user writes through permissions (root)")
        with pytest.raises(SystemExit) as exit_:
            run(compose_cfg(["experiment=finetune_smoke", "resume=true"], tmp_path))
        assert exit_.value.code == 1
        line = _one_error_line(capsys)
        assert line.startswith(f"error: cannot write in {tmp_path / 'run'}: Permission denied")
    finally:
        for folder in (checkpoint.parent, checkpoint.parent.parent):
            folder.chmod(0o755)
    assert checkpoint.read_bytes() == before


def test_a_full_disk_mid_run_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """A fine-tuning run whose second checkpoint meets a full disk: one line naming it, the
    first checkpoint intact (a resume continues from it), the run marked failed."""
    real = io.os.replace
    first: dict[str, bytes] = {}

    def full_at_the_second_checkpoint(src, dst):
        if Path(dst).name == "trainer_state.pt":
            if first:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(src, dst)
            first["bytes"] = Path(dst).read_bytes()
            return
        real(src, dst)

    monkeypatch.setattr(io.os, "replace", full_at_the_second_checkpoint)
    cfg = compose_cfg(["experiment=finetune_smoke", "hardware.num_threads=1"], tmp_path)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exit_:
            run(cfg)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.undo()
    assert exit_.value.code == 1
    folder = tmp_path / "run" / "checkpoints"
    assert _one_error_line(capsys) == (
        f"error: could not write trainer_state.pt in {folder}: No space left on device (ENOSPC); "
        "free some space on that disk; nothing written before was lost (trainer_state.pt, if it "
        "existed, is unchanged)"
    )
    assert (folder / "trainer_state.pt").read_bytes() == first["bytes"]
    assert load_checked(folder / "trainer_state.pt")["step"] == 3
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and "No space left on device" in status["error"]
    assert _no_temp_files(tmp_path / "run")


def test_another_writers_refused_write_is_one_line_too(tmp_path, monkeypatch, capsys):
    """A write outside write_atomic (the JSONL log's appends): its function, the folder, the
    reason; an OSError that is not a refused write stays a traceback."""

    def log_append(cfg, parts, run_dir):
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))  # as file.write raises it

    monkeypatch.setattr(app, "_pipeline", lambda name: log_append)
    with pytest.raises(SystemExit) as exit_:
        run(compose_cfg(["experiment=smoke"], tmp_path))
    assert exit_.value.code == 1
    assert _one_error_line(capsys) == (
        f"error: could not write in {tmp_path / 'run'} (test_another_writers_refused_write_is_"
        "one_line_too.<locals>.log_append): File too large (EFBIG); raise the file-size limit "
        "(ulimit -f); results and checkpoints written before are intact (each is replaced only "
        "by a complete copy)"
    )

    def missing(cfg, parts, run_dir):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "data.jsonl")

    monkeypatch.setattr(app, "_pipeline", lambda name: missing)
    with pytest.raises(FileNotFoundError):
        run(compose_cfg(["experiment=smoke", "resume=true"], tmp_path))


def _run_with_file_limit(args: list[str], limit: int) -> subprocess.CompletedProcess:
    """``run.py`` on the digits problem with ``args``, its files limited to ``limit`` bytes
    (``ulimit -f``)."""

    def set_limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    mode, rest = (args[:1], args[1:]) if args[:1] == ["-m"] else ([], args)
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *mode, *DIGITS, *rest],
        env=SUBPROCESS_ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=set_limit,
    )


def test_the_command_line_under_a_file_size_limit(tmp_path):
    """``run.py`` for real under ``ulimit -f 16``: the figure is the first file over the limit;
    stderr holds one error line (and the progress bar), no traceback."""
    out = tmp_path / "run"
    proc = _run_with_file_limit(["budget=10", f"hydra.run.dir={out}"], 16384)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        f"error: could not write m2n2_digits.png in {out}: File too large (EFBIG); raise the "
        "file-size limit (ulimit -f); nothing written before was lost (m2n2_digits.png, if it "
        "existed, is unchanged)"
    ]
    assert json.loads((out / "status.json").read_text())["status"] == "failed"


def test_the_command_line_refuses_an_unwritable_job_folder_before_hydra_writes(tmp_path):
    """Hydra writes ``.hydra/`` and its log into the job folder before the app starts: the
    ``WriteProbe`` callback checks the folder first (a file-size limit below the probe's size
    stands in for a read-only folder here, which root would write through)."""
    for mode, folder in (("", "hydra.run.dir"), ("-m", "hydra.sweep.dir")):
        out = tmp_path / (mode or "run")
        proc = _run_with_file_limit([*filter(None, [mode]), "budget=10", f"{folder}={out}"], 1024)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert proc.stderr.strip() == (
            f"error: cannot write in {out}: File too large (EFBIG); raise the file-size limit "
            "(ulimit -f); nothing was written"
        )
        assert not (out / ".hydra").exists()


def test_atomic_files_and_folders_follow_the_umask(tmp_path):
    """mkstemp's 0600 and mkdtemp's 0700 left results and saved models unreadable to the
    group on a shared machine; they now get the modes a plain write would."""
    old = os.umask(0o022)
    try:
        file = io.write_atomic(tmp_path / "results.json", lambda tmp: tmp.write_text("{}"))
        folder = io.write_atomic_dir(tmp_path / "model", lambda t: (t / "w.bin").write_bytes(b"1"))
    finally:
        os.umask(old)
    assert file.stat().st_mode & 0o777 == 0o644
    assert folder.stat().st_mode & 0o777 == 0o755
    assert (folder / "w.bin").read_bytes() == b"1"
