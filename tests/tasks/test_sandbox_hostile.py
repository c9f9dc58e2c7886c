"""Hostile programs: each must score as failed, stop, leave nothing behind outside its
directory, and leave the evaluation of the next (correct) program intact.

Every program is written to escape as far as it can: where a guard could be switched off first,
it tries (``EVADE`` rewrites the audit hook's closure); where an unaudited primitive exists, it
uses it (``_posixsubprocess.fork_exec``). The damage each may do is bounded so that a
containment failure is safe to observe on a shared machine: at most 16 ``sleep`` processes (killed
at teardown), files only in ``tmp_path``, a TCP connection only to this test's listener, and a
signal only to a throwaway evaluator process started for the purpose.

Configurations: ``namespaces`` and ``process`` are the two isolation modes; the ``*-unconfined``
ones (``kernel_guards=False``, marked ``slow``) measure what is left where the kernel has no
Landlock or seccomp. Escapes measured on the dev box are listed in ``ESCAPES`` and run as
``xfail(strict=True)``: if one starts being contained, the test says so. The table in
``docs/tasks.md`` ("Sandbox: what is contained") is this file's result.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from sparse_merge.tasks.sandbox import STDERR_TAIL, Sandbox

SANDBOX_PY = Path(__file__).parents[2] / "src" / "sparse_merge" / "tasks" / "sandbox.py"
NORMAL = "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n"
WRONG = "def add(a, b):\n    return a - b\n\n"
ASSERTS = "assert add(2, 3) == 5\nassert add(1, 1) == 2\n"

# Tries to switch the audit hook off by finding it through the garbage collector and emptying its
# closure (the sets of forbidden events, the inside-the-directory check). Silent when refused.
EVADE = """
def _evade():
    try:
        import gc
        for obj in gc.get_objects():
            if getattr(obj, "__name__", "") == "guard" and getattr(obj, "__closure__", None):
                for cell in obj.__closure__:
                    value = cell.cell_contents
                    if isinstance(value, (frozenset, set, dict)):
                        cell.cell_contents = type(value)()
                    elif callable(value) and getattr(value, "__name__", "") == "inside":
                        cell.cell_contents = lambda path: True
    except Exception:
        pass

_evade()
"""

# Starts a process without any audited call (``_posixsubprocess.fork_exec`` raises no audit
# event); returns its pid.
SPAWN = """
def spawn(argv, new_session=False):
    import _posixsubprocess, os
    r, w = os.pipe()
    args = [[os.fsencode(a) for a in argv], [os.fsencode(argv[0])], True, (w,), None, None,
            -1, -1, -1, -1, -1, -1, r, w, True, new_session, -1, None, None, None, -1, None]
    try:
        return _posixsubprocess.fork_exec(*args, False)
    except TypeError:  # a Python without the last (vfork) argument
        return _posixsubprocess.fork_exec(*args)
"""


@dataclass
class Scene:
    """What a hostile program may try to reach, and how to see whether it did."""

    outside: Path  # a directory outside the sandbox: must stay empty
    marker: str  # `sleep <marker>`: identifies processes the program starts
    listener: socket.socket  # a TCP listener on 127.0.0.1: must get no connection
    home: Path  # the evaluator's home directory: must not be listed

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]

    def processes(self) -> list[int]:
        """Pids of the processes running ``sleep <marker>``."""
        found = []
        needle = f"\0{self.marker}".encode()
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
        return found

    def escapes(self, stderr: str) -> list[str]:
        """Evidence that the program reached something outside its sandbox (empty: contained)."""
        evidence = [f"file outside: {p.name}" for p in self.outside.iterdir()]
        deadline = time.monotonic() + 2.0  # a PID namespace is torn down asynchronously
        while (pids := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        evidence += [f"process left running: {pid}" for pid in pids]
        with contextlib.suppress(BlockingIOError):
            conn, _ = self.listener.accept()
            conn.close()
            evidence.append("connected to 127.0.0.1")
        if "LEAKED" in stderr:
            evidence.append("read: " + stderr[stderr.index("LEAKED") :][:80])
        return evidence


@pytest.fixture
def scene(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    s = Scene(outside, f"{30 + random.random():.6f}", listener, Path.home())
    yield s
    listener.close()
    for pid in s.processes():  # processes this test's program started
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


# Name -> program. ``$outside``, ``$marker``, ``$port`` and ``$home`` come from the scene;
# ``$evade`` and ``$spawn`` are the snippets above. Each runs after wrong code, before its asserts.
HOSTILE = {
    "os._exit(0) after wrong code": "import os\nos._exit(0)\n",
    "raise SystemExit(0)": "raise SystemExit(0)\n",
    "atexit handler exits 0": "import atexit, os\natexit.register(os._exit, 0)\n",
    "sys.exit(0) inside a test": """
