"""The warm worker's server, in the worker process: its sessions, its forked runs, what it imported, when it ends.

``Server`` serves one session on stdin/stdout or, as the daemon, many on a Unix socket: it reads requests,
imports what it is asked to, forks one child per run (several at a time), reaps them (killing a run past its
deadline, or one whose session left) and replies in the ``protocol``. Entry points: ``worker``.

Like the rest of the worker process, it imports nothing of the package but ``pytest_repro.context`` and,
from ``_exec``, what the job process's side needs (``child``) and the worker's own helpers.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..context import RunSpec
from .child import execute
from .daemon_files import Files, Sources, peer_uid
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


SEND_TIMEOUT = 30.0  # seconds a daemon waits for a session to take a reply before it drops that session


@dataclass
class Conn:
    """One session's channel: stdin/stdout of the per-session worker, or a socket connection to the daemon."""

    rfd: int
    wfd: int
    sock: socket.socket | None = None
    buffer: bytes = b""
    session: bool = False  # it asked for runs or imports (not only for the status)

    def send(self, msg: ReadyMessage | ImportReply | RunReply | StatusReply) -> bool:
        """Write one message; False when the session is gone (or, on a socket, does not read for SEND_TIMEOUT)."""
        data = encode(msg).encode()
        try:
            if self.sock is not None:
                self.sock.sendall(data)
            else:
                while data:
                    data = data[os.write(self.wfd, data) :]
        except OSError:
            return False
        return True

    def recv(self) -> bytes | None:
        """What the session sent (b"": it is gone; None: nothing after all)."""
        try:
            return self.sock.recv(1 << 16) if self.sock is not None else os.read(self.rfd, 1 << 16)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return None
        except OSError:
            return b""

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


