"""The warm fork worker's own loop: runs in the worker process, started as ``python -m pytest_repro._exec.worker``.

It imports the heavy libraries once (never touching CUDA) and forks one child per run, so every run starts
from the same clean, just-imported state without paying the imports again. What it imports grows while it
lives (import requests). It forks several children at a time when asked. Messages: see ``protocol``.

Two ways to serve: one session on stdin/stdout (ends with it), or, as the daemon (``--listen-fd``), every
session of the same user, interpreter and installed packages on a Unix socket the session created (owner-only;
peers of another uid are refused); the daemon ends after ``--idle`` seconds without sessions or runs, on a
``stop`` request (its runs killed), or once retired (no new sessions; it ends when its last one leaves).

Like pytest-xdist's remote side, this module imports nothing of the package but ``pytest_repro.context``
and, from ``_exec``, ``child``, ``preimport``, ``procs`` and ``protocol`` (the job process's side, which may add
``record`` and ``seeding``), and the stdlib: grep its imports to check. The pytest process never imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..context import RunSpec
from .child import execute
from .preimport import cuda_initialised, log, preload, preload_logged
from .procs import die_with_parent, kill_group, reap_group
from .protocol import ImportReply, PreloadResult, ReadyMessage, RunReply, StatusReply, decode, encode


@dataclass
class _Child:
    """A forked run the worker is waiting for."""

    rid: int
    pid: int
    conn: int  # the connection that asked for it (its read fd)
    started: float
    deadline: float
    pidfd: int | None
    preload_errors: dict[str, str]

    def close(self) -> None:
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = None


@dataclass
class _Conn:
    """One session's channel: stdin/stdout of the per-session worker, or a socket connection to the daemon."""

    rfd: int
    wfd: int
    sock: socket.socket | None = None
    buffer: bytes = b""
    session: bool = False  # it asked for runs or imports (not only for the status)

    def send(self, msg: ReadyMessage | ImportReply | RunReply | StatusReply) -> bool:
        """Write one message; False when the session is gone."""
        data = encode(msg).encode()
        try:
            while data:
                data = data[os.write(self.wfd, data) :]
        except OSError:
            return False
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.sock is not None:
                self.sock.close()
            else:
                os.close(self.rfd)
                os.close(self.wfd)


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


def _peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (None where the platform does not say)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    return int(struct.unpack("3i", creds)[1])


