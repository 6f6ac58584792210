"""The warm fork worker's own loop: runs in the worker process, started as ``python -m pytest_repro._exec.worker``.

It imports the heavy libraries once (never touching CUDA) and forks one child per run, so every run starts
from the same clean, just-imported state without paying the imports again. What it imports grows while it
lives (import requests). It forks several children at a time when asked. Messages: see ``protocol``.

Like pytest-xdist's remote side, this module imports nothing of the package but ``pytest_repro.context``
and, from ``_exec``, ``child``, ``procs`` and ``protocol`` (the job process's side, which may add
``record`` and ``seeding``), and the stdlib: grep its imports to check. The pytest process never imports it.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import json
import os
import select
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..context import RunSpec
from .child import execute
from .procs import die_with_parent, kill_group, reap_group
from .protocol import ImportReply, PreloadResult, ReadyMessage, RunReply, decode, encode


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


def _preload(entries: Sequence[str], checked: bool = False) -> PreloadResult:
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


def _preload_logged(entries: Sequence[str], when: str) -> PreloadResult:
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


def _reap(child: _Child, now: float) -> RunReply | None:
    """The reply for a child that has ended (killing it first when past its deadline), or None while it runs."""
    done, status = os.waitpid(child.pid, os.WNOHANG)
    reply: RunReply
    if done:
        orphans = reap_group(child.pid)
        if os.WIFSIGNALED(status):
            reply = {"status": "signaled", "signal": os.WTERMSIG(status), "orphans": orphans}
        else:
            reply = {"status": "exited", "returncode": os.WEXITSTATUS(status), "orphans": orphans}
    elif now >= child.deadline:
        kill_group(child.pid)
        os.waitpid(child.pid, 0)
        reply = {"status": "timeout"}
    else:
        return None
    child.close()
    reply.update(
        {"id": child.rid, "wall_s": time.perf_counter() - child.started, "preload_errors": child.preload_errors}
    )
    return reply


def _fork_run(request: dict[str, Any], proto: IO[str], children: dict[int, _Child]) -> _Child | RunReply:
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
            die_with_parent()
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

    def send(msg: ReadyMessage | ImportReply | RunReply) -> None:
        proto.write(encode(msg))
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
            request = decode(line)
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
                if isinstance(forked, _Child):
                    children[forked.pid] = forked
                else:
                    send(forked)
    for child in children.values():
        kill_group(child.pid)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child.pid, 0)


def main(argv: list[str]) -> int:
    """Entry point of the warm worker: ``python -m pytest_repro._exec.worker [MODULE...]``."""
    worker_main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
