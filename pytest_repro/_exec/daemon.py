"""The warm worker daemon from the pytest process's (and the CLI's) side: its key, its files, start, connect, stop.

A daemon outlives the session that started it, so that later sessions fork runs from it without paying the
third-party imports again. One lives per project cache folder (``.pytest_cache/d/repro-worker``, owner-only)
and per key: the interpreter, the venv, a digest of the installed distributions and of pytest-repro itself,
and the environment variables read while importing. Files per key: ``<key>.sock`` (the Unix socket; under a
private folder in the temp dir when that path is too long for a socket), ``<key>.json`` (pid, key and what
went into it), ``<key>.log`` (the daemon's log), ``<key>.lock`` (taken while connecting or starting it).

The session creates the listening socket itself (mode 0600) and hands it to the daemon, so that a second
session never sees a half-started daemon; a daemon whose packages or code are out of date is retired.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .daemon_files import flocked, peer_uid
from .daemon_key import Identity, identity
from .protocol import StatusReply, decode, encode

DIR_NAME = "repro-worker"  # under pytest's cache (cache.mkdir)
IDLE_DEFAULT = 1800.0
CONNECT_TIMEOUT = 300.0  # seconds a daemon (still importing, or busy) may take to greet a session
_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes on Linux


class DaemonUnavailable(RuntimeError):
    """The daemon cannot be used here (the session uses a worker of its own instead and says why)."""


# ---------------------------------------------------------------- files


def _private_dir(path: Path) -> Path:
    """Create ``path`` owner-only (0700), or raise DaemonUnavailable when it is someone else's or open to others."""
    try:
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700, parents=True)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.chmod(path, 0o700)
            st = os.lstat(path)
    except OSError as exc:
        raise DaemonUnavailable(f"cannot use {path} ({exc.strerror or exc})") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise DaemonUnavailable(f"{path} is not a folder only this user can open")
    return path


@dataclass(frozen=True)
class Place:
    """The files of one daemon."""

    folder: Path
    key: str

    @property
    def state(self) -> Path:
        return self.folder / f"{self.key}.json"

    @property
    def log(self) -> Path:
        return self.folder / f"{self.key}.log"

    @property
    def lock(self) -> Path:
        return self.folder / f"{self.key}.lock"

    @property
    def socket(self) -> Path:
        path = self.folder / f"{self.key}.sock"
        if len(os.fsencode(path)) <= _SOCKET_PATH_MAX:
            return path
        # Too long for a socket address: a private folder in the temp dir, named by the project folder too.
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:20]
        return Path(tempfile.gettempdir()) / f"pytest-repro-{os.getuid()}" / f"{digest}.sock"


def read_state(path: Path) -> dict[str, Any] | None:
    """A daemon's state file (None when absent or not one of ours)."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("pid"), int) or not isinstance(state.get("key"), str):
        return None
    return state


def _write_state(place: Place, state: dict[str, Any]) -> None:
    tmp = place.state.with_name(f".{place.state.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
    os.replace(tmp, place.state)


_SPAWNED: set[int] = set()  # daemons this process started (only those may be reaped here)


def _locked(place: Place) -> contextlib.AbstractContextManager[None]:
    return flocked(place.lock)


def is_daemon(pid: int, key: str | None = None) -> bool:
    """Whether ``pid`` is a live worker daemon of this user (with ``key``): not a zombie, not a reused pid."""
    if pid in _SPAWNED:
        with contextlib.suppress(ChildProcessError, OSError):
            if os.waitpid(pid, os.WNOHANG)[0]:  # our child, and it has ended
                _SPAWNED.discard(pid)
                return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            if fh.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return False
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        ours = os.stat(f"/proc/{pid}").st_uid == os.getuid()
    except (OSError, IndexError):
        return False
    daemon = b"pytest_repro._exec.worker" in args and b"--listen-fd" in args
    return ours and daemon and (key is None or key.encode() in args)


# ---------------------------------------------------------------- talking to one


def _connect(path: Path, timeout: float = 5.0) -> socket.socket | None:
    """A connection to the daemon at ``path`` (None: nobody listens there, or it is not this user's)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    if peer_uid(sock) != os.getuid():  # the session's environment goes to it: never to another user (or unknown)
        sock.close()
        return None
    sock.settimeout(None)
    return sock


def _socket_of(place: Place, state: Mapping[str, Any]) -> Path:
    """Where a running daemon listens: its state file says (this session's temp dir may differ), if it is ours."""
    recorded = state.get("socket")
    if isinstance(recorded, str):
        path = Path(recorded)
        try:
            st, folder = os.lstat(path), os.lstat(path.parent)
        except OSError:
            return place.socket
        if stat.S_ISSOCK(st.st_mode) and st.st_uid == folder.st_uid == os.getuid() and not folder.st_mode & 0o077:
            return path
    return place.socket


def ask(place: Place, op: str, state: Mapping[str, Any], timeout: float = 5.0) -> StatusReply | None:
    """Send one request (status, retire, exit) to a daemon; its status reply, or None (no answer expected/got)."""
    sock = _connect(_socket_of(place, state), timeout)
    if sock is None:
        return None
    with sock:
        sock.settimeout(timeout)
        try:
            buffer = b""
            while b"\n" not in buffer:  # the greeting first
                chunk = sock.recv(1 << 16)
                if not chunk:
                    return None
                buffer += chunk
            buffer = buffer.partition(b"\n")[2]
            sock.sendall(encode({"op": op}).encode())
            if op != "status":
                return None
            while b"\n" not in buffer:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    return None
                buffer += chunk
        except OSError:
            return None
        reply = decode(buffer.partition(b"\n")[0])
    return reply if reply.get("op") == "status" else None  # type: ignore[return-value]


def _bind(path: Path) -> socket.socket:
    """A listening socket at ``path``, owner-only from the start (umask), replacing a stale one."""
    _private_dir(path.parent)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(64)
    return sock


def _spawn(place: Place, listener: socket.socket, env: Mapping[str, str], preload: Sequence[str], idle: float) -> int:
    """Start the daemon on ``listener`` in a session of its own (it outlives this process); return its pid."""
    argv = [
        sys.executable,
        "-m",
        "pytest_repro._exec.worker",
        "--listen-fd",
        "3",
        "--idle",
        f"{idle:g}",
        "--key",
        place.key,
        "--socket",
        str(place.socket),
        "--state",
        str(place.state),
        "--lock",
        str(place.lock),
        "--",
        *preload,
    ]
    log = os.open(place.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, log, 1),
            (os.POSIX_SPAWN_DUP2, log, 2),
            (os.POSIX_SPAWN_DUP2, listener.fileno(), 3),
        ]
        # posix_spawn, not subprocess: nothing waits for the daemon, and it must not be a Popen left running.
        pid = os.posix_spawn(sys.executable, argv, dict(env), file_actions=actions, setsid=True)
        _SPAWNED.add(pid)
        return pid
    finally:
        os.close(log)


