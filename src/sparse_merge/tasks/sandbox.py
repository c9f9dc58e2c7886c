"""Run untrusted Python (generated code plus its tests) in a separate, limited process.

Each program runs in a fresh Python interpreter, in its own session (process group) and, when
the machine allows unprivileged namespaces (``isolation="auto"`` probes ``unshare``), in its own
user, network and PID namespaces. What is guaranteed:

* **Wall clock**: the process group is killed with SIGKILL after ``timeout_s`` seconds.
* **CPU time, memory, file size, open files**: ``resource.setrlimit`` in the child before the
  program runs (``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, no core dumps).
* **Nothing left running**: the whole process group is killed when the program ends or times
  out; with namespaces the program is PID 1 of its PID namespace, so the kernel kills every
  process it may have started as soon as it exits.
* **No network**: with namespaces the program sees an empty network namespace (no interfaces
  but a down loopback). In every mode an audit hook (PEP 578) refuses socket creation and name
  lookups, and ``socket.socket`` is replaced by a class that raises.
* **Temporary working directory**: the program runs in a fresh directory that is deleted
  afterwards; ``HOME`` and ``TMPDIR`` point to it.
* **Writes outside that directory are refused**, and so are process creation (``fork``,
  ``subprocess``, ``os.system``, ``exec*``), signals to other processes and ``ctypes``, by the
  audit hook installed before the program starts.

The audit hook is a guard against what generated code typically does wrong (an infinite loop, a
runaway fork, a stray file write, a network call), not a security boundary against a determined
attacker: Python's audit hooks can be evaded by code written to evade them. The namespaces and
resource limits are enforced by the kernel; for hostile code, run the whole evaluation in a
container or VM as well.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from sparse_merge.errors import ConfigError, check_choice, check_positive

PROGRAM = "program.py"
STDERR_TAIL = 2000  # characters of the program's stderr kept in a result

# Runs in the child, before the program: limits, then the guards, then the program itself.
# Arguments: program path, work dir, cpu seconds, memory bytes, file-size bytes.
_RUNNER = r"""
import os, resource, socket, sys

program, workdir, cpu, memory, fsize = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NOFILE, 64),
                     (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
source = open(program, encoding="utf-8").read()

def _install(workdir=os.path.realpath(workdir), realpath=os.path.realpath, sep=os.sep,
             fspath=os.fspath, write_flags=os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC
             | os.O_APPEND, PermissionError=PermissionError, isinstance=isinstance, str=str,
             bytes=bytes, set=set, frozenset=frozenset):
    forbidden = frozenset({
        "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system",
        "os.kill", "os.killpg", "os.setsid", "os.fchdir", "signal.pthread_kill",
        "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
        "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
        "socket.gethostbyname", "socket.gethostbyaddr", "socket.sethostname",
        "sys.remote_exec", "sys.addaudithook",
    })
    path_events = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2,
                   "os.replace": 2, "os.symlink": 2, "os.link": 2, "os.truncate": 1,
                   "os.chmod": 1, "os.chown": 1, "os.utime": 1, "os.chdir": 1,
                   "os.chflags": 1, "os.lchflags": 1, "os.mkfifo": 1, "os.mknod": 1,
                   "shutil.rmtree": 1}

    def inside(path):
        if isinstance(path, int):  # an already-open descriptor
            return True
        path = fspath(path)
        if isinstance(path, bytes):
            path = path.decode(errors="replace")
        resolved = realpath(path)
        return resolved == workdir or resolved.startswith(workdir + sep)

    def guard(event, args):
        if event in forbidden:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0] in ("ctypes", "_ctypes"):
            raise PermissionError("sandbox: ctypes is not allowed")
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
                flags & write_flags)
            if writes and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside {workdir} is refused")
        elif event in path_events:
            for path in args[: path_events[event]]:
                if not inside(path):
                    raise PermissionError(f"sandbox: {event} on {path!r} is refused")

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("sandbox: network access is not allowed")

    socket.socket = NoSocket
    socket.create_connection = NoSocket
    sys.addaudithook(guard)

