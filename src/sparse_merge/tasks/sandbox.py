"""Run untrusted Python (generated code plus its tests) in a separate, limited process.

Each program runs in a fresh Python interpreter (the *runner*, ``_RUNNER`` below), in its own
session and, when the machine allows unprivileged namespaces (``isolation="auto"`` probes
``unshare``), in its own user, network and PID namespaces.

**Scoring.** A program passes only when the runner reaches the end of it: after the program's
last statement has run, the runner writes a random per-run token (read from a pipe before the
program starts, never in its arguments or environment) to a result pipe, then exits at once. An
exception, ``SystemExit`` (``sys.exit`` anywhere, in a test too), ``os._exit``, an ``atexit``
handler, a signal or a resource limit therefore never reaches that write, whatever the exit
status. Threat model: the program runs in the runner's interpreter, so code *written to forge*
the token can read it from the runner's frame and write it itself (a test proves it); the token
defeats early exits and fake exit statuses, not a program that targets this runner.

**Containment**, in layers:

* **Kernel, always**: wall clock (the process group is killed with SIGKILL after ``timeout_s``
  and again when the program ends); ``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_FSIZE``,
  ``RLIMIT_NOFILE``, no core dumps; the runner dies with the evaluator (``PR_SET_PDEATHSIG``;
  ``setpriv --pdeathsig`` on ``unshare`` with namespaces). With namespaces: an empty network
  namespace, and the program is PID 1 of its own PID namespace, so the kernel kills everything it
  started as soon as it exits.
* **Kernel, where available** (``kernel_guards``; Landlock needs Linux >= 5.13, seccomp is set up
  for x86_64 only): Landlock lets the program write only in its directory, read only that
  directory, Python's import paths, system libraries and ``/proc``, make no device nodes, use no
  TCP (ABI >= 4) and signal no process outside itself (ABI >= 6); a seccomp filter refuses
  ``fork``/``clone`` of processes (threads are allowed), ``exec``, ``socket``, ``ptrace``,
  signals to any other process, namespace, mount and module calls. Both are irreversible and
  apply to code that has switched the audit hook off. ``SandboxResult.guards`` names the layers
  that were in force.
* **Interpreter**: a PEP 578 audit hook refuses process creation, sockets (``socket.socket`` is
  also replaced by a class that raises), signals, ``ctypes``, ``gc`` introspection,
  ``sys.settrace``/``setprofile`` and writes outside the directory. It stops what generated code
  does by accident; it is not a boundary against code written to evade it
  (``_posixsubprocess.fork_exec`` and ``os.mkfifo`` raise no audit event, for one).

**The evaluator cannot be stalled or aborted by a program**: stderr and the result come through
pipes read with size limits until the deadline (a program cannot swap them for a FIFO), and the
directory is removed without recursion or following symlinks; a removal error is logged, never
raised. For adversarial code on a machine without Landlock and seccomp, run the whole evaluation
in a container or VM (``docs/tasks.md``, "Sandbox: what is contained", lists what each mode
contains, as measured).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import selectors
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
RESULT_LIMIT = 256  # bytes the runner writes on its result pipe (guards line and token)
CLEANUP_S = 60.0  # seconds allowed to delete one program's directory

_log = logging.getLogger(__name__)

# Runs in the child: read the token, set limits, read the program, apply the kernel layers, install
# the audit hook, run the program, and write the token only if it ran to its end.
# Arguments: program path, work dir, cpu seconds, memory bytes, file-size bytes, token fd, result
# fd, kernel guards (0/1).
_RUNNER = r"""
import os, resource, socket, stat, sys, traceback

READABLE = ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib", "/etc/ld.so.cache",
            "/etc/localtime", "/usr/share/zoneinfo", "/proc", "/dev/urandom", "/dev/random",
            "/dev/zero")


