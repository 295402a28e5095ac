"""The grader's isolation: fresh copies, scrubbed environments, no process left behind, changes noticed.

* :class:`Snapshot` reads the course's files (``labsupport/``, ``data/``, ``benchmarks/results/``) into memory
  once, when grading starts, and writes a fresh copy for every run: a submission that rewrites the course on disk
  changes neither the checkers nor the data of any later run.
* :func:`sandbox_env` is the whole environment of a run: no variable of the grader's passes except a short
  allow-list; ``HOME``, ``TMPDIR``, IPython's and Jupyter's directories point into the run's directory.
* :func:`run_sandboxed` starts a command in its own session with a wall-clock limit, and afterwards kills every
  process the run left (:func:`kill_run`): its session, every process that carries the run's token in its
  environment, and — the grader being a Linux *child subreaper* (:func:`become_subreaper`) — every orphan that a
  double fork handed back to the grader.
* :class:`FileScan` records size and inode-change time (``st_ctime``, which no user can set back) of every file
  under the course and the Python installation, so a run that changed one is named.

Everything here is defence for a grader running as the same user as the notebooks; see
``docs/teaching/grading.md`` for what that does not stop.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FileScan", "RunResult", "Snapshot", "TOKEN_VAR", "become_subreaper", "descendants", "kill_run",
           "new_token", "run_sandboxed", "sandbox_env", "set_limits"]

#: Every process of a run carries this variable (a random token per run), so the grader can find them all.
TOKEN_VAR = "LABSUPPORT_GRADE_RUN"
#: Variables of the grader's environment a run may see.
PASSED_THROUGH = ("LANG", "LC_ALL", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "TZ")
_COURSE_PARTS = ("labsupport", "data", "benchmarks/results")
_SKIP = ("__pycache__", ".pyc", ".ipynb_checkpoints")
_PR_SET_CHILD_SUBREAPER = 36


class Snapshot:
    """The course's files, read into memory once (``labsupport/``, ``data/``, ``benchmarks/results/``)."""

    def __init__(self, course_root: Path) -> None:
        self.root = Path(course_root)
        self.files: dict[str, bytes] = {}
        for part in _COURSE_PARTS:
            base = self.root / part
            for path in sorted(base.rglob("*")) if base.is_dir() else []:
                if path.is_file() and not any(s in str(path) for s in _SKIP):
                    self.files[path.relative_to(self.root).as_posix()] = path.read_bytes()
        if "labsupport/__init__.py" not in self.files:
            raise ValueError(f"{course_root} holds no labsupport package")

    def write(self, target: Path) -> None:
        """A fresh copy of the course under ``target`` (the run's import root)."""
        for name, content in self.files.items():
            path = target / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)