_install()
del _install
code = compile(source, "program.py", "exec")
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
"""


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended: ``passed`` (exit 0), ``failed`` (an exception, an assertion, a
    refused operation, a resource limit) or ``timeout`` (killed at the wall-clock limit)."""

    status: str
    returncode: int | None
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        """Whether the program ran to the end without an error."""
        return self.status == "passed"


def _unshare_prefix() -> list[str] | None:
    """The ``unshare`` command line that gives a child new user, network and PID namespaces,
    or ``None`` when this machine does not allow it."""
    exe = shutil.which("unshare")
    if exe is None:
        return None
    cmd = [exe, "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"]
    try:
        probe = subprocess.run([*cmd, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return cmd if probe.returncode == 0 else None


class Sandbox:
    """Runs Python programs in limited child processes (see the module docstring for what is
    guaranteed)."""

    def __init__(
        self,
        timeout_s: float = 10.0,
        cpu_s: int | None = None,
        memory_mb: int = 1024,
        max_file_mb: int = 16,
        isolation: str = "auto",
        workers: int = 4,
    ) -> None:
        check_positive("timeout_s", timeout_s)
        check_positive("memory_mb", memory_mb)
        check_positive("max_file_mb", max_file_mb)
        check_positive("workers", workers)
        check_choice("isolation", isolation, ("auto", "namespaces", "process"))
        if cpu_s is not None:
            check_positive("cpu_s", cpu_s)
        self.timeout_s = float(timeout_s)
        # default CPU limit: one second past the wall clock, so a busy loop is always stopped by
        # the wall clock (``timeout``); at exactly the wall-clock limit the two raced
        self.cpu_s = int(cpu_s) if cpu_s is not None else int(timeout_s + 0.999) + 1
        self.memory_bytes = int(memory_mb) << 20
        self.file_bytes = int(max_file_mb) << 20
        self.workers = int(workers)
        self.isolation = isolation
        self._prefix: list[str] | None = None
        self._probed = False

    def prefix(self) -> list[str]:
        """The command prefix for the chosen isolation (probed once per sandbox)."""
        if not self._probed:
            self._prefix = _unshare_prefix() if self.isolation != "process" else None
            self._probed = True
            if self._prefix is None and self.isolation == "namespaces":
                raise ConfigError(
                    "isolation",
                    self.isolation,
                    "'auto' or 'process': this machine does not allow unprivileged "
                    "`unshare --user --net --pid`",
                )
        return list(self._prefix or [])

    @property
    def uses_namespaces(self) -> bool:
        """Whether programs get their own user, network and PID namespaces."""
        return bool(self.prefix())

    def run(self, code: str) -> SandboxResult:
        """Run ``code`` as ``__main__`` in a fresh limited process; never raises for the
        program's own failures and never leaves a process behind."""
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="sandbox-") as tmp:
            work = Path(tmp)
            (work / PROGRAM).write_text(code, encoding="utf-8")
            err_path = work / ".stderr"
            env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
            cmd = [
                *self.prefix(),
                sys.executable,
                "-I",  # isolated: no user site, no PYTHON* variables
                "-B",  # no .pyc writes
                "-c",
                _RUNNER,
                str(work / PROGRAM),
                tmp,
                str(self.cpu_s),
                str(self.memory_bytes),
                str(self.file_bytes),
            ]
            with open(err_path, "wb") as err:
                proc = subprocess.Popen(
                    cmd,
                    cwd=tmp,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    start_new_session=True,  # its own process group, killed as a whole below
                    close_fds=True,
                )
                try:
                    rc: int | None = proc.wait(timeout=self.timeout_s)
                    status = "passed" if rc == 0 else "failed"
                except subprocess.TimeoutExpired:
                    rc, status = None, "timeout"
                finally:
                    _kill_group(proc)
            stderr = err_path.read_text(encoding="utf-8", errors="replace")[-STDERR_TAIL:]
        return SandboxResult(status, rc, stderr, time.perf_counter() - start)

    def run_many(self, programs: Sequence[str], desc: str = "sandbox") -> list[SandboxResult]:
        """Results of ``programs`` in order, ``workers`` of them running at a time."""
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(
                tqdm(pool.map(self.run, programs), total=len(programs), desc=desc, leave=False)
            )


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group and reap the child."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
