"""Running a job in fresh, seeded processes: a warm fork worker, or a plain spawn per run.

The fork worker imports the heavy libraries once (never touching CUDA) and forks one child per
run, so every run starts from the same clean, just-imported state without paying the imports
again. What it imports grows while it lives ("import" requests): the packages a job's source
imports, and those a run's child imported that the worker lacked. It forks several children at a
time when asked, for the runs of one check to run side by side. Where fork is unsafe (not Linux,
or CUDA got initialised in the worker) a fresh interpreter is spawned per run instead. Results
come back as files (safetensors + JSON), never pickle.

Protocol (JSON lines): the worker first sends ``{"ready": true, ...}`` with the outcome of its
start-up imports, then answers ``{"op": "run", "id": N, ...}`` with ``{"id": N, "status": ...}``
(in the order runs finish) and ``{"op": "import", "modules": [...]}`` with ``{"op": "import", ...}``
(in order); ``{"op": "exit"}`` or a closed stdin stops it.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import importlib.util
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..context import RunSpec
from ..seeding import determinism_env
from .child import ERROR_FILE, IMPORTS_FILE, LOG_FILE, RECORD_DIR, execute

# transformers is not preloaded: importing it for set_seed costs ~2 s, paid only by jobs that use it
# (the session finds it in the job's source, or learns it from a run, and asks the worker for it).
# torch._inductor: torch.use_deterministic_algorithms() imports it (~1-2 s) on first call.
# pytest_repro.record/manifest: every child imports them to write its record and manifest.
BASE_PRELOAD = (
    "pytest",
    "numpy",
    "torch",
    "torch._inductor",
    "safetensors.torch",
    "pytest_repro.record",
    "pytest_repro.manifest",
)
# Variables read while the worker starts and imports (not only later in the job): a worker is
# reused only by runs that agree on these. Every other variable is set in each child before the job.
STARTUP_ENV = (
    "PYTHONHASHSEED",
    "PYTHONPATH",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "CUBLAS_WORKSPACE_CONFIG",
    "TOKENIZERS_PARALLELISM",
)
WORKER_START_TIMEOUT = 600.0
_GRACE = 30.0
_INLINE_LIMIT = 16384  # bytes: longer import lists go through a file


@dataclass(frozen=True)
class RunOutcome:
    """How one run ended: ok, error (the job raised), timeout, or crashed."""

    status: str
    wall_s: float
    workdir: Path
    detail: str = ""
    log_tail: str = ""
    stage: str = ""  # where an error happened: setup, import, job, record
    orphans: int = 0  # processes the job left behind (killed when the run ended)
    config_audit: dict[str, Any] | None = None  # a failed job's config reads when it failed (the child's audit)

    @property
    def record_dir(self) -> Path:
        """Where the child wrote its record."""
        return self.workdir / RECORD_DIR


def parallel_runs(
    setting: int, runs: int, device: str, threads: int, cores: int | None = None, workers: int | None = None
) -> int:
    """How many runs of one check run side by side: ``setting`` (>= 1), or for auto (0) what free cores allow.

    Auto: on the CPU with a fixed thread count, ``cores // (threads * xdist workers)`` (at most ``runs``);
    on a GPU, or with torch's default thread count (``threads == 0``, all cores), one at a time.
    """
    if setting >= 1:
        return max(1, min(setting, runs))
    if device != "cpu" or threads <= 0:
        return 1
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers is None:
        count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
        workers = int(count) if count.isdigit() and int(count) > 0 else 1
    return max(1, min(runs, cores // (threads * workers)))


# ---------------------------------------------------------------- worker side


def _log(message: str) -> None:
    print(f"pytest-repro worker {os.getpid()}: {message}", file=sys.stderr, flush=True)


def _import_entry(entry: str) -> None:
    """Import ``module`` or ``module:name`` (the name resolved too: lazy modules such as transformers load it then)."""
    module, _, attr = entry.partition(":")
    mod = importlib.import_module(module)
    if attr:
        try:
            getattr(mod, attr)
        except AttributeError:
            importlib.import_module(f"{module}.{attr}")  # `from pkg import submodule`


def _is_missing(entry: str, exc: ModuleNotFoundError) -> bool:
    """Whether the error says the entry itself is not installed (rather than that importing it failed)."""
    module, _, attr = entry.partition(":")
    full = f"{module}.{attr}" if attr else module
    return bool(exc.name) and (full == exc.name or full.startswith(f"{exc.name}."))


def _preload(entries: Sequence[str], checked: bool = False) -> dict[str, Any]:
    """Import the entries; return errors, the missing ones, and (``checked``) what made forking unsafe.

    Missing packages are skipped silently. With ``checked``, importing stops at the first entry after
    which CUDA is initialised or a Python thread is running (a forked child would inherit a broken
    CUDA context, or locks held by a thread it does not have).
    """
    errors: dict[str, str] = {}
    missing: list[str] = []
    tainted = culprit = ""
    threads = threading.active_count()
    for entry in entries:
        module, _, attr = entry.partition(":")
        if not attr and module in sys.modules:
            continue
        try:
            if importlib.util.find_spec(module.partition(".")[0]) is None:
                missing.append(entry)
                continue
            _import_entry(entry)
        except ModuleNotFoundError as exc:
            if _is_missing(entry, exc):
                missing.append(entry)
            else:
                errors[entry] = f"{type(exc).__name__}: {exc}"
        except AttributeError:
            missing.append(entry)  # `from pkg import name` of a name pkg does not have: the job fails on its own
        except (Exception, SystemExit) as exc:
            errors[entry] = f"{type(exc).__name__}: {exc}"
        if checked and _cuda_initialised():
            tainted = f"importing {entry} initialised CUDA"
        elif checked and threading.active_count() > threads:
            tainted = f"importing {entry} started a thread"
        if tainted:
            culprit = entry
            break
    return {"errors": errors, "missing": missing, "tainted": tainted, "culprit": culprit}


def _summary(entries: Sequence[str]) -> str:
    """'torch (812), transformers (140), peft' style: the top-level packages of the entries, with counts."""
    counts: dict[str, int] = {}
    for entry in entries:
        top = entry.partition(":")[0].partition(".")[0]
        counts[top] = counts.get(top, 0) + 1
    return ", ".join(f"{top} ({n})" if n > 1 else top for top, n in sorted(counts.items()))


def _preload_logged(entries: Sequence[str], when: str) -> dict[str, Any]:
    """Preload with the fork-safety checks and say in the worker's log what was imported and what was not."""
    started = time.perf_counter()
    before = len(sys.modules)
    # Garbage collection while importing thousands of modules rescans them all, over and over (~20% of the
    # import time of torch + transformers + peft); nothing cyclic worth collecting is made meanwhile.
    enabled = gc.isenabled()
    gc.disable()
    try:
        result = _preload(entries, checked=True)
    finally:
        if enabled:
            gc.enable()
    bad = set(result["errors"]) | set(result["missing"])
    done = [e for e in entries if e not in bad]
    _log(
        f"preloaded {len(done)} of {len(entries)} requested module(s) {when} in {time.perf_counter() - started:.2f} s "
        f"({len(sys.modules) - before} new in sys.modules): {_summary(done) or 'nothing'}"
    )
    for entry, error in result["errors"].items():
        _log(f"could not preload {entry} (skipped; runs import it themselves): {error}")
    if result["missing"]:
        _log(f"not installed, skipped: {', '.join(result['missing'])}")
    if result["tainted"]:
        _log(f"stopped preloading: {result['tainted']}; forking is unsafe from now on")
    return result


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def reap_group(pgid: int) -> int:
    """Kill what is left of a finished job's process group (processes it started and left running).

    Returns how many were found: the job itself has exited, so every member is an orphan.
    """
    members = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != b"Z":
                    members.append(int(entry))
    if members or not os.path.isdir("/proc"):
        _kill_group(pgid)
    return len(members)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _die_with_parent() -> None:
    """Linux: have the kernel kill this job process if the worker dies (e.g. pytest was interrupted)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the worker died before prctl took effect
            os._exit(1)


@dataclass
class _Child:
    """A forked run the worker is waiting for."""

    rid: int
    pid: int
    started: float
    deadline: float
    pidfd: int | None
    preload_errors: dict[str, str]

    def close(self) -> None:
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = None


def _reap(child: _Child, now: float) -> dict[str, Any] | None:
    """The reply for a child that has ended (killing it first when past its deadline), or None while it runs."""
    done, status = os.waitpid(child.pid, os.WNOHANG)
    reply: dict[str, Any]
    if done:
        orphans = reap_group(child.pid)
        if os.WIFSIGNALED(status):
            reply = {"status": "signaled", "signal": os.WTERMSIG(status), "orphans": orphans}
        else:
            reply = {"status": "exited", "returncode": os.WEXITSTATUS(status), "orphans": orphans}
    elif now >= child.deadline:
        _kill_group(child.pid)
        os.waitpid(child.pid, 0)
        reply = {"status": "timeout"}
    else:
        return None
    child.close()
    reply.update(id=child.rid, wall_s=time.perf_counter() - child.started, preload_errors=child.preload_errors)
    return reply


def _fork_run(request: dict[str, Any], proto: Any, children: dict[int, _Child]) -> _Child | dict[str, Any]:
    """Fork a child for one run request (the child never returns); or say why forking is unsafe."""
    rid = int(request.get("id", 0))
    spec = RunSpec.from_dict(request["spec"])
    errors = _preload(spec.job.preload)["errors"]
    if _cuda_initialised():
        return {"id": rid, "status": "unforkable", "detail": "CUDA was initialised while importing; cannot fork"}
    if threading.active_count() > 1:
        return {"id": rid, "status": "unforkable", "detail": "a preloaded module started a thread; cannot fork"}
    # Children share the worker's memory copy-on-write; freezing the GC keeps their collections
    # from touching (and so copying) every page the worker's imports created.
    gc.freeze()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.setpgid(0, 0)
            _die_with_parent()
            for other in children.values():
                other.close()
            os.environ.clear()
            os.environ.update(request["env"])
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            proto.close()
            code = execute(spec)
        finally:
            os._exit(code)
    pidfd = None
    with contextlib.suppress(OSError, AttributeError):
        pidfd = os.pidfd_open(pid)  # readable when the child exits: no polling
    return _Child(rid, pid, started, time.monotonic() + float(request["timeout"]), pidfd, errors)


def worker_main(preload: list[str]) -> None:
    """Serve requests on stdin: import once, fork fresh children for runs (several at a time), reply on stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from imports must not corrupt the protocol

    def send(msg: dict[str, Any]) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    result = _preload_logged(preload, "at start")
    send({"ready": True, "pid": os.getpid(), **result})
    children: dict[int, _Child] = {}
    buffer = b""
    running = True
    while running:
        timeout: float | None = None
        if children:
            timeout = max(0.0, min(c.deadline for c in children.values()) - time.monotonic())
            if any(c.pidfd is None for c in children.values()):
                timeout = min(timeout, 0.005)  # no pidfd (old kernel): poll
        fds = [0, *(c.pidfd for c in children.values() if c.pidfd is not None)]
        readable, _, _ = select.select(fds, [], [], timeout)
        now = time.monotonic()
        for pid in list(children):
            reply = _reap(children[pid], now)
            if reply is not None:
                del children[pid]
                send(reply)
        if 0 not in readable:
            continue
        chunk = os.read(0, 1 << 16)
        if not chunk:
            break  # the parent is gone
        buffer += chunk
        while running and b"\n" in buffer:
            line, _, buffer = buffer.partition(b"\n")
            request = json.loads(line)
            op = request.get("op", "run")
            if op == "exit":
                running = False
            elif op == "import":
                entries = request.get("modules")
                if entries is None:
                    entries = json.loads(Path(request["file"]).read_text(encoding="utf-8"))
                send({"op": "import", **_preload_logged(entries, "on request")})
            else:
                forked = _fork_run(request, proto, children)
                if isinstance(forked, dict):
                    send(forked)
                else:
                    children[forked.pid] = forked
    for child in children.values():
        _kill_group(child.pid)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child.pid, 0)