import sys

def add(a, b):
    sys.exit(0)
""",
    "exception": "raise ValueError('wrong')\n",
    "forged pass token (frames)": """
import os, re, sys
frame, token = sys._getframe(), None
while frame is not None and token is None:
    for value in list(frame.f_locals.values()):
        if isinstance(value, bytes) and re.fullmatch(rb'[0-9a-f]{32}', value):
            token = value
    frame = frame.f_back
for fd in range(3, 64):
    try:
        os.write(fd, token + b'\\n')
    except Exception:
        pass
os._exit(0)
""",
    "fork bomb (bounded)": """$evade$spawn
import os
for _ in range(8):
    try:
        if os.fork() == 0:
            try:
                os.execv('/bin/sleep', ['sleep', '$marker'])
            finally:
                os._exit(0)
    except OSError:
        pass
    try:
        spawn(['/bin/sleep', '$marker'])
    except OSError:
        pass
""",
    "infinite loop": "while True:\n    pass\n",
    "huge output": """
import sys
chunk = 'x' * (1 << 20)
for _ in range(48):
    sys.stdout.write(chunk)
    sys.stderr.write(chunk)
""",
    "FIFO as .stderr/.stdout": """
import os
for name in ('.stderr', '.stdout'):
    try:
        os.remove(name)
    except OSError:
        pass
    os.mkfifo(name)
""",
    "1200 nested directories": """
import os
for _ in range(1200):  # one level at a time: os.makedirs itself recurses
    os.mkdir('d')
    os.chdir('d')
""",
    "writing outside the work dir": """$evade
import os
for attempt in (lambda: open('$outside/by-open', 'w').write('x'),
                lambda: os.mkdir('$outside/by-mkdir'),
                lambda: os.mkfifo('$outside/by-mkfifo'),
                lambda: os.symlink('/', '$outside/by-symlink')):
    try:
        attempt()
    except OSError:
        pass
""",
    "reading /etc/passwd and the home directory": """$evade
import os
leaked = []
for attempt in (lambda: open('/etc/passwd').read()[:20], lambda: os.listdir('$home')):
    try:
        leaked.append(attempt())
    except OSError:
        pass
if leaked:
    raise AssertionError(f'LEAKED {leaked}')
""",
    "setsid child that outlives": """$evade$spawn
import os
try:
    if os.fork() == 0:
        try:
            os.setsid()
            os.execv('/bin/sleep', ['sleep', '$marker'])
        finally:
            os._exit(0)
except OSError:
    pass
try:
    spawn(['/bin/sleep', '$marker'], new_session=True)
except OSError:
    pass
""",
    "socket to 127.0.0.1": """$evade$spawn
import os, sys, _socket
try:
    _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM).connect(('127.0.0.1', $port))
except OSError:
    pass
try:  # a fresh interpreter has no audit hook
    code = 'import socket; socket.create_connection(("127.0.0.1", $port), timeout=2)'
    os.waitpid(spawn([sys.executable, '-I', '-c', code]), 0)
except OSError:
    pass
""",
    "_posixsubprocess.fork_exec": """$spawn
import os
try:
    os.waitpid(spawn(['/bin/sh', '-c', 'echo x > $outside/by-fork-exec']), 0)
except OSError:
    pass
""",
    "os.open(..., dir_fd=...) writes": """
import os
here = os.open('.', os.O_RDONLY)
dotdot = os.path.relpath('$outside/by-dotdot', os.getcwd())

def from_below():
    # relative to ``here`` this path leaves the directory; relative to the new working
    # directory (where a path check resolves it) it stays inside
    os.mkdir('sub')
    os.chdir('sub')
    os.open(dotdot, os.O_WRONLY | os.O_CREAT, dir_fd=here)

