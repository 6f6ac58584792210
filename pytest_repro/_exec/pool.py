"""The pytest process's side of job processes: handles on warm fork workers (kept per process), spawned runs.

A ``Worker`` starts ``python -m pytest_repro._exec.worker`` on pipes (this session's own worker), or connects
to the worker daemon (``daemon``), and talks to it in the ``protocol``: submit runs and imports, wait for
replies. A spawned run is a fresh ``python -m pytest_repro._exec.child``.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import itertools
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..context import RunSpec
from .child import LOG_FILE
from .daemon import CONNECT_TIMEOUT, IDLE_DEFAULT, DaemonUnavailable, Opened, is_daemon, open_daemon
from .procs import kill_group, reap_group
from .protocol import ImportRequest, OtherRequest, RunReply, RunRequest, decode, encode

WORKER_START_TIMEOUT = 600.0
GRACE = 30.0  # seconds a run's reply may come after its timeout (the worker kills and reaps it first)
_INLINE_LIMIT = 16384  # bytes: longer import lists go through a file


class Worker:
    """The parent's handle on one warm fork worker: this session's own, or a connection to the daemon."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        preload: tuple[str, ...],
        daemon_folder: Path | None = None,
        idle: float = IDLE_DEFAULT,
    ) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.daemon: Opened | None = None
        if daemon_folder is not None:
            self.daemon = open_daemon(daemon_folder, env, preload, idle)  # DaemonUnavailable: the caller decides
            self.pid = self.daemon.pid
            self.log_path = self.daemon.place.log
            self._rfd = self.daemon.sock.fileno()
        else:
            self.log_path = log_path
            log = open(log_path, "ab")  # noqa: SIM115 - owned by the worker process
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pytest_repro._exec.worker", *preload],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                start_new_session=True,
            )
            log.close()
            assert self.proc.stdout is not None
            self.pid = self.proc.pid
            self._rfd = self.proc.stdout.fileno()
        self._closed = False
        self._buffer = b""
        self._ids = itertools.count(1)
        self._lists = 0
        self._replies: dict[int, RunReply] = {}
        self.ready = False
        self.served_before = 0  # runs the daemon had forked before this session connected
        self.stale = ""  # a daemon that greeted with "do not use me": which of its files changed
        self.requested: set[str] = set(preload)  # every entry it was asked to import
        self.failed: dict[str, str] = {}  # entry -> why importing it failed
        self.missing: set[str] = set()  # entries not installed
        self.tainted = ""  # why forking became unsafe, if it did
        self.culprit = ""  # the entry whose import made it unsafe

    def _read_line(self, deadline: float) -> dict[str, Any] | None:
        fd = self._rfd
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return None
            try:
                chunk = os.read(fd, 65536)
            except ConnectionError:
                chunk = b""
            if not chunk:
                raise EOFError("the worker daemon went away" if self.daemon else "worker exited")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return decode(line)

    def wait_ready(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """Wait for the worker's greeting (a daemon that is already running answers at once unless busy)."""
        deadline = time.monotonic() + timeout
        while not self.ready:
            msg = self._read_line(deadline)
            if msg is None:
                raise TimeoutError(f"the worker (pid {self.pid}) did not answer within {timeout:g} s")
            self._dispatch(msg)

    def _send(self, msg: RunRequest | ImportRequest | OtherRequest) -> None:
        data = encode(msg).encode()
        try:
            if self.daemon is not None:
                self.daemon.sock.sendall(data)
            else:
                assert self.proc is not None and self.proc.stdin is not None
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
        except (BrokenPipeError, ConnectionError) as exc:
            raise EOFError("the worker daemon went away" if self.daemon else "worker exited") from exc

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if msg.get("ready") or msg.get("op") == "import":  # a ReadyMessage or an ImportReply
            if msg.get("ready"):
                self.ready = True
                self.requested.update(msg.get("requested") or ())
                self.served_before = int(msg.get("served") or 0)
                self.stale = str(msg.get("stale") or "")
            self.failed.update(msg.get("errors") or {})
            self.missing.update(msg.get("missing") or ())
            if msg.get("tainted") and not self.tainted:
                self.tainted, self.culprit = str(msg["tainted"]), str(msg.get("culprit") or "")
        else:
            self._replies[int(msg.get("id", 0))] = msg  # type: ignore[assignment]  # a RunReply

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return not self._closed and self.daemon is not None and is_daemon(self.pid, self.daemon.place.key)

    def submit(self, spec: RunSpec, timeout: float, env: dict[str, str]) -> int:
        """Ask for one run; return its request id (the reply comes through wait)."""
        rid = next(self._ids)
        spec_dict = json.loads(spec.to_json())
        request: RunRequest = {"op": "run", "id": rid, "spec": spec_dict, "timeout": timeout, "env": env}
        if self.daemon is not None:
            request["cwd"] = os.getcwd()
            request["umask"] = _umask()
        self._send(request)
        return rid

    def retire(self) -> None:
        """Ask a daemon to take no new sessions (it ends once the current ones leave)."""
        self._send({"op": "retire"})

    def submit_import(self, entries: Sequence[str]) -> None:
        """Ask the worker to import more modules before the runs that follow."""
        self.requested.update(entries)
        msg: ImportRequest = {"op": "import", "modules": list(entries)}
        # A long list could fill the pipe while the worker is busy (a daemon's socket is read as it comes).
        if self.daemon is None and len(json.dumps(msg)) > _INLINE_LIMIT:
            self._lists += 1
            path = _log_dir() / f"import-{self.pid}-{id(self)}-{self._lists}.json"
            path.write_text(json.dumps(list(entries)), encoding="utf-8")
            msg = {"op": "import", "file": str(path)}
        self._send(msg)

    def drain(self, rids: Sequence[int], seconds: float = 2.0) -> dict[int, RunReply]:
        """After the worker went away: the replies to ``rids`` it sent before (nothing is lost that was said)."""
        deadline = time.monotonic() + seconds
        with contextlib.suppress(EOFError, OSError, ValueError):
            while any(rid not in self._replies for rid in rids):
                msg = self._read_line(deadline)
                if msg is None:
                    break
                self._dispatch(msg)
        return {rid: self._replies.pop(rid) for rid in rids if rid in self._replies}

    def wait(self, rids: Sequence[int], deadline: float) -> tuple[int, RunReply]:
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
        self._closed = True
        if self.daemon is not None:  # it stays for later sessions; runs this session left behind are killed
            with contextlib.suppress(OSError):
                self.daemon.sock.close()
            return
        # The worker holds nothing worth flushing (its children are already reaped), and a graceful
        # interpreter shutdown with torch loaded takes seconds: kill it.
        assert self.proc is not None
        if self.alive():
            kill_group(self.proc.pid)
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                with contextlib.suppress(OSError):
                    pipe.close()


def _umask() -> int:
    """This process's umask (read without changing it where /proc says)."""
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status", encoding="ascii") as fh:
        return int(next(line for line in fh if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class DaemonStale(DaemonUnavailable):
    """The daemon greeted with 'do not use me' (its imported files changed); it has retired."""


def read_tail(path: Path, limit: int = 4000) -> str:
    """The last ``limit`` characters of a log file ("" when unreadable)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return text[-limit:]


# Warm workers live for the whole process (closed at exit), keyed by their exact start-up environment
# and start-up preload list, so that several pytest sessions in one process (pytester) share them safely:
# jobs and test modules are only ever imported in the forked children, never in the worker itself.
_WORKERS: dict[tuple[Any, ...], Worker] = {}
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


def warm_worker(
    key: tuple[Any, ...],
    env: dict[str, str],
    preload: tuple[str, ...],
    daemon_folder: Path | None = None,
    idle: float = IDLE_DEFAULT,
) -> Worker:
    """The live worker of this process for ``key`` (its start-up environment and preload), started if need be.

    With ``daemon_folder``: a connection to the daemon there (started if need be); DaemonUnavailable when it
    cannot be had, or a running one does not greet within CONNECT_TIMEOUT.
    """
    key = (*key, str(daemon_folder or ""))
    worker = _WORKERS.get(key)
    if worker is not None and not worker.alive():
        forget(worker)
        worker = None
    if worker is None:
        log = _log_dir() / f"worker-{len(_WORKERS)}-{os.getpid()}.log"
        worker = Worker(env, log, preload, daemon_folder, idle)
        if worker.daemon is not None and not worker.daemon.started:
            try:
                worker.wait_ready()
            except EOFError:  # it closed the connection: it was retiring, ending idle, or died (a retry starts anew)
                worker.close()
                raise DaemonStale(f"the worker daemon pid {worker.pid} closed the connection before greeting") from None
            except (TimeoutError, OSError, ValueError) as exc:
                worker.close()
                why = f"the worker daemon pid {worker.pid} did not greet this session ({exc})"
                raise DaemonUnavailable(why) from None
            if worker.stale:
                worker.close()
                raise DaemonStale(f"retired the worker daemon pid {worker.pid}: {worker.stale}")
        _WORKERS[key] = worker
    return worker


def workers() -> list[Worker]:
    """Every worker of this process that is kept for reuse."""
    return list(_WORKERS.values())


def forget(worker: Worker) -> None:
    """Close a worker and never hand it out again."""
    worker.close()
    for key in [k for k, w in _WORKERS.items() if w is worker]:
        del _WORKERS[key]


# ---------------------------------------------------------------- spawned runs


@dataclass
class Spawned:
    """A spawned run in progress."""

    proc: subprocess.Popen[bytes]
    started: float
    deadline: float


def start_spawned(spec: RunSpec, env: dict[str, str], timeout: float) -> Spawned:
    """Start one run in a fresh interpreter (``python -m pytest_repro._exec.child SPEC.json``)."""
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
    return Spawned(proc, started, time.monotonic() + timeout)


def finish_spawned(run: Spawned, now: float) -> RunReply | None:
    """How a spawned run ended (killing it first when past its deadline), or None while it runs."""
    code = run.proc.poll()
    if code is None:
        if now < run.deadline:
            return None
        kill_group(run.proc.pid)
        run.proc.wait()
        return {"status": "timeout", "wall_s": time.perf_counter() - run.started}
    wall = time.perf_counter() - run.started
    orphans = reap_group(run.proc.pid)
    if code < 0:
        return {"status": "signaled", "signal": -code, "wall_s": wall, "orphans": orphans}
    return {"status": "exited", "returncode": code, "wall_s": wall, "orphans": orphans}


def stop_spawned(run: Spawned) -> None:
    """Kill a spawned run and its process group, and wait for it."""
    kill_group(run.proc.pid)
    run.proc.wait()