class _Worker:
    """The parent's handle on one warm fork worker."""

    def __init__(self, env: dict[str, str], log_path: Path, preload: tuple[str, ...]) -> None:
        self.log_path = log_path
        log = open(log_path, "ab")  # noqa: SIM115 - owned by the worker process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pytest_repro._exec.runner", "worker", *preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            start_new_session=True,
        )
        log.close()
        self._buffer = b""
        self._ids = itertools.count(1)
        self._lists = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self.ready = False
        self.requested: set[str] = set(preload)  # every entry it was asked to import
        self.failed: dict[str, str] = {}  # entry -> why importing it failed
        self.missing: set[str] = set()  # entries not installed
        self.tainted = ""  # why forking became unsafe, if it did
        self.culprit = ""  # the entry whose import made it unsafe

    def _read_line(self, deadline: float) -> dict[str, Any] | None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("worker exited")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)  # type: ignore[no-any-return]

    def _send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError as exc:
            raise EOFError("worker exited") from exc

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if msg.get("ready") or msg.get("op") == "import":
            self.ready = self.ready or bool(msg.get("ready"))
            self.failed.update(msg.get("errors") or {})
            self.missing.update(msg.get("missing") or ())
            if msg.get("tainted") and not self.tainted:
                self.tainted, self.culprit = str(msg["tainted"]), str(msg.get("culprit") or "")
        else:
            self._replies[int(msg.get("id", 0))] = msg

    def alive(self) -> bool:
        return self.proc.poll() is None

    def submit(self, spec: RunSpec, timeout: float, env: dict[str, str]) -> int:
        """Ask for one run; return its request id (the reply comes through wait)."""
        rid = next(self._ids)
        self._send({"op": "run", "id": rid, "spec": json.loads(spec.to_json()), "timeout": timeout, "env": env})
        return rid

    def submit_import(self, entries: Sequence[str]) -> None:
        """Ask the worker to import more modules before the runs that follow."""
        self.requested.update(entries)
        msg: dict[str, Any] = {"op": "import", "modules": list(entries)}
        if len(json.dumps(msg)) > _INLINE_LIMIT:  # a long list could fill the pipe while the worker is busy
            self._lists += 1
            path = self.log_path.with_name(f"{self.log_path.stem}-import-{self._lists}.json")
            path.write_text(json.dumps(list(entries)), encoding="utf-8")
            msg = {"op": "import", "file": str(path)}
        self._send(msg)

    def wait(self, rids: Sequence[int], deadline: float) -> tuple[int, dict[str, Any]]:
        """Wait for the first reply to one of ``rids`` (raises EOFError/TimeoutError if the worker fails)."""
        while True:
            for rid in rids:
                if rid in self._replies:
                    return rid, self._replies.pop(rid)
            msg = self._read_line(deadline)
            if msg is None:
                raise TimeoutError("the worker did not answer" if self.ready else "the worker did not start in time")
            self._dispatch(msg)

    def close(self) -> None:
        # The worker holds nothing worth flushing (its children are already reaped), and a graceful
        # interpreter shutdown with torch loaded takes seconds: kill it.
        if self.alive():
            _kill_group(self.proc.pid)
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                with contextlib.suppress(OSError):
                    pipe.close()