class _Server:
    """The worker's state: its sessions, its running children, what it imported, and why it ends."""

    def __init__(self, listener: socket.socket | None, idle: float, key: str, files: Sequence[str]) -> None:
        self.listener = listener
        self.idle = idle
        self.key = key
        self.files = [Path(f) for f in files]  # the daemon's socket and state files: removed when it ends
        self.conns: dict[int, _Conn] = {}
        self.children: dict[int, _Child] = {}
        self.state: PreloadResult = {"errors": {}, "missing": [], "tainted": "", "culprit": ""}
        self.requested: list[str] = []
        self.started = time.time()
        self.last_active = time.monotonic()
        self.served = 0
        self.sessions = 0
        self.running = True
        self.path0 = sys.path[0] if sys.path else ""  # the start-up folder `python -m` put first

    def absorb(self, entries: Sequence[str], result: PreloadResult) -> None:
        """Remember what an import request asked for and what came of it (told to every later session)."""
        self.requested += [e for e in entries if e not in self.requested]
        self.state["errors"].update(result["errors"])
        self.state["missing"] += [m for m in result["missing"] if m not in self.state["missing"]]
        if result["tainted"] and not self.state["tainted"]:
            self.state["tainted"], self.state["culprit"] = result["tainted"], result["culprit"]

    def ready(self) -> ReadyMessage:
        return {
            "ready": True,
            "pid": os.getpid(),
            "errors": dict(self.state["errors"]),
            "missing": list(self.state["missing"]),
            "tainted": self.state["tainted"],
            "culprit": self.state["culprit"],
            "requested": list(self.requested),
            "served": self.served,
            "started": self.started,
        }

    def status(self) -> StatusReply:
        return {
            "op": "status",
            "pid": os.getpid(),
            "key": self.key,
            "python": sys.executable,
            "started": self.started,
            "idle_s": self.idle,
            "idle_for_s": time.monotonic() - self.last_active if not (self.conns or self.children) else 0.0,
            "sessions": sum(c.session for c in self.conns.values()),
            "sessions_served": self.sessions,
            "running": len(self.children),
            "served": self.served,
            "modules": len(sys.modules),
            "retired": self.listener is None and bool(self.files),
        }

    # ------------------------------------------------------------ requests

    def fork_run(self, request: dict[str, Any], conn: _Conn) -> _Child | RunReply:
        """Fork a child for one run request (the child never returns); or say why forking is unsafe."""
        rid = int(request.get("id", 0))
        spec = RunSpec.from_dict(request["spec"])
        errors = preload(spec.job.preload)["errors"]
        if cuda_initialised():
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
                self._close_inherited()
                os.environ.clear()
                os.environ.update(request["env"])
                # As a worker started in the session's folder would have it (the daemon started elsewhere).
                if request.get("cwd") and sys.path and sys.path[0] == self.path0:
                    sys.path[0] = str(request["cwd"])
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                code = execute(spec)
            finally:
                os._exit(code)
        self.served += 1
        pidfd = None
        with contextlib.suppress(OSError, AttributeError):
            pidfd = os.pidfd_open(pid)  # readable when the child exits: no polling
        deadline = time.monotonic() + float(request["timeout"])
        return _Child(rid, pid, conn.rfd, started, deadline, pidfd, errors)

    def _close_inherited(self) -> None:
        """In a forked child: close the worker's sockets, pipes and pidfds (the job must not hold them)."""
        for other in self.children.values():
            other.close()
        for conn in self.conns.values():
            conn.close()
        if self.listener is not None:
            self.listener.close()

    def handle(self, conn: _Conn, request: dict[str, Any]) -> None:
        op = request.get("op", "run")
        if op in ("run", "import") and not conn.session:
            conn.session = True
            self.sessions += 1
        if op == "exit":
            self.running = False
        elif op == "retire":
            self.retire()
        elif op == "status":
            conn.send(self.status())
        elif op == "import":
            entries = request.get("modules")
            if entries is None:
                entries = json.loads(Path(request["file"]).read_text(encoding="utf-8"))
            result = preload_logged(entries, "on request")
            self.absorb(entries, result)
            conn.send({"op": "import", **result})
        else:
            forked = self.fork_run(request, conn)
            if isinstance(forked, _Child):
                self.children[forked.pid] = forked
            else:
                conn.send(forked)

    def retire(self) -> None:
        """Take no new sessions (a newer daemon replaces this one); end once the last session leaves."""
        if self.listener is not None:
            log("retired: no new sessions; ending when the last one leaves")
            self.listener.close()
            self.listener = None
            self.remove_files()

    def remove_files(self) -> None:
        """Remove the socket and state file, unless a newer daemon has taken them over."""
        state = next((f for f in self.files if f.suffix == ".json"), None)
        try:
            owner = json.loads(state.read_text(encoding="utf-8")).get("pid") if state is not None else None
        except (OSError, ValueError, AttributeError):
            owner = None
        if owner == os.getpid():
            for path in self.files:
                with contextlib.suppress(OSError):
                    path.unlink()
        self.files = []

    # ------------------------------------------------------------ the loop

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        uid = _peer_uid(sock)
        if uid is not None and uid != os.getuid():
            log(f"refused a connection from uid {uid}")
            sock.close()
            return
        sock.setblocking(True)
        conn = _Conn(sock.fileno(), sock.fileno(), sock)
        self.conns[conn.rfd] = conn
        conn.send(self.ready())

    def _drop_conn(self, conn: _Conn) -> None:
        """A session left: kill the runs it was waiting for (nobody will read their results)."""
        del self.conns[conn.rfd]
        conn.close()
        for pid, child in list(self.children.items()):
            if child.conn == conn.rfd:
                kill_group(pid)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                child.close()
                del self.children[pid]
        self.last_active = time.monotonic()

    def _read(self, conn: _Conn) -> None:
        try:
            chunk = os.read(conn.rfd, 1 << 16)
        except OSError:
            chunk = b""
        if not chunk:
            self._drop_conn(conn)
            return
        conn.buffer += chunk
        while self.running and conn.rfd in self.conns and b"\n" in conn.buffer:
            line, _, conn.buffer = conn.buffer.partition(b"\n")
            self.handle(conn, decode(line))

    def _timeout(self) -> float | None:
        timeout: float | None = None
        if self.children:
            timeout = max(0.0, min(c.deadline for c in self.children.values()) - time.monotonic())
            if any(c.pidfd is None for c in self.children.values()):
                timeout = min(timeout, 0.005)  # no pidfd (old kernel): poll
        elif self.idle > 0 and not self.conns and self.listener is not None:
            timeout = max(0.0, self.last_active + self.idle - time.monotonic())
        return timeout

    def loop(self) -> None:
        """Serve until told to exit, the last pipe closes, the idle time runs out, or a retired daemon empties."""
        while self.running:
            if not self.conns and not self.children:
                if self.listener is None:
                    break  # the session's pipe closed, or a retired daemon's last session left
                if self.idle > 0 and time.monotonic() - self.last_active >= self.idle:
                    log(f"idle for {self.idle:g} s: exiting")
                    break
            fds = [*self.conns, *(c.pidfd for c in self.children.values() if c.pidfd is not None)]
            if self.listener is not None:
                fds.append(self.listener.fileno())
            readable, _, _ = select.select(fds, [], [], self._timeout())
            now = time.monotonic()
            for pid in list(self.children):
                reply = _reap(self.children[pid], now)
                if reply is not None:
                    child = self.children.pop(pid)
                    owner = self.conns.get(child.conn)
                    if owner is not None and not owner.send(reply):
                        self._drop_conn(owner)
                    self.last_active = now
            if self.listener is not None and self.listener.fileno() in readable:
                self._accept()
            for fd in readable:
                if fd in self.conns:
                    self._read(self.conns[fd])
        for child in self.children.values():
            kill_group(child.pid)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child.pid, 0)
        for conn in list(self.conns.values()):
            conn.close()
        self.remove_files()