def _landlock(ctypes, libc, workdir):
    U64, I32, U32, SIZE = ctypes.c_uint64, ctypes.c_int32, ctypes.c_uint32, ctypes.c_size_t
    abi = libc.syscall(444, None, SIZE(0), U32(1))  # landlock_create_ruleset: ABI version
    if abi < 1:
        return False
    # file-system rights: execute, write, read, read dir, remove dir/file, make char/dir/reg/
    # sock/fifo/block/sym (ABI 1), refer (2), truncate (3), ioctl on devices (5)
    fs = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)
    fs |= 1 << 15 if abi >= 5 else 0
    net = 3 if abi >= 4 else 0  # bind and connect TCP
    scoped = 3 if abi >= 6 else 0  # abstract unix sockets, signals
    attr = (U64 * 3)(fs, net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = libc.syscall(444, ctypes.byref(attr), SIZE(size), U32(0))
    if ruleset < 0:
        return False

    class Beneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", U64), ("parent_fd", I32)]

    execute, write, read, read_dir, truncate = 1, 2, 4, 8, 1 << 14
    devices = 1 << 6 | 1 << 11 | 1 << 15  # make char/block devices, ioctl on devices
    rules = [(workdir, fs & ~(execute | devices)), ("/dev/null", read | write | truncate)]
    rules += [(path, read | read_dir) for path in sys.path + list(READABLE) if path]
    for path, access in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                access &= execute | write | read | truncate  # the rights a file can carry
            rule = Beneath(access & fs, fd)
            libc.syscall(445, ruleset, 1, ctypes.byref(rule), U32(0))
        finally:
            os.close(fd)
    done = libc.syscall(446, ruleset, U32(0)) == 0
    os.close(ruleset)
    return done


def _seccomp(ctypes, libc):
    if os.uname().machine != "x86_64":  # the syscall numbers below are x86_64's
        return False
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    refused = (57, 58, 59, 322,  # fork, vfork, execve, execveat
               41, 101, 310, 311,  # socket, ptrace, process_vm_readv/writev
               200, 424, 434, 438,  # tkill, pidfd_send_signal, pidfd_open, pidfd_getfd
               272, 308, 165, 166, 155, 161,  # unshare, setns, mount, umount2, pivot_root, chroot
               169, 175, 176, 313, 246, 320,  # reboot, modules, kexec
               321, 298, 323, 248, 249, 250,  # bpf, perf_event_open, userfaultfd, keys
               425, 428, 429, 430, 432)  # io_uring_setup, new mount API
    to_self = (62, 234, 129, 297)  # kill, tgkill, rt_(tg)sigqueueinfo: first argument = pid
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    code, labels = [], {}
    emit = lambda op, k, yes=None, no=None: code.append((op, k, yes, no))
    emit(LD, 4)  # seccomp_data.arch
    emit(JEQ, 0xC000003E, None, "eperm")
    emit(LD, 0)  # seccomp_data.nr
    emit(JGE, 0x40000000, "eperm")  # the x32 ABI
    for nr in refused:
        emit(JEQ, nr, "eperm")
    emit(JEQ, 56, "clone")
    emit(JEQ, 435, "enosys")  # clone3: its flags are out of reach, glibc falls back to clone
    for nr in to_self:
        emit(JEQ, nr, "self")
    emit(RET, allow)
    labels["clone"] = len(code)
    emit(LD, 16)  # args[0]: the clone flags
    emit(JSET, 0x10000, "allow", "eperm")  # CLONE_THREAD: a thread, not a process
    labels["self"] = len(code)
    emit(LD, 16)  # args[0]: the target pid
    emit(JEQ, os.getpid(), "allow", "eperm")
    for name, value in (("allow", allow), ("eperm", eperm), ("enosys", enosys)):
        labels[name] = len(code)
        emit(RET, value)

    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Insn))]

    insns = (Insn * len(code))()
    for i, (op, k, yes, no) in enumerate(code):
        jump = lambda label: 0 if label is None else labels[label] - i - 1
        insns[i] = Insn(op, jump(yes), jump(no), k)
    prog = Prog(len(code), insns)
    UL = ctypes.c_ulong
    return libc.prctl(22, UL(2), ctypes.byref(prog), UL(0), UL(0)) == 0  # SECCOMP_MODE_FILTER