for attempt in (
    lambda: os.open('by-fd', os.O_WRONLY | os.O_CREAT, dir_fd=os.open('$outside', os.O_RDONLY)),
    lambda: os.mkdir('mkdir-by-fd', dir_fd=os.open('$outside', os.O_RDONLY)),
    from_below,
):
    try:
        attempt()
    except OSError:
        pass
""",
    "rewriting the guard's closure": "$evade\nopen('$outside/after-rewrite', 'w').write('x')\n",
}


def hostile_program(name: str, scene: Scene) -> str:
    """Wrong code, the program ``name`` aimed at ``scene``, then the asserts."""
    fields = {"evade": EVADE, "spawn": SPAWN, "outside": str(scene.outside)}
    fields |= {"marker": scene.marker, "port": str(scene.port), "home": str(scene.home)}
    return WRONG + string.Template(HOSTILE[name]).substitute(fields) + ASSERTS


CONFIGS = {
    "namespaces": {"isolation": "namespaces"},
    "process": {"isolation": "process"},
    "namespaces-unconfined": {"isolation": "namespaces", "kernel_guards": False},
    "process-unconfined": {"isolation": "process", "kernel_guards": False},
}
SLOW_CONFIGS = {"namespaces-unconfined", "process-unconfined"}

# Measured on the dev box (Linux 6.18, Landlock ABI 7, x86_64): what each configuration does not
# contain. Each runs as xfail(strict=True), so a change in either direction is reported.
FORGED = "the program runs in the runner's interpreter: it can read the token and write it"
NO_LANDLOCK = "without Landlock, reads and unaudited writes (os.mkfifo) outside are not refused"
NO_SECCOMP = "without seccomp, _posixsubprocess.fork_exec starts processes (no audit event)"
ESCAPES: dict[tuple[str, str], str] = {
    **{(config, "forged pass token (frames)"): FORGED for config in CONFIGS},
    **{
        (config, name): reason
        for config in ("namespaces-unconfined", "process-unconfined")
        for name, reason in (
            ("writing outside the work dir", NO_LANDLOCK),
            ("reading /etc/passwd and the home directory", NO_LANDLOCK),
            ("_posixsubprocess.fork_exec", NO_SECCOMP),
        )
    },
    ("process-unconfined", "setsid child that outlives"): NO_SECCOMP + " in a new session",
    ("process-unconfined", "socket to 127.0.0.1"): NO_SECCOMP + " (one that connects)",
    ("process-unconfined", "signalling the parent"): NO_SECCOMP + " (/bin/kill)",
}


@pytest.fixture(scope="module")
def sandboxes():
    """One sandbox per configuration (short limits), built lazily; None where unavailable."""
    built: dict[str, Sandbox | None] = {}

    def get(config: str) -> Sandbox | None:
        if config not in built:
            box = Sandbox(timeout_s=2.0, memory_mb=512, workers=1, **CONFIGS[config])
            try:
                box.prefix()
            except ValueError:
                box = None
            built[config] = box
        return built[config]

    return get


def evaluate(box: Sandbox, programs: list[str], limit: float = 30.0):
    """``box.run_many(programs)`` in a watchdog thread: fails (instead of hanging the test run)
    when the evaluation does not come back within ``limit`` seconds."""
    out: dict = {}

    def target() -> None:
        try:
            out["results"] = box.run_many(programs)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"the evaluation stalled: still running after {limit} s"
    if "error" in out:
        raise out["error"]
    return out["results"]


def _params():
    for config in CONFIGS:
        for name in HOSTILE:
            marks = [pytest.mark.slow] if config in SLOW_CONFIGS else []
            if (config, name) in ESCAPES:
                marks.append(pytest.mark.xfail(strict=True, reason=ESCAPES[config, name]))
            yield pytest.param(config, name, marks=marks, id=f"{config}:{name}")


@pytest.mark.parametrize(("config", "name"), list(_params()))
def test_hostile_program_is_contained(sandboxes, scene, config, name):
    box = sandboxes(config)
    if box is None:
        pytest.skip(f"{config}: this machine does not allow unprivileged namespaces")
    unconfined = config.split("-")[0] + "-unconfined"
    if (unconfined, name) in ESCAPES and config not in SLOW_CONFIGS:
        guards = set(evaluate(box, [NORMAL])[0].guards)
        if not {"landlock", "seccomp"} <= guards:  # a kernel without them: documented escape
            pytest.skip(
                f"{config}: this kernel gives only {sorted(guards)}; {ESCAPES[unconfined, name]}"
            )
    start = time.perf_counter()
    hostile, normal = evaluate(box, [hostile_program(name, scene), NORMAL])
    assert time.perf_counter() - start < 15
    assert not hostile.passed, f"{name} scored as passed: {hostile.stderr[-500:]}"
    assert hostile.seconds < box.timeout_s + 3
    assert len(hostile.stderr) <= STDERR_TAIL + 200
    assert normal.passed, f"the next program failed after {name}: {normal.stderr[-500:]}"
    assert scene.escapes(hostile.stderr) == []


# A throwaway evaluator, so that a program that signals its parent can only kill that one. It
# loads sandbox.py from its file (not the package, whose import pulls in torch: seconds).
EVALUATOR = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("sandbox_under_test", sys.argv[1])
module = sys.modules["sandbox_under_test"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
box = module.Sandbox(timeout_s=2.0, workers=1, **json.loads(sys.argv[2]))
print(json.dumps([r.status for r in box.run_many(json.loads(sys.argv[3]))]), flush=True)
"""