def fork_supported() -> bool:
    """Whether the warm fork worker can be used on this platform."""
    return hasattr(os, "fork") and sys.platform.startswith("linux")


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return text[-limit:]


# Warm workers live for the whole process (closed at exit), keyed by their exact start-up environment
# and start-up preload list, so that several pytest sessions in one process (pytester) share them safely:
# jobs and test modules are only ever imported in the forked children, never in the worker itself.
_WORKERS: dict[tuple[Any, ...], _Worker] = {}
_LOG_DIR: Path | None = None


def _log_dir() -> Path:
    global _LOG_DIR
    if _LOG_DIR is None:
        from ..scratch import make_scratch

        _LOG_DIR = make_scratch("pytest-repro-workers-")
        atexit.register(_at_exit)
    return _LOG_DIR


def _at_exit() -> None:
    shutdown_workers()
    # The interpreter's last garbage collections walk every object torch & co. created (~0.4 s of a
    # pytest --repro run). Frozen objects are skipped; the atexit handlers still to come run as usual.
    gc.freeze()


def shutdown_workers() -> None:
    """Stop every warm worker of this process and remove their logs."""
    global _LOG_DIR
    for worker in _WORKERS.values():
        worker.close()
    _WORKERS.clear()
    if _LOG_DIR is not None:
        from ..scratch import release_scratch

        release_scratch(_LOG_DIR)
        _LOG_DIR = None