def _confine(workdir, kernel_guards):
    try:
        import ctypes
    except ImportError:
        return []
    applied = []
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        UL = ctypes.c_ulong
        libc.prctl(1, UL(9), UL(0), UL(0), UL(0))  # PR_SET_PDEATHSIG: SIGKILL
        if kernel_guards and libc.prctl(38, UL(1), UL(0), UL(0), UL(0)) == 0:  # NO_NEW_PRIVS
            if _landlock(ctypes, libc, workdir):
                applied.append("landlock")
            if _seccomp(ctypes, libc):
                applied.append("seccomp")
    finally:  # a later ``import ctypes`` must reach the audit hook, not this loaded copy
        for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
            del sys.modules[name]
    return applied


def _install(workdir, realpath=os.path.realpath, isdir=os.path.isdir, sep=os.sep,
             fspath=os.fspath, write_flags=os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC
             | os.O_APPEND, PermissionError=PermissionError, isinstance=isinstance, str=str,
             bytes=bytes, frozenset=frozenset):
    forbidden = frozenset({
        "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system",
        "os.kill", "os.killpg", "signal.pthread_kill", "subprocess.Popen", "pty.spawn",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "socket.__new__", "socket.connect",
        "socket.bind", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
        "socket.sethostname", "sys.remote_exec", "sys.addaudithook", "gc.get_objects",
        "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile",
        "sys._current_frames",
    })
    path_events = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2,
                   "os.replace": 2, "os.symlink": 2, "os.link": 2, "os.truncate": 1,
                   "os.chmod": 1, "os.chown": 1, "os.utime": 1, "os.chdir": 1,
                   "os.chflags": 1, "os.lchflags": 1, "os.setxattr": 1, "os.removexattr": 1,
                   "shutil.rmtree": 1}

    def inside(path):
        if isinstance(path, int):  # an already-open descriptor
            return True
        path = fspath(path)
        if isinstance(path, bytes):
            path = path.decode(errors="replace")
        if not path.startswith(sep) and ".." in path.split(sep):
            return False  # relative to an unknown dir_fd, ".." may leave the directory
        resolved = realpath(path)
        return resolved == workdir or resolved.startswith(workdir + sep)

    def guard(event, args):
        if event in forbidden:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0] in ("ctypes", "_ctypes"):
            # an ImportError, as where ctypes is missing: libraries that treat it as optional
            # (numpy) still import, and a program that needs it fails
            raise ImportError("sandbox: ctypes is not allowed")
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
                flags & write_flags)
            if writes and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside {workdir} is refused")
            if not writes and not isinstance(path, int) and isdir(path) and not inside(path):
                # a directory descriptor would let dir_fd= calls write where it points
                raise PermissionError(f"sandbox: opening directory {path!r} is refused")
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


def _main(argv):
    program, workdir = argv[1], os.path.realpath(argv[2])
    cpu, memory, fsize, token_fd, result_fd, kernel_guards = map(int, argv[3:9])
    token = os.read(token_fd, 64)
    os.close(token_fd)
    for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory),
                         (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NOFILE, 64),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"  # numpy's thread pools would reserve address space per core
    with open(program, encoding="utf-8") as f:
        source = f.read()
    guards = ["audit", *_confine(workdir, kernel_guards)]
    os.write(result_fd, ("guards " + " ".join(guards) + "\n").encode())
    _install(workdir)
    write, exit_ = os.write, os._exit
    try:
        code = compile(source, "program.py", "exec")
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException:
        try:
            traceback.print_exc()
        finally:
            exit_(1)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    write(result_fd, token + b"\n")  # reached only when every statement of the program ran
    exit_(0)


_main(sys.argv)
"""


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended: ``passed`` (the runner saw every statement run and wrote its token,
    and the exit status is 0), ``failed`` (anything else: an exception, an assertion, an early
    exit of any status, a refused operation, a resource limit) or ``timeout`` (killed at the
    wall-clock limit). ``guards``: the layers that were in force (``audit``, ``landlock``,
    ``seccomp``)."""

    status: str
    returncode: int | None
    stderr: str
    seconds: float
    guards: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        """Whether the program ran to its end without an error."""
        return self.status == "passed"