def _evaluator(config: str, programs: list[str], tmp: Path) -> subprocess.Popen:
    """A throwaway evaluator of ``programs``; their directories go under ``tmp`` (one killed
    mid-run cannot delete its own)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            EVALUATOR,
            str(SANDBOX_PY),
            json.dumps(CONFIGS[config]),
            json.dumps(programs),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp)},
        start_new_session=True,  # a program that signals its parent's group reaches only it
    )


SIGNAL_PARENT = (
    EVADE
    + SPAWN
    + """
import os, signal
parent = os.getppid()
try:
    os.kill(parent, signal.SIGKILL)
except OSError:
    pass
try:
    os.waitpid(spawn(['/bin/kill', '-KILL', str(parent)]), 0)
except OSError:
    pass
"""
    + WRONG
    + ASSERTS
)


def _signal_params():
    for config in CONFIGS:
        marks = [pytest.mark.slow] if config in SLOW_CONFIGS else []
        if (config, "signalling the parent") in ESCAPES:
            reason = ESCAPES[config, "signalling the parent"]
            marks.append(pytest.mark.xfail(strict=True, reason=reason))
        yield pytest.param(config, marks=marks, id=config)


@pytest.mark.parametrize("config", list(_signal_params()))
def test_signalling_the_parent_is_contained(sandboxes, config, tmp_path):
    if sandboxes(config) is None:
        pytest.skip(f"{config}: this machine does not allow unprivileged namespaces")
    proc = _evaluator(config, [SIGNAL_PARENT, NORMAL], tmp_path)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, f"the evaluator died ({proc.returncode}): {err[-300:]}"
    assert json.loads(out) == ["failed", "passed"]


def _descendants(root: int) -> list[int]:
    parents = {}
    for pid in os.listdir("/proc"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            parents[int(pid)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        children = [p for p, pp in parents.items() if pp in frontier]
        found += children
        frontier = children
    return found


@pytest.mark.parametrize("config", ["process", "namespaces"])
def test_a_program_dies_with_its_evaluator(sandboxes, config, tmp_path):
    """When the evaluator is killed mid-run, the running program is killed with it."""
    if sandboxes(config) is None:
        pytest.skip(f"{config}: this machine does not allow unprivileged namespaces")
    proc = _evaluator(config, ["import time\ntime.sleep(60)\n"], tmp_path)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 20
        while not _descendants(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # let the runner reach the program
        children = _descendants(proc.pid)
        assert children, "the evaluator never started the program"
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 3
        while (alive := [p for p in children if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alive == [], f"still running after the evaluator died: {alive}"
    finally:
        proc.kill()
        proc.wait()
        for pid in [p for p in children if _alive(p)]:  # the ones this test started
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_each_result_names_the_guards_in_force(sandboxes):
    result = sandboxes("process").run(NORMAL)
    assert result.passed and result.guards[0] == "audit"
    assert set(result.guards) <= {"audit", "landlock", "seccomp"}
    unconfined = Sandbox(timeout_s=2.0, isolation="process", kernel_guards=False).run(NORMAL)
    assert unconfined.passed and unconfined.guards == ("audit",)