# Filters a child's report of what it imported down to what the worker may preload
# (module names reported by the child, the job's module) -> entries.
LearnFilter = Callable[[Sequence[str], str], list[str]]


@dataclass
class _Spawned:
    """A spawned run in progress."""

    proc: subprocess.Popen[bytes]
    started: float
    deadline: float


class Runner:
    """Runs jobs in fresh processes, through a warm fork worker where possible."""

    def __init__(
        self,
        isolation: str,
        preload: tuple[str, ...] = BASE_PRELOAD,
        extra_env: dict[str, str] | None = None,
        learn: LearnFilter | None = None,
    ) -> None:
        if isolation not in ("auto", "fork", "spawn"):
            raise ValueError(f"isolation must be auto, fork or spawn, got {isolation!r}")
        self.isolation = "fork" if isolation in ("auto", "fork") and fork_supported() else "spawn"
        self.preload = preload
        self.extra_env = dict(extra_env or {})
        self.learn = learn
        self.wanted: dict[str, None] = {}  # entries the worker should import beyond ``preload``, in order
        self.excluded: set[str] = set()  # entries that made forking unsafe: never preloaded again
        self._reported: set[str] = set()
        self._warnings: list[str] = []
        self._warm: _Worker | None = None
        self._retired: list[_Worker] = []  # workers this runner dropped (what they failed to import still counts)

    def env(self, deterministic: bool, hash_seed: int) -> dict[str, str]:
        """The environment of job processes (and of the worker that forks them)."""
        env = determinism_env(deterministic, hash_seed)
        env.update(self.extra_env)
        return env

    # ------------------------------------------------------------ what the worker preloads

    def want(self, entries: Sequence[str]) -> None:
        """Have the worker import these too (sent before the next runs; see sync_warm to send them now)."""
        for entry in entries:
            self.wanted.setdefault(entry, None)

    def sync_warm(self) -> None:
        """Send what is wanted to the worker started by warm_up, so that it imports while pytest collects."""
        if self._warm is not None and self._warm.alive():
            with contextlib.suppress(EOFError, OSError):
                self._sync(self._warm)

    def _sync(self, worker: _Worker) -> None:
        bad = self.rejected()
        new = [e for e in self.wanted if e not in worker.requested and e not in bad]
        if new:
            worker.submit_import(new)

    def rejected(self) -> set[str]:
        """Entries that failed to import, are not installed, or made forking unsafe."""
        bad = set(self.excluded)
        for worker in [*_WORKERS.values(), *self._retired]:
            bad |= set(worker.failed) | worker.missing
        return bad

    def preloaded(self) -> list[str]:
        """Every wanted entry that imported fine where it was tried (what is worth persisting)."""
        bad = self.rejected()
        return [e for e in self.wanted if e not in bad]

    def take_warnings(self) -> list[str]:
        """Return (and forget) the preload problems found since the last call, each reported once."""
        out, self._warnings = self._warnings, []
        return out

    def _review(self, worker: _Worker) -> None:
        """Turn the worker's import failures into warnings; retire it if an import made forking unsafe."""
        for entry, error in worker.failed.items():
            if entry not in self._reported:
                self._reported.add(entry)
                self._warnings.append(
                    f"the warm worker could not import {entry} ({error}); it is skipped, so each run imports it "
                    "itself (slower). Fix: make the package importable in this environment, or remove it from "
                    "the pytest cache entry repro/preload (`pytest --cache-clear`)"
                )
        if worker.tainted and (not worker.culprit or worker.culprit in self.preload):
            self._drop(worker)  # a module every worker needs: forking cannot work in this environment
            self.isolation = "spawn"
            self._warnings.append(
                f"{worker.tainted or 'forking became unsafe'} in the warm worker, so every run of this session is "
                "a fresh interpreter (slower, same results). Fix: find what starts a thread or initialises CUDA "
                "on import (e.g. a sitecustomize), or run with --repro-isolation=spawn to skip the worker"
            )
        elif worker.tainted:
            self.excluded.add(worker.culprit)
            self._drop(worker)
            self._warnings.append(
                f"{worker.tainted} in the warm worker (forking from it is unsafe), so that worker was replaced by "
                f"one that does not preload {worker.culprit}: runs of jobs that import it pay that import themselves. "
                "Fix (only if runs are slow): have the package start threads or CUDA lazily, not on import"
            )

    def _learn_from(self, spec: RunSpec) -> None:
        """Read what the child imported beyond the worker's modules, and want the preloadable part of it."""
        if self.learn is None:
            return
        try:
            names = json.loads((Path(spec.workdir) / IMPORTS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if isinstance(names, list):
            self.want(self.learn([str(n) for n in names], spec.job.module))

    # ------------------------------------------------------------ workers

    def _worker(self, env: dict[str, str]) -> _Worker:
        key = (sys.executable, tuple((k, env.get(k)) for k in STARTUP_ENV), self.preload)
        worker = _WORKERS.get(key)
        if worker is None or not worker.alive():
            log = _log_dir() / f"worker-{len(_WORKERS)}-{os.getpid()}.log"
            worker = _WORKERS[key] = _Worker(env, log, self.preload)
        return worker

    def _drop(self, worker: _Worker) -> None:
        worker.close()
        self._retired.append(worker)
        for key in [k for k, w in _WORKERS.items() if w is worker]:
            del _WORKERS[key]
        if self._warm is worker:
            self._warm = None

    def warm_up(self, deterministic: bool, hash_seed: int) -> None:
        """Start a worker early (and send it what is wanted) so that its imports overlap with collection."""
        if self.isolation == "fork":
            self._warm = self._worker(self.env(deterministic, hash_seed))
            self.sync_warm()

    # ------------------------------------------------------------ runs

    def run(self, spec: RunSpec, timeout: float, hash_seed: int) -> RunOutcome:
        """Run the job once in a fresh process and report how it ended."""
        return self.run_many([spec], timeout, hash_seed)[0]

    def run_many(self, specs: Sequence[RunSpec], timeout: float, hash_seed: int, parallel: int = 1) -> list[RunOutcome]:
        """Run each spec in its own fresh process, up to ``parallel`` at a time; outcomes in spec order.

        Stops starting runs once one has not ended ok, so the list may be shorter than ``specs``
        (it always holds the first failed run, and every run started before it ended).
        """
        for spec in specs:
            Path(spec.workdir).mkdir(parents=True, exist_ok=True)
        if not specs:
            return []
        if len({s.deterministic for s in specs}) > 1:  # different start-up environments: one batch each
            out: list[RunOutcome] = []
            for spec in specs:
                out += self.run_many([spec], timeout, hash_seed, parallel)
                if out[-1].status != "ok":
                    break
            return out
        if self.isolation == "fork":
            return self._run_forked(specs, timeout, hash_seed, max(1, parallel))
        return self._run_spawned(specs, timeout, hash_seed, max(1, parallel))

    def _run_forked(self, specs: Sequence[RunSpec], timeout: float, hash_seed: int, parallel: int) -> list[RunOutcome]:
        env = self.env(specs[0].deterministic, hash_seed)
        worker = self._worker(env)
        outcomes: dict[int, RunOutcome] = {}
        in_flight: dict[int, tuple[int, float]] = {}  # request id -> (spec index, deadline)
        spawn_later: list[int] = []
        failed = False
        started = 0
        try:
            while in_flight or (started < len(specs) and not failed):
                while started < len(specs) and not failed and len(in_flight) < parallel:
                    if not in_flight:  # never while a child runs: the worker would not reap it while importing
                        self._sync(worker)
                    rid = worker.submit(specs[started], timeout, env)
                    in_flight[rid] = (started, time.monotonic() + timeout + WORKER_START_TIMEOUT + _GRACE)
                    started += 1
                rid, reply = worker.wait(list(in_flight), min(d for _, d in in_flight.values()))
                index = in_flight.pop(rid)[0]
                if reply.get("status") == "unforkable":
                    spawn_later.append(index)
                    continue
                outcomes[index] = self._outcome(reply, Path(specs[index].workdir), timeout)
                if outcomes[index].status == "ok":
                    self._learn_from(specs[index])
                else:
                    failed = True
        except (EOFError, TimeoutError, OSError) as exc:
            self._drop(worker)
            reply = {"status": "worker-died", "detail": str(exc), "log": _tail(worker.log_path)}
            for index, _ in in_flight.values():
                outcomes[index] = self._outcome(reply, Path(specs[index].workdir), timeout)
        else:
            self._review(worker)
        for index in spawn_later:
            outcomes[index] = self._run_spawned([specs[index]], timeout, hash_seed, 1)[0]
        return [outcomes[i] for i in sorted(outcomes)]

    def _start_spawned(self, spec: RunSpec, env: dict[str, str], timeout: float) -> _Spawned:
        workdir = Path(spec.workdir)
        spec_file = workdir / "spec.json"
        spec_file.write_text(spec.to_json(), encoding="utf-8")
        started = time.perf_counter()
        with open(workdir / LOG_FILE, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pytest_repro._exec.child", str(spec_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        return _Spawned(proc, started, time.monotonic() + timeout)

    @staticmethod
    def _finish_spawned(run: _Spawned, now: float) -> dict[str, Any] | None:
        code = run.proc.poll()
        if code is None:
            if now < run.deadline:
                return None
            _kill_group(run.proc.pid)
            run.proc.wait()
            return {"status": "timeout", "wall_s": time.perf_counter() - run.started}
        wall = time.perf_counter() - run.started
        orphans = reap_group(run.proc.pid)
        if code < 0:
            return {"status": "signaled", "signal": -code, "wall_s": wall, "orphans": orphans}
        return {"status": "exited", "returncode": code, "wall_s": wall, "orphans": orphans}

    def _run_spawned(self, specs: Sequence[RunSpec], timeout: float, hash_seed: int, parallel: int) -> list[RunOutcome]:
        env = self.env(specs[0].deterministic, hash_seed)
        outcomes: dict[int, RunOutcome] = {}
        running: dict[int, _Spawned] = {}
        started, failed, delay = 0, False, 0.002
        try:
            while running or (started < len(specs) and not failed):
                while started < len(specs) and not failed and len(running) < parallel:
                    running[started] = self._start_spawned(specs[started], env, timeout)
                    started += 1
                    delay = 0.002
                now = time.monotonic()
                for index in list(running):
                    reply = self._finish_spawned(running[index], now)
                    if reply is not None:
                        del running[index]
                        outcomes[index] = self._outcome(reply, Path(specs[index].workdir), timeout)
                        failed = failed or outcomes[index].status != "ok"
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
        finally:
            for run in running.values():  # interrupted: leave nothing behind
                _kill_group(run.proc.pid)
                run.proc.wait()
        return [outcomes[i] for i in sorted(outcomes)]

    @staticmethod
    def _outcome(reply: dict[str, Any], workdir: Path, timeout: float) -> RunOutcome:
        outcome = Runner._classify(reply, workdir, timeout)
        orphans = int(reply.get("orphans") or 0)
        return replace(outcome, orphans=orphans) if orphans else outcome

    @staticmethod
    def _classify(reply: dict[str, Any], workdir: Path, timeout: float) -> RunOutcome:
        wall = float(reply.get("wall_s", 0.0))
        tail = _tail(workdir / LOG_FILE)
        status = reply.get("status")
        if status == "timeout":
            return RunOutcome("timeout", wall, workdir, f"killed after {timeout:g} s without finishing", tail)
        if status == "worker-died":
            return RunOutcome(
                "crashed", wall, workdir, f"the fork worker failed: {reply.get('detail')}", reply.get("log", "") or tail
            )
        error_file = workdir / ERROR_FILE
        if error_file.exists():
            stage, audit = "job", None
            try:
                err = json.loads(error_file.read_text(encoding="utf-8"))
                detail = str(err["traceback"])
                stage = str(err.get("stage", "job"))
                audit = err.get("config_audit") if isinstance(err.get("config_audit"), dict) else None
            except (OSError, ValueError, KeyError, TypeError):
                detail = "the job raised, and its error report is unreadable"
            return RunOutcome("error", wall, workdir, detail, tail, stage=stage, config_audit=audit)
        if status == "signaled":
            name = signal.Signals(int(reply["signal"])).name
            return RunOutcome("crashed", wall, workdir, f"the job process was killed by {name}", tail)
        if reply.get("returncode") != 0 or not (workdir / RECORD_DIR).is_dir():
            return RunOutcome(
                "crashed",
                wall,
                workdir,
                f"the job process exited with code {reply.get('returncode')} and wrote no record",
                tail,
            )
        return RunOutcome("ok", wall, workdir, "", tail)


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "worker":
        worker_main(argv[1:])
        return 0
    print("usage: python -m pytest_repro._exec.runner worker [MODULE...]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