@dataclass
class Opened:
    """A session's connection to a daemon, and how it came about (for the session's one line)."""

    sock: socket.socket
    pid: int
    place: Place
    started: bool  # this session started it
    retired: list[str]  # lines about out-of-date daemons retired on the way


def retire_stale(folder: Path, me: Identity) -> list[str]:
    """Retire daemons of this interpreter and venv whose packages or pytest-repro are out of date; say which."""
    lines = []
    for path in sorted(folder.glob("*.json")):
        state = read_state(path)
        if state is None or state["key"] == me.key:
            continue
        if state.get("python") != me.python or state.get("prefix") != me.prefix:
            continue  # another interpreter or venv: its own daemon
        why = [
            what
            for what, field, now in (("installed packages", "packages", me.packages), ("pytest-repro", "own", me.own))
            if state.get(field) != now
        ]
        if not why:
            continue  # other import-time variables (e.g. deterministic vs default mode): both stay
        place = Place(folder, state["key"])
        if is_daemon(int(state["pid"]), state["key"]):
            ask(place, "retire", state)  # it removes its own files
            lines.append(
                f"retired the worker daemon pid {state['pid']}: the {' and '.join(why)} changed since it started "
                "(it ends once its current sessions do)"
            )
        else:
            with _locked(place):
                if read_state(place.state) == state:
                    for stale in (place.state, place.socket):
                        with contextlib.suppress(OSError):
                            stale.unlink()
    return lines


def open_daemon(folder: Path, env: Mapping[str, str], preload: Sequence[str], idle: float = IDLE_DEFAULT) -> Opened:
    """Connect to this environment's daemon under ``folder``, starting it when none is running."""
    if not hasattr(os, "posix_spawn") or not hasattr(socket, "AF_UNIX"):
        raise DaemonUnavailable("this platform has no Unix sockets or posix_spawn")
    folder = _private_dir(folder)
    me = identity(env, preload)
    place = Place(folder, me.key)
    retired = retire_stale(folder, me)
    with _locked(place):
        state = read_state(place.state)
        if state is not None and is_daemon(int(state["pid"]), me.key):
            sock = _connect(_socket_of(place, state))
            if sock is None:  # never a second daemon beside a live one
                raise DaemonUnavailable(f"the worker daemon pid {state['pid']} does not accept connections")
            return Opened(sock, int(state["pid"]), place, False, retired)
        listener = _bind(place.socket)
        try:
            pid = _spawn(place, listener, env, preload, idle)
        finally:
            listener.close()
        _write_state(
            place,
            {
                "pid": pid,
                "key": me.key,
                "python": me.python,
                "prefix": me.prefix,
                "packages": me.packages,
                "own": me.own,
                "socket": str(place.socket),
                "log": str(place.log),
                "started": time.time(),
                "idle_s": idle,
                "cwd": os.getcwd(),
            },
        )
        sock = _connect(place.socket)
        if sock is None:
            raise DaemonUnavailable(f"the daemon it started (pid {pid}) does not accept connections")
        return Opened(sock, pid, place, True, retired)


def daemons(folder: Path) -> list[tuple[Place, dict[str, Any], StatusReply | None]]:
    """Every daemon with a state file under ``folder``: its files, its state, and its live status (None: gone)."""
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        state = read_state(path)
        if state is None:
            continue
        place = Place(folder, state["key"])
        alive = is_daemon(int(state["pid"]), state["key"])
        out.append((place, state, ask(place, "status", state) if alive else None))
    return out


def stop(place: Place, state: Mapping[str, Any], grace: float = 5.0) -> bool:
    """Stop a daemon (its running runs are killed) and remove its files; whether it was running."""
    pid, key = int(state["pid"]), str(state["key"])
    running = is_daemon(pid, key)
    if running:
        ask(place, "exit", state)
        deadline = time.monotonic() + grace
        while is_daemon(pid, key) and time.monotonic() < deadline:
            time.sleep(0.05)
        if is_daemon(pid, key):
            from .procs import kill_group

            kill_group(pid)
    with _locked(place):
        if read_state(place.state) == state:
            for path in (place.state, _socket_of(place, state)):
                with contextlib.suppress(OSError):
                    path.unlink()
    return running
