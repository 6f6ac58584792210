"""Running a job in fresh, seeded processes: a warm fork worker, or a plain spawn per run.

The fork worker imports the heavy libraries once (never touching CUDA) and forks one child per
run, so every run starts from the same clean, just-imported state without paying the imports
again. Where fork is unsafe (not Linux, or CUDA got initialised in the worker) a fresh
interpreter is spawned per run instead. Results come back as files (safetensors + JSON), never
pickle.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .child import ERROR_FILE, LOG_FILE, RECORD_DIR, execute
from .context import RunSpec
from .seeding import determinism_env

# transformers is not preloaded: importing it for set_seed costs ~2 s, paid only by jobs that use it
# (they preload it through __repro_preload__ or import it themselves).
# torch._inductor: torch.use_deterministic_algorithms() imports it (~1-2 s) on first call.
BASE_PRELOAD = ("pytest", "numpy", "torch", "torch._inductor", "safetensors.torch")
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

    @property
    def record_dir(self) -> Path:
        """Where the child wrote its record."""
        return self.workdir / RECORD_DIR


# ---------------------------------------------------------------- worker side


def _preload(modules: tuple[str, ...] | list[str]) -> dict[str, str]:
    errors: dict[str, str] = {}
    for name in modules:
        if name in sys.modules:
            continue
        try:
            if importlib.util.find_spec(name.split(".")[0]) is None:
                continue
            importlib.import_module(name)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    return errors


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def _wait_child(pid: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            orphans = reap_group(pid)
            if os.WIFSIGNALED(status):
                return {"status": "signaled", "signal": os.WTERMSIG(status), "orphans": orphans}
            return {"status": "exited", "returncode": os.WEXITSTATUS(status), "orphans": orphans}
        if time.monotonic() >= deadline:
            _kill_group(pid)
            os.waitpid(pid, 0)
            return {"status": "timeout"}
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


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


def worker_main(preload: list[str]) -> None:
    """Serve run requests on stdin: import once, fork a fresh child per run, reply on the original stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from imports must not corrupt the protocol

    def send(msg: dict[str, Any]) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    send({"ready": True, "pid": os.getpid(), "preload_errors": _preload(preload)})
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "exit":
            break
        spec = RunSpec.from_dict(request["spec"])
        errors = _preload(spec.job.preload)
        if _cuda_initialised():
            send({"status": "unforkable", "detail": "CUDA was initialised while importing; cannot fork"})
            continue
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
                os.environ.clear()
                os.environ.update(request["env"])
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                proto.close()
                code = execute(spec)
            finally:
                os._exit(code)
        reply = _wait_child(pid, float(request["timeout"]))
        reply["wall_s"] = time.perf_counter() - started
        reply["preload_errors"] = errors
        send(reply)


class _Worker:
    """The parent's handle on one warm fork worker."""

    def __init__(self, env: dict[str, str], log_path: Path, preload: tuple[str, ...]) -> None:
        self.log_path = log_path
        log = open(log_path, "ab")  # noqa: SIM115 - owned by the worker process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pytest_repro.runner", "worker", *preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            start_new_session=True,
        )
        log.close()
        self._buffer = b""
        self.ready = False

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

    def alive(self) -> bool:
        return self.proc.poll() is None

    def request(self, spec: RunSpec, timeout: float, env: dict[str, str]) -> dict[str, Any]:
        """Send one run request and wait for its reply (raises EOFError/TimeoutError if the worker fails)."""
        if not self.ready:
            if self._read_line(time.monotonic() + WORKER_START_TIMEOUT) is None:
                raise TimeoutError(f"the worker did not start within {WORKER_START_TIMEOUT:.0f} s")
            self.ready = True
        assert self.proc.stdin is not None
        msg = json.dumps({"op": "run", "spec": json.loads(spec.to_json()), "timeout": timeout, "env": env}) + "\n"
        try:
            self.proc.stdin.write(msg.encode())
            self.proc.stdin.flush()
        except BrokenPipeError as exc:
            raise EOFError("worker exited") from exc
        reply = self._read_line(time.monotonic() + timeout + WORKER_START_TIMEOUT + _GRACE)
        if reply is None:
            raise TimeoutError("the worker did not answer")
        return reply

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
# and preload list, so that several pytest sessions in one process (pytester) share them safely:
# jobs and test modules are only ever imported in the forked children, never in the worker itself.
_WORKERS: dict[tuple[Any, ...], _Worker] = {}
_LOG_DIR: Path | None = None