def sandbox_env(run_dir: Path, token: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The complete environment of a run in ``run_dir``."""
    home = run_dir / "home"
    for sub in ("home", "tmp", "runtime"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    env = {name: os.environ[name] for name in PASSED_THROUGH if name in os.environ}
    env.update({
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"]),
        "HOME": str(home), "TMPDIR": str(run_dir / "tmp"), "PYTHONPATH": str(run_dir),
        "PYTHONNOUSERSITE": "1", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
        "IPYTHONDIR": str(home / ".ipython"), "JUPYTER_RUNTIME_DIR": str(run_dir / "runtime"),
        "JUPYTER_CONFIG_DIR": str(home / ".jupyter"), "JUPYTER_DATA_DIR": str(home / ".jupyter-data"),
        "MPLCONFIGDIR": str(home / ".matplotlib"), "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1", "TQDM_MININTERVAL": "5", TOKEN_VAR: token,
    })
    env.setdefault("LANG", "C.UTF-8")
    env.update(extra or {})
    return env


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux); False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _processes() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, state letter) of every process in /proc."""
    found = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                found[int(entry.name)] = (int(fields[1]), fields[0])
            except (OSError, ValueError, IndexError):
                continue
    return found


def descendants(pid: int | None = None, *, zombies: bool = False) -> set[int]:
    """Every process below ``pid`` (default: this process); exited ones not yet reaped only with ``zombies``."""
    root = os.getpid() if pid is None else pid
    processes = _processes()
    below, frontier = set(), {root}
    while frontier:
        frontier = {child for child, (parent, _) in processes.items() if parent in frontier and child not in below}
        below |= frontier
    return below if zombies else {p for p in below if processes.get(p, (0, "Z"))[1] != "Z"}


def _carries(pid: int, token: str) -> bool:
    try:
        return f"{TOKEN_VAR}={token}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _kill(pids: set[int]) -> set[int]:
    killed = set()
    for pid in pids - {os.getpid()}:
        try:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        except (ProcessLookupError, PermissionError):
            continue
    return killed


def kill_run(token: str, session: int | None, spare: set[int] | None) -> int:
    """Kill what a run left: its session, every process carrying its token and, unless ``spare`` is None (runs
    side by side), every descendant of the grader that is not in ``spare`` (those alive before the run began).
    Returns how many processes were killed."""
    killed: set[int] = set()
    for _ in range(3):  # a process may fork while we look: look again
        below = descendants()
        targets = {pid for pid in _processes() if _carries(pid, token)}  # wherever they went
        if spare is not None:
            targets |= below - spare
        if session is not None:
            try:
                os.killpg(session, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        killed |= _kill(targets)
        # Sequential runs: also collect the run's exited processes handed to us (side by side, a zombie may be
        # another run's command, which its own thread waits for).
        _reap(targets | (descendants(zombies=True) - spare if spare is not None else set()))
        if not targets:
            break
        time.sleep(0.05)
    return len(killed)


def _reap(pids: set[int]) -> None:
    """Collect the exit status of killed processes that were (or became, as orphans) our children."""
    time.sleep(0.02)
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except (ChildProcessError, OSError):
            continue


@dataclass
class RunResult:
    """How a sandboxed command ended."""

    returncode: int | None
    timed_out: bool
    stdout: str
    seconds: float
    left_behind: int


def run_sandboxed(command: list[str], cwd: Path, env: dict[str, str], timeout: float,
                  alone: bool) -> RunResult:
    """Run ``command`` in its own session with a wall-clock limit; kill whatever it leaves behind (``alone``: no
    other run is going on, so every new descendant of the grader is this run's)."""
    become_subreaper()
    spare = descendants() if alone else None
    started = time.monotonic()
    # Output goes to an anonymous file, not a pipe: a process the command leaves behind could hold a pipe open,
    # and we wait for the command itself, not for the end of its output.
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=output,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        timed_out = False
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.kill()
            process.wait()
        seconds = time.monotonic() - started
        others = kill_run(env[TOKEN_VAR], process.pid, spare)
        output.seek(0)
        text = output.read()[-20000:].decode("utf-8", "replace")
    return RunResult(process.returncode, timed_out, text, seconds, others)


def set_limits() -> None:
    """Called first thing by the sandboxed commands: no core dumps, no file over 4 GiB."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    gib = 2 ** 30
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 * gib, 4 * gib))


class FileScan:
    """Size and inode-change time of every file under some roots, to name the files a run changed."""

    def __init__(self, roots: list[Path]) -> None:
        self.roots = [Path(r) for r in roots if Path(r).exists()]
        self.state = self._scan()

    @classmethod
    def for_course(cls, course_root: Path, extra: list[Path] | None = None) -> FileScan:
        """The course's files and the Python installation the runs import from."""
        paths = sysconfig.get_paths()
        roots = [Path(course_root) / p for p in ("labsupport", "data", "notebooks")]
        roots += [Path(paths["purelib"]), Path(paths["platlib"]), Path(paths["stdlib"])]
        return cls(sorted(set(roots)) + list(extra or []))

    def _scan(self) -> dict[str, tuple[int, int]]:
        state = {}
        for root in self.roots:
            for folder, dirs, files in os.walk(root):
                dirs[:] = [d for d in dirs if d != "__pycache__"]
                for name in files:
                    if name.endswith(".pyc"):
                        continue
                    path = os.path.join(folder, name)
                    try:
                        info = os.lstat(path)
                    except OSError:
                        continue
                    state[path] = (info.st_size, info.st_ctime_ns)
        return state

    def changes(self) -> list[str]:
        """Files created, changed or removed since the last call (or since the scan began)."""
        now = self._scan()
        changed = sorted(p for p in now.keys() | self.state.keys() if now.get(p) != self.state.get(p))
        self.state = now
        return changed


def new_token() -> str:
    """A fresh random run token."""
    return secrets.token_hex(16)
