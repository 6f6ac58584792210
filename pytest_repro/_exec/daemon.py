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
import fcntl
import hashlib
import json
import os
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .protocol import StatusReply, decode, encode

DIR_NAME = "repro-worker"  # under pytest's cache (cache.mkdir)
IDLE_DEFAULT = 1800.0
CONNECT_TIMEOUT = 30.0  # seconds a running daemon may take to greet a session before the session goes without
_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes on Linux
# Environment variables that may change what importing torch & co. does (read at import, not per run).
_IMPORT_ENV_PREFIXES = (
    "ATEN_",
    "CUBLAS_",
    "CUDA_",
    "HF_",
    "KMP_",
    "LD_",
    "MKL_",
    "NCCL_",
    "NVIDIA_",
    "OMP_",
    "OPENBLAS_",
    "PYTHON",
    "PYTORCH_",
    "TOKENIZERS_",
    "TORCH",
    "TRANSFORMERS_",
    "XLA_",
)
_VOLATILE = ("PYTHONBREAKPOINT",)


class DaemonUnavailable(RuntimeError):
    """The daemon cannot be used here (the session uses a worker of its own instead and says why)."""


# ---------------------------------------------------------------- the key


def _site_dirs() -> list[Path]:
    import site
    import sysconfig

    dirs = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    dirs |= set(site.getsitepackages())
    user = site.getusersitepackages()
    if site.ENABLE_USER_SITE and user:
        dirs.add(user)
    return sorted(Path(d) for d in dirs if d and Path(d).is_dir())


def packages_digest() -> str:
    """A digest of the installed distributions: every ``*.dist-info``/``*.egg-info``/``*.pth`` and when it changed."""
    h = hashlib.sha256()
    for folder in _site_dirs():
        h.update(str(folder).encode())
        with contextlib.suppress(OSError):
            for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                if entry.name.endswith((".dist-info", ".egg-info", ".pth", ".egg-link")):
                    with contextlib.suppress(OSError):
                        h.update(f"{entry.name}:{entry.stat().st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def own_digest() -> str:
    """A digest of pytest-repro's own source files (an edited checkout makes a new daemon)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(str(root).encode())
    for path in sorted(root.rglob("*.py")):
        with contextlib.suppress(OSError):
            st = path.stat()
            h.update(f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def import_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``env`` that importing torch, transformers & co. may read."""
    return {k: v for k, v in sorted(env.items()) if k.startswith(_IMPORT_ENV_PREFIXES) and k not in _VOLATILE}


@dataclass(frozen=True)
class Identity:
    """What a daemon must share with a session to serve it."""

    python: str
    prefix: str
    packages: str
    own: str
    env: str  # digest of import_env
    preload: str  # digest of the start-up preload list

    @property
    def key(self) -> str:
        """The daemon's name: a digest of everything above."""
        text = json.dumps([self.python, self.prefix, self.packages, self.own, self.env, self.preload])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def identity(env: Mapping[str, str], preload: Sequence[str]) -> Identity:
    """This interpreter's identity for a daemon started with ``env`` and ``preload``."""
    env_text = json.dumps(import_env(env), sort_keys=True)
    return Identity(
        python=os.path.realpath(sys.executable),  # `pytest` and `python -m pytest` may name it differently
        prefix=sys.prefix,
        packages=packages_digest(),
        own=own_digest(),
        env=hashlib.sha256(env_text.encode()).hexdigest()[:16],
        preload=hashlib.sha256("\n".join(preload).encode()).hexdigest()[:16],
    )


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


@contextlib.contextmanager
def _locked(place: Place) -> Iterator[None]:
    fd = os.open(place.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def is_daemon(pid: int) -> bool:
    """Whether ``pid`` is a live pytest-repro worker daemon of this user (not a zombie, not a reused pid)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it was our child and has ended
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            if fh.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return False
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        return os.stat(f"/proc/{pid}").st_uid == os.getuid() and b"pytest_repro._exec.worker" in cmdline
    except (OSError, IndexError):
        return False


# ---------------------------------------------------------------- talking to one


def _connect(path: Path, timeout: float = 5.0) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    sock.settimeout(None)
    return sock


def ask(place: Place, op: str, timeout: float = 5.0) -> StatusReply | None:
    """Send one request (status, retire, exit) to a daemon; its status reply, or None (no answer expected/got)."""
    sock = _connect(place.socket, timeout)
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
        "--file",
        str(place.socket),
        "--file",
        str(place.state),
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
        return os.posix_spawn(sys.executable, argv, dict(env), file_actions=actions, setsid=True)
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
        if is_daemon(int(state["pid"])):
            ask(place, "retire")  # it removes its own files
            lines.append(
                f"retired the worker daemon pid {state['pid']}: the {' and '.join(why)} changed since it started "
                "(it ends once its current sessions do)"
            )
        else:
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
        if state is not None and is_daemon(int(state["pid"])):
            sock = _connect(place.socket)
            if sock is not None:
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
        alive = is_daemon(int(state["pid"]))
        out.append((place, state, ask(place, "status") if alive else None))
    return out


def stop(place: Place, state: Mapping[str, Any], grace: float = 5.0) -> bool:
    """Stop a daemon (its running runs are killed) and remove its files; whether it was running."""
    pid = int(state["pid"])
    running = is_daemon(pid)
    if running:
        ask(place, "exit")
        deadline = time.monotonic() + grace
        while is_daemon(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if is_daemon(pid):
            from .procs import kill_group

            kill_group(pid)
    for path in (place.state, place.socket):
        with contextlib.suppress(OSError):
            path.unlink()
    return running