def _log_dir() -> Path:
    global _LOG_DIR
    if _LOG_DIR is None:
        import tempfile

        _LOG_DIR = Path(tempfile.mkdtemp(prefix="pytest-repro-workers-"))
        atexit.register(shutdown_workers)
    return _LOG_DIR


def shutdown_workers() -> None:
    """Stop every warm worker of this process and remove their logs."""
    global _LOG_DIR
    for worker in _WORKERS.values():
        worker.close()
    _WORKERS.clear()
    if _LOG_DIR is not None:
        import shutil

        shutil.rmtree(_LOG_DIR, ignore_errors=True)
        _LOG_DIR = None


class Runner:
    """Runs jobs in fresh processes, through a warm fork worker where possible."""

    def __init__(
        self, isolation: str, preload: tuple[str, ...] = BASE_PRELOAD, extra_env: dict[str, str] | None = None
    ) -> None:
        if isolation not in ("auto", "fork", "spawn"):
            raise ValueError(f"isolation must be auto, fork or spawn, got {isolation!r}")
        self.isolation = "fork" if isolation in ("auto", "fork") and fork_supported() else "spawn"
        self.preload = preload
        self.extra_env = dict(extra_env or {})

    def env(self, deterministic: bool, hash_seed: int) -> dict[str, str]:
        """The environment of job processes (and of the worker that forks them)."""
        env = determinism_env(deterministic, hash_seed)
        env.update(self.extra_env)
        return env

    def _worker(self, env: dict[str, str]) -> _Worker:
        key = (sys.executable, tuple((k, env.get(k)) for k in STARTUP_ENV), self.preload)
        worker = _WORKERS.get(key)
        if worker is None or not worker.alive():
            log = _log_dir() / f"worker-{len(_WORKERS)}-{os.getpid()}.log"
            worker = _WORKERS[key] = _Worker(env, log, self.preload)
        return worker

    def warm_up(self, deterministic: bool, hash_seed: int) -> None:
        """Start a worker early so that its imports overlap with collection."""
        if self.isolation == "fork":
            self._worker(self.env(deterministic, hash_seed))

    def run(self, spec: RunSpec, timeout: float, hash_seed: int) -> RunOutcome:
        """Run the job once in a fresh process and report how it ended."""
        workdir = Path(spec.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        if self.isolation == "fork":
            reply = self._run_forked(spec, timeout, hash_seed)
            if reply.get("status") == "unforkable":
                reply = self._run_spawned(spec, timeout, hash_seed)
        else:
            reply = self._run_spawned(spec, timeout, hash_seed)
        return self._outcome(reply, workdir, timeout)

    def _run_forked(self, spec: RunSpec, timeout: float, hash_seed: int) -> dict[str, Any]:
        env = self.env(spec.deterministic, hash_seed)
        worker = self._worker(env)
        try:
            return worker.request(spec, timeout, env)
        except (EOFError, TimeoutError, OSError) as exc:
            worker.close()
            for key in [k for k, w in _WORKERS.items() if w is worker]:
                del _WORKERS[key]
            return {"status": "worker-died", "detail": str(exc), "log": _tail(worker.log_path)}

    def _run_spawned(self, spec: RunSpec, timeout: float, hash_seed: int) -> dict[str, Any]:
        workdir = Path(spec.workdir)
        spec_file = workdir / "spec.json"
        spec_file.write_text(spec.to_json(), encoding="utf-8")
        env = self.env(spec.deterministic, hash_seed)
        started = time.perf_counter()
        with open(workdir / LOG_FILE, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pytest_repro.child", str(spec_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                proc.wait()
                return {"status": "timeout", "wall_s": time.perf_counter() - started}
        wall = time.perf_counter() - started
        orphans = reap_group(proc.pid)
        if code < 0:
            return {"status": "signaled", "signal": -code, "wall_s": wall, "orphans": orphans}
        return {"status": "exited", "returncode": code, "wall_s": wall, "orphans": orphans}

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
            stage = "job"
            try:
                err = json.loads(error_file.read_text(encoding="utf-8"))
                detail = str(err["traceback"])
                stage = str(err.get("stage", "job"))
            except (OSError, ValueError, KeyError):
                detail = "the job raised, and its error report is unreadable"
            return RunOutcome("error", wall, workdir, detail, tail, stage=stage)
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
    print("usage: python -m pytest_repro.runner worker [MODULE...]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
