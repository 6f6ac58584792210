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
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .seeding import determinism_env

RECORD_DIR = "record"
ERROR_FILE = "error.json"
MANIFEST_FILE = "manifest.json"
LOG_FILE = "output.log"
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


class JobReferenceError(ValueError):
    """A job that cannot be run in a separate process (not an importable top-level function)."""


@dataclass(frozen=True)
class JobRef:
    """How a child process finds a job: module, qualified name, and the file as a fallback."""

    module: str
    qualname: str
    file: str | None = None
    preload: tuple[str, ...] = ()

    @classmethod
    def from_callable(cls, job: Callable[..., Any] | str) -> JobRef:
        """Describe a top-level function (or a "module:function" string) for a child process."""
        if isinstance(job, str):
            module, sep, qualname = job.partition(":")
            if not sep or not module or not qualname:
                raise JobReferenceError(f"job {job!r}: expected 'package.module:function'")
            return cls(module, qualname)
        if not callable(job):
            raise JobReferenceError(f"job {job!r} is not callable")
        mod_name: str | None = getattr(job, "__module__", None)
        qual: str | None = getattr(job, "__qualname__", None)
        if not mod_name or not qual or "<locals>" in qual or "<lambda>" in qual:
            raise JobReferenceError(
                f"job {job!r} must be an importable top-level function (defined at module level, "
                "not a lambda or a nested function) so that a fresh process can import it"
            )
        if mod_name == "__main__":
            raise JobReferenceError(f"job {qual!r} is defined in __main__; move it into an importable module")
        code = getattr(job, "__code__", None)
        file = getattr(code, "co_filename", None) or getattr(sys.modules.get(mod_name), "__file__", None)
        preload = tuple(getattr(job, "__repro_preload__", ()))
        return cls(mod_name, qual, file, preload)

    @property
    def name(self) -> str:
        """Return the job's 'module:qualname' form."""
        return f"{self.module}:{self.qualname}"


@dataclass(frozen=True)
class RunSpec:
    """Everything a child process needs to run one job once."""

    job: JobRef
    config: dict[str, Any]
    seed: int
    device: str
    deterministic: bool
    run_index: int
    workdir: str
    cwd: str
    sys_path: tuple[str, ...] = ()
    manifest: bool = False
    config_dir: str | None = None
    manifest_packages: tuple[str, ...] = ()
    identity: str = "hash"
    diagnose: bool = False

    def to_json(self) -> str:
        """Serialize for the worker protocol."""
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSpec:
        """Rebuild from the JSON form."""
        d = dict(data)
        job = d.pop("job")
        job["preload"] = tuple(job.get("preload", ()))
        d["sys_path"] = tuple(d.get("sys_path", ()))
        d["manifest_packages"] = tuple(d.get("manifest_packages", ()))
        return cls(job=JobRef(**job), **d)


@dataclass(frozen=True)
class RunOutcome:
    """How one run ended: ok, error (the job raised), timeout, or crashed."""

    status: str
    wall_s: float
    workdir: Path
    detail: str = ""
    log_tail: str = ""

    @property
    def record_dir(self) -> Path:
        """Where the child wrote its record."""
        return self.workdir / RECORD_DIR


class TrackedConfig(dict[str, Any]):
    """A config dict that remembers which keys the job read, and which absent keys it asked for."""

    def __init__(self, data: Mapping[str, Any], prefix: str = "", log: dict[str, set[str]] | None = None) -> None:
        super().__init__(data)
        self._prefix = prefix
        self._log = log if log is not None else {"read": set(), "undeclared": set()}

    def _path(self, key: Any) -> str:
        return f"{self._prefix}{key}"

    def _wrap(self, key: Any, value: Any) -> Any:
        if isinstance(value, dict) and not isinstance(value, TrackedConfig):
            value = TrackedConfig(value, f"{self._path(key)}.", self._log)
            super().__setitem__(key, value)
        return value

    def __getitem__(self, key: Any) -> Any:
        if key not in self:
            self._log["undeclared"].add(self._path(key))
        self._log["read"].add(self._path(key))
        return self._wrap(key, super().__getitem__(key))

    def get(self, key: Any, default: Any = None) -> Any:
        """Like dict.get, and record the read (a missing key means the job used an undeclared default)."""
        if key not in self:
            self._log["undeclared"].add(self._path(key))
            return default
        return self[key]

    def items(self) -> Any:  # type: ignore[override]
        """Like dict.items; every key counts as read."""
        return [(k, self[k]) for k in self.keys()]

    def values(self) -> Any:  # type: ignore[override]
        """Like dict.values; every key counts as read."""
        return [self[k] for k in self.keys()]

    def audit(self) -> dict[str, list[str]]:
        """Return the undeclared reads and the declared leaf keys the job never read."""
        read = self._log["read"]

        def used(path: str) -> bool:
            # A section read whole and handed on (none of its keys read one by one) counts as used.
            while path not in read:
                if "." not in path:
                    return False
                path = path.rsplit(".", 1)[0]
                if path in read:
                    return not any(r.startswith(path + ".") for r in read)
            return True

        unused = sorted(p for p in _leaf_paths(self) if not used(p))
        return {"undeclared_reads": sorted(self._log["undeclared"]), "unused_keys": unused}