class Server:
    """The worker's state: its sessions, its running children, what it imported, and why it ends."""

    def __init__(self, listener: socket.socket | None, idle: float, key: str, files: Files | None) -> None:
        self.listener = listener
        self.idle = idle
        self.key = key
        self.files = files  # a daemon's socket, state file and lock
        self.sources = Sources()
        self.conns: dict[int, Conn] = {}
        self.children: dict[int, _Child] = {}
        self.state: PreloadResult = {"errors": {}, "missing": [], "tainted": "", "culprit": ""}
        self.requested: list[str] = []
        self.started = time.time()
        self.last_active = time.monotonic()
        self.served = 0
        self.sessions = 0
        self.running = True
        self.retired = False
        self.path0 = sys.path[0] if sys.path else ""  # the start-up folder `python -m` put first

    def absorb(self, entries: Sequence[str], result: PreloadResult) -> None:
        """Remember what an import request asked for and what came of it (told to every later session)."""
        self.requested += [e for e in entries if e not in self.requested]
        self.state["errors"].update(result["errors"])
        self.state["missing"] += [m for m in result["missing"] if m not in self.state["missing"]]
        if result["tainted"] and not self.state["tainted"]:
            self.state["tainted"], self.state["culprit"] = result["tainted"], result["culprit"]
        if self.files is not None:
            self.sources.note()

    def ready(self, stale: str = "") -> ReadyMessage:
        msg: ReadyMessage = {
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
        if stale:
            msg["stale"] = stale
        return msg

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
            "retired": self.retired,
        }

    # ------------------------------------------------------------ requests

    def fork_run(self, request: dict[str, Any], conn: Conn) -> _Child | RunReply:
        """Fork a child for one run request (the child never returns); or say why forking is unsafe."""
        rid = int(request.get("id", 0))
        spec = RunSpec.from_dict(request["spec"])
        timeout = float(request["timeout"])  # before forking: a bad request must not leave a child behind
        # A daemon imports only what sessions ask for (third-party packages); a job's own preload list may
        # name the user's code, which must not outlive the session: the run imports it itself.
        errors = preload(spec.job.preload)["errors"] if self.files is None else {}
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
                self._as_the_session(request)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                code = execute(spec)
            finally:
                os._exit(code)
        self.served += 1
        pidfd = None
        with contextlib.suppress(OSError, AttributeError):
            pidfd = os.pidfd_open(pid)  # readable when the child exits: no polling
        deadline = time.monotonic() + timeout
        return _Child(rid, pid, conn.rfd, started, deadline, pidfd, errors)

    def _as_the_session(self, request: dict[str, Any]) -> None:
        """In a daemon's child: what a worker started by this session would have had (folder, umask, temp dir)."""
        if request.get("cwd") and sys.path and sys.path[0] == self.path0:
            sys.path[0] = str(request["cwd"])
        if isinstance(request.get("umask"), int):
            os.umask(int(request["umask"]))
        import tempfile

        tempfile.tempdir = None  # chosen again from this run's TMPDIR, not the daemon's

    def _close_inherited(self) -> None:
        """In a forked child: close the worker's sockets, pipes and pidfds (the job must not hold them)."""
        for other in self.children.values():
            other.close()
        for conn in self.conns.values():
            conn.close()
        if self.listener is not None:
            self.listener.close()

    def handle(self, conn: Conn, request: dict[str, Any]) -> None:
        op = request.get("op", "run")
        if op in ("run", "import") and not conn.session:
            conn.session = True
            self.sessions += 1
        if op == "exit":
            self.running = False
        elif op == "retire":
            self.retire("asked to")
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

    def _failed(self, conn: Conn, request: dict[str, Any], exc: BaseException) -> None:
        """A request the worker could not carry out: the session still gets an answer (a run: spawn it instead)."""
        log(f"a {request.get('op', 'run')} request failed: {type(exc).__name__}: {exc}")
        if request.get("op", "run") == "run":
            rid = request.get("id")
            if not isinstance(rid, int):
                self._drop_conn(conn)  # no id to answer to: not a session of ours
                return
            conn.send({"id": rid, "status": "unforkable", "detail": f"the worker failed: {exc}"})
        elif request.get("op") == "import":
            conn.send({"op": "import", "errors": {}, "missing": [], "tainted": "", "culprit": ""})

    def retire(self, why: str) -> None:
        """Take no new sessions (a newer daemon replaces this one); end once the last session leaves.

        Sessions already waiting in the backlog are greeted with "do not use me" (they start a new daemon).
        """
        if self.listener is not None and self.files is not None:
            log(f"retired ({why}): no new sessions; ending when the last one leaves")
            with self.files.locked():
                while select.select([self.listener], [], [], 0)[0]:
                    try:
                        sock, _ = self.listener.accept()
                    except OSError:
                        break
                    with sock:
                        sock.settimeout(SEND_TIMEOUT)
                        with contextlib.suppress(OSError):
                            sock.sendall(encode(self.ready(f"the daemon retired: {why}")).encode())
                self.listener.close()
                self.listener = None
                self.files.remove()
            self.retired = True

    # ------------------------------------------------------------ the loop

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        uid = peer_uid(sock)
        if uid is not None and uid != os.getuid():
            log(f"refused a connection from uid {uid}")
            sock.close()
            return
        sock.settimeout(SEND_TIMEOUT)
        conn = Conn(sock.fileno(), sock.fileno(), sock)
        self.conns[conn.rfd] = conn
        stale = self.sources.changed()
        if stale:  # forked runs would use the old code: greet with that, and let a new daemon take over
            self.retire(f"{stale} changed since it was imported")
            stale = f"{stale} changed since the daemon imported it"
        if not conn.send(self.ready(stale)):
            self._drop_conn(conn)

    def _drop_conn(self, conn: Conn) -> None:
        """A session left: kill the runs it was waiting for (nobody will read their results)."""
        self.conns.pop(conn.rfd, None)
        conn.close()
        for pid, child in list(self.children.items()):
            if child.conn == conn.rfd:
                kill_group(pid)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                child.close()
                del self.children[pid]
        self.last_active = time.monotonic()

    def _read(self, conn: Conn) -> None:
        chunk = conn.recv()
        if chunk is None:
            return
        if not chunk:
            self._drop_conn(conn)
            return
        conn.buffer += chunk
        while self.running and self.conns.get(conn.rfd) is conn and b"\n" in conn.buffer:
            line, _, conn.buffer = conn.buffer.partition(b"\n")
            try:
                request = decode(line)
            except ValueError:
                log("dropped a session that sent a line that is not a protocol message")
                self._drop_conn(conn)
                return
            try:
                self.handle(conn, request)
            except Exception as exc:  # one bad request must not end a worker other sessions use
                self._failed(conn, request, exc)

    def _timeout(self) -> float | None:
        timeout: float | None = None
        if self.children:
            timeout = max(0.0, min(c.deadline for c in self.children.values()) - time.monotonic())
            if any(c.pidfd is None for c in self.children.values()):
                timeout = min(timeout, 0.005)  # no pidfd (old kernel): poll
        elif self.idle > 0 and not self.conns and self.listener is not None:
            timeout = max(0.0, self.last_active + self.idle - time.monotonic())
        return timeout

    def _ends_idle(self) -> bool:
        """Idle long enough: end, unless a session connected meanwhile (checked under the sessions' lock)."""
        if self.listener is None or self.files is None:
            return True
        with self.files.locked():
            waiting, _, _ = select.select([self.listener], [], [], 0)
            if waiting:
                return False
            self.listener.close()
            self.listener = None
            self.files.remove()
        log(f"idle for {self.idle:g} s: exiting")
        return True

    def loop(self) -> None:
        """Serve until told to exit, the last pipe closes, the idle time runs out, or a retired daemon empties."""
        try:
            self._serve()
        finally:
            for child in self.children.values():
                kill_group(child.pid)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(child.pid, 0)
            for conn in list(self.conns.values()):
                conn.close()
            if self.files is not None:
                with self.files.locked():
                    self.files.remove()

    def _serve(self) -> None:
        while self.running:
            if not self.conns and not self.children:
                if self.listener is None:
                    break  # the session's pipe closed, or a retired daemon's last session left
                idle = self.idle > 0 and time.monotonic() - self.last_active >= self.idle
                if idle and self._ends_idle():
                    break
            conns = dict(self.conns)  # which session each fd belonged to when select answered
            fds = [*conns, *(c.pidfd for c in self.children.values() if c.pidfd is not None)]
            listener = self.listener
            if listener is not None:
                fds.append(listener.fileno())
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
            if listener is not None and listener is self.listener and listener.fileno() in readable:
                self._accept()
            for fd in readable:
                conn = conns.get(fd)
                if conn is not None and self.conns.get(fd) is conn:  # not a new session given a freed fd number
                    self._read(conn)