def worker_main(modules: list[str]) -> None:
    """Serve one session on stdin: import once, fork fresh children for runs (several at a time), reply on stdout."""
    proto_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints from imports must not corrupt the protocol
    server = _Server(None, 0.0, "", ())
    conn = _Conn(0, proto_fd)
    server.conns[0] = conn
    server.absorb(modules, preload_logged(modules, "at start"))
    conn.send(server.ready())
    server.loop()


def daemon_main(listen_fd: int, idle: float, key: str, files: Sequence[str], modules: list[str]) -> None:
    """Serve every session of this user and environment on the inherited listening socket until idle or stopped."""
    listener = socket.socket(fileno=listen_fd)
    listener.setblocking(False)
    server = _Server(listener, idle, key, files)
    log(f"daemon started (key {key}, idle timeout {idle:g} s, {sys.executable})")
    # Sessions that connect now wait in the socket's backlog until the start-up imports are done.
    server.absorb(modules, preload_logged(modules, "at start"))
    server.loop()
    log(f"daemon exiting after {server.served} run(s) for {server.sessions} session(s)")


def main(argv: list[str]) -> int:
    """Entry point: ``python -m pytest_repro._exec.worker [--listen-fd N --idle S ...] [MODULE...]``."""
    parser = argparse.ArgumentParser(prog="pytest_repro._exec.worker")
    parser.add_argument("--listen-fd", type=int)
    parser.add_argument("--idle", type=float, default=1800.0)
    parser.add_argument("--key", default="")
    parser.add_argument("--file", action="append", default=[], help="removed when the daemon ends")
    parser.add_argument("modules", nargs="*")
    args = parser.parse_args(argv)
    if args.listen_fd is None:
        worker_main(args.modules)
    else:
        daemon_main(args.listen_fd, args.idle, args.key, args.file, args.modules)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