def _leaf_paths(data: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key, value in dict.items(data):  # dict's own items(): walking the tree is not a read
        if isinstance(value, dict) and value:
            out += _leaf_paths(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


@dataclass
class JobContext:
    """What a job receives: seed, device, config, a work dir and seeded generators."""

    seed: int
    device: str
    config: dict[str, Any]
    workdir: Path
    run_index: int = 0
    deterministic: bool = True
    config_dir: Path | None = None
    _rng: Any = field(default=None, repr=False)

    @property
    def rng(self) -> Any:
        """A numpy.random.Generator seeded with this run's seed."""
        if self._rng is None:
            import numpy as np

            self._rng = np.random.default_rng(self.seed)
        return self._rng

    def generator(self, device: str | None = None) -> Any:
        """Return a torch.Generator on ``device`` (default: the run's device) seeded with this run's seed."""
        import torch

        gen = torch.Generator(device=device or self.device)
        gen.manual_seed(self.seed)
        return gen

    def path(self, value: str | os.PathLike[str]) -> Path:
        """Resolve a path from the config: relative paths are taken from the config file's folder."""
        p = Path(value)
        if p.is_absolute():
            return p
        if self.config_dir is not None and (self.config_dir / p).exists():
            return self.config_dir / p
        return Path.cwd() / p


# ---------------------------------------------------------------- child side


def _resolve_job(ref: JobRef) -> Callable[..., Any]:
    try:
        obj: Any = importlib.import_module(ref.module)
    except ImportError:
        if not ref.file or not Path(ref.file).exists():
            raise
        name = f"_pytest_repro_job_{abs(hash(ref.file))}"
        spec = importlib.util.spec_from_file_location(name, ref.file)
        if spec is None or spec.loader is None:
            raise
        obj = importlib.util.module_from_spec(spec)
        sys.modules[name] = obj
        spec.loader.exec_module(obj)
    for part in ref.qualname.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[no-any-return]


def _main_dtype(weights: Mapping[str, Any], config: Mapping[str, Any]) -> str | None:
    if isinstance(config.get("dtype"), str):
        return str(config["dtype"])
    counts: dict[str, int] = {}
    for t in weights.values():
        if t.dtype.is_floating_point:
            name = str(t.dtype).replace("torch.", "")
            counts[name] = counts.get(name, 0) + t.numel()
    return max(counts, key=lambda k: counts[k]) if counts else None


def execute(spec: RunSpec) -> int:
    """Run one job in this (fresh) process and write its record to ``spec.workdir``; return an exit code."""
    workdir = Path(spec.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(workdir / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    try:
        os.chdir(spec.cwd)
        for entry in reversed(spec.sys_path):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        from .manifest import collect_manifest
        from .record import dump_json, normalize_result, save_record
        from .seeding import determinism_flags, seed_everything

        hash_seed = os.environ.get("PYTHONHASHSEED")
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads and threads.isdigit() and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(threads))  # the worker imported torch before this run's env
        seed_everything(spec.seed, deterministic=spec.deterministic, transformers=False)
        job = _resolve_job(spec.job)
        transformers = sys.modules.get("transformers")
        if transformers is not None:  # the job uses transformers: seed it the way it expects, too
            transformers.set_seed(spec.seed)
        config = TrackedConfig(spec.config)
        ctx = JobContext(
            seed=spec.seed,
            device=spec.device,
            config=config,
            workdir=workdir / "job",
            run_index=spec.run_index,
            deterministic=spec.deterministic,
            config_dir=Path(spec.config_dir) if spec.config_dir else None,
        )
        ctx.workdir.mkdir(exist_ok=True)
        tracer = None
        if spec.diagnose:
            from .diagnose import StepTracer

            tracer = StepTracer().install()
        started = time.perf_counter()
        result = job(ctx)
        wall = time.perf_counter() - started
        if tracer is not None:
            tracer.save(workdir)
        flags = determinism_flags()
        flags["PYTHONHASHSEED"] = hash_seed
        flags["transformers_set_seed"] = transformers is not None
        meta: dict[str, Any] = {
            "seed": spec.seed,
            "device": spec.device,
            "deterministic": spec.deterministic,
            "run_index": spec.run_index,
            "job": spec.job.name,
            "flags": flags,
            "wall_s": round(wall, 4),
        }
        torch = sys.modules.get("torch")
        if torch is not None:
            meta["torch_threads"] = torch.get_num_threads()
        meta["config_audit"] = config.audit()
        record = normalize_result(result, meta)
        record.meta["dtype"] = _main_dtype(record.weights, spec.config)
        save_record(record, workdir / RECORD_DIR)
        if spec.manifest:
            manifest = collect_manifest(spec.cwd, spec.manifest_packages, spec.identity)
            (workdir / MANIFEST_FILE).write_text(dump_json(manifest), encoding="utf-8")
        return 0
    except BaseException as exc:
        error = {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
        (workdir / ERROR_FILE).write_text(json.dumps(error), encoding="utf-8")
        return 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()


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
            if os.WIFSIGNALED(status):
                return {"status": "signaled", "signal": os.WTERMSIG(status)}
            return {"status": "exited", "returncode": os.WEXITSTATUS(status)}
        if time.monotonic() >= deadline:
            _kill_group(pid)
            os.waitpid(pid, 0)
            return {"status": "timeout"}
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


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
                [sys.executable, "-m", "pytest_repro.runner", "child", str(spec_file)],
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
        if code < 0:
            return {"status": "signaled", "signal": -code, "wall_s": wall}
        return {"status": "exited", "returncode": code, "wall_s": wall}

    @staticmethod
    def _outcome(reply: dict[str, Any], workdir: Path, timeout: float) -> RunOutcome:
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
            try:
                err = json.loads(error_file.read_text(encoding="utf-8"))
                detail = str(err["traceback"])
            except (OSError, ValueError, KeyError):
                detail = "the job raised, and its error report is unreadable"
            return RunOutcome("error", wall, workdir, detail, tail)
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
    if len(argv) == 2 and argv[0] == "child":
        spec = RunSpec.from_dict(json.loads(Path(argv[1]).read_text(encoding="utf-8")))
        return execute(spec)
    print("usage: python -m pytest_repro.runner worker [MODULE...] | child SPEC.json", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