def _unshare_prefix() -> list[str] | None:
    """The command line that gives a child new user, network and PID namespaces and kills it with
    the evaluator (``setpriv --pdeathsig`` where present), or ``None`` when this machine does
    not allow it."""
    exe = shutil.which("unshare")
    if exe is None:
        return None
    setpriv = shutil.which("setpriv")
    cmd = [setpriv, "--pdeathsig", "KILL"] if setpriv else []
    cmd += [exe, "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"]
    try:
        probe = subprocess.run([*cmd, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return cmd if probe.returncode == 0 else None


class Sandbox:
    """Runs Python programs in limited child processes (see the module docstring for what is
    guaranteed).

    Options: ``timeout_s`` wall-clock seconds per program; ``cpu_s`` CPU seconds (default: one
    past the wall clock); ``memory_mb`` address space; ``max_file_mb`` largest file written;
    ``isolation`` ``auto`` (namespaces where allowed), ``namespaces`` (required) or ``process``;
    ``workers`` programs run at a time; ``kernel_guards`` apply Landlock and seccomp in the child
    where the kernel supports them (``False`` leaves the audit hook and resource limits only:
    for measuring what those contain, not for use).
    """

    def __init__(
        self,
        timeout_s: float = 10.0,
        cpu_s: int | None = None,
        memory_mb: int = 1024,
        max_file_mb: int = 16,
        isolation: str = "auto",
        workers: int = 4,
        kernel_guards: bool = True,
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
        self.kernel_guards = bool(kernel_guards)
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
        """Run ``code`` as ``__main__`` in a fresh limited process; never raises for anything
        the program does and never leaves a process or (barring a logged error) a file behind."""
        start = time.perf_counter()
        work = tempfile.mkdtemp(prefix="sandbox-")
        try:
            Path(work, PROGRAM).write_text(code, encoding="utf-8")
            status, rc, stderr, guards = self._execute(work)
        finally:
            try:
                remove_tree(work, time.monotonic() + CLEANUP_S)
            except Exception as exc:  # noqa: BLE001 - one program's leftovers never stop a batch
                _log.warning("sandbox: could not delete %s: %r", work, exc)
        return SandboxResult(status, rc, stderr, time.perf_counter() - start, guards)

    def _execute(self, work: str) -> tuple[str, int | None, str, tuple[str, ...]]:
        """Run the program in ``work``; its status, exit status, stderr tail and guards."""
        token = secrets.token_hex(16).encode()  # [32] hex digits, new for every run
        opened: list[int] = []
        try:
            token_r, token_w = os.pipe()
            result_r, result_w = os.pipe()
            err_r, err_w = os.pipe()
            opened += [token_r, token_w, result_r, result_w, err_r, err_w]
            os.write(token_w, token)  # fits the pipe buffer; read by the runner at start-up
            cmd = [
                *self.prefix(),
                sys.executable,
                # isolated as -I (no user site, no script directory on sys.path), but PYTHON*
                # variables are read: ``env`` below is the whole environment, and it fixes
                # PYTHONHASHSEED, so set and dict orders of strings (and scores that depend on
                # them) are the same in every run
                "-s",
                "-P",
                "-B",  # no .pyc writes
                "-c",
                _RUNNER,
                str(Path(work, PROGRAM)),
                work,
                str(self.cpu_s),
                str(self.memory_bytes),
                str(self.file_bytes),
                str(token_r),
                str(result_w),
                str(int(self.kernel_guards)),
            ]
            env = {
                "PATH": "/usr/bin:/bin",
                "HOME": work,
                "TMPDIR": work,
                "LANG": "C.UTF-8",
                "PYTHONHASHSEED": "0",
            }
            proc = subprocess.Popen(
                cmd,
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err_w,
                pass_fds=(token_r, result_w),
                start_new_session=True,  # its own process group, killed as a whole below
                close_fds=True,
            )
            for fd in (token_r, token_w, result_w, err_w):  # the child holds its own copies
                os.close(fd)
                opened.remove(fd)
            timed_out, out = _collect(proc, {result_r: RESULT_LIMIT, err_r: None}, self.timeout_s)
        finally:
            for fd in opened:
                os.close(fd)
        stderr = out[err_r].decode("utf-8", errors="replace")[-STDERR_TAIL:]
        head, _, token_line = out[result_r].partition(b"\n")
        guards = tuple(head.decode("ascii", errors="replace").split()[1:])
        if timed_out:
            return "timeout", None, stderr, guards
        rc = proc.returncode
        finished = token_line == token + b"\n"
        if rc == 0 and not finished:
            stderr += "\n[sandbox] exit status 0 before the program's last statement ran: failed"
        return ("passed" if rc == 0 and finished else "failed"), rc, stderr, guards

    def run_many(self, programs: Sequence[str], desc: str = "sandbox") -> list[SandboxResult]:
        """Results of ``programs`` in order, ``workers`` of them running at a time."""
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(
                tqdm(pool.map(self.run, programs), total=len(programs), desc=desc, leave=False)
            )


def _collect(
    proc: subprocess.Popen, limits: dict[int, int | None], timeout_s: float
) -> tuple[bool, dict[int, bytes]]:
    """Read the child's pipes (``limits``: fd -> most bytes kept, ``None``: keep the last
    ``4 * STDERR_TAIL``) until it exits or ``timeout_s`` passes, then kill its process group and
    read what is left. Whether it timed out, and the bytes read from each pipe."""
    deadline = time.monotonic() + timeout_s
    data = {fd: bytearray() for fd in limits}
    timed_out = False
    with selectors.DefaultSelector() as sel:
        for fd in limits:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        pidfd = _pidfd(proc.pid)  # readable once the child has exited
        if pidfd is not None:
            sel.register(pidfd, selectors.EVENT_READ)
        try:
            while proc.poll() is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                wait = remaining if pidfd is not None else min(remaining, 0.05)
                for key, _ in sel.select(wait):
                    if (
                        key.fd != pidfd
                        and _read_some(key.fd, data[key.fd], limits[key.fd]) is False
                    ):
                        sel.unregister(key.fd)  # at its end, or at its limit
        finally:
            _kill_group(proc)
            if pidfd is not None:
                os.close(pidfd)
        for fd in list(sel.get_map()):  # what it wrote before it ended (bounded: one buffer)
            if fd != pidfd:
                for _ in range(64):
                    if not _read_some(fd, data[fd], limits[fd]):
                        break  # at its end, at its limit, or nothing more waiting
    return timed_out, {fd: bytes(buf) for fd, buf in data.items()}


def _read_some(fd: int, buf: bytearray, limit: int | None) -> bool | None:
    """Append one read of ``fd`` to ``buf``: True when something was read, None when nothing is
    waiting, False at end of file or once ``limit`` bytes are kept (``None``: keep reading, but
    only the last ``4 * STDERR_TAIL`` bytes)."""
    try:
        chunk = os.read(fd, 1 << 16)
    except BlockingIOError:
        return None
    if not chunk:
        return False
    buf += chunk
    if limit is None:
        del buf[: -4 * STDERR_TAIL]  # a flood costs the reader time, never memory
        return True
    if len(buf) > limit:
        del buf[limit:]
        return False
    return True


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when ``pid`` exits (Linux >= 5.3), else None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group and reap the child."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def remove_tree(path: str, deadline: float) -> None:
    """Delete the directory ``path`` and everything in it: without recursion (any depth), without
    following symlinks, with two descriptors at most, making unreadable directories readable
    first; ``TimeoutError`` past ``deadline`` (``time.monotonic()``)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    below: list[str] = []  # names from ``path`` down to the directory ``fd`` is open on
    fd = os.open(path, flags)
    try:
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"deleting {path} took too long")
            sub = None
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        sub = entry.name
                        break
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.name, dir_fd=fd)
            if sub is not None:  # go down; it is deleted on the way back up
                with contextlib.suppress(OSError):
                    os.chmod(sub, 0o700, dir_fd=fd)
                child = os.open(sub, flags, dir_fd=fd)
                os.close(fd)
                fd = child
                below.append(sub)
            elif below:  # empty: go up and delete it
                parent = os.open("..", flags, dir_fd=fd)
                os.close(fd)
                fd = parent
                os.rmdir(below.pop(), dir_fd=fd)
            else:
                break
    finally:
        os.close(fd)
    os.rmdir(path)
