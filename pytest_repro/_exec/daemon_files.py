"""The daemon's own bookkeeping, in the worker process: its files, the sources it imported, who connects.

- Its socket and state file are removed under the per-key lock that sessions take while they connect or
  start a daemon, and only while the state file still names this daemon, so that a session never connects
  to a daemon that is going away, nor loses a newer daemon's files.
- Every module file it imported is remembered with its size and modification time: when one changes (an
  editable install edited, a package patched in place), forked runs would use the old code while a fresh
  process would not, so the daemon retires before it greets another session.

Imports only the standard library.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def flocked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created owner-only): the per-key lock of daemons and sessions."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class Files:
    """The daemon's socket, state file and lock (paths given by the session that started it)."""

    def __init__(self, sock: str, state: str, lock: str) -> None:
        self.socket, self.state, self.lock = Path(sock), Path(state), Path(lock)
        self.removed = False

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold the lock sessions take while they connect (or start a daemon)."""
        return flocked(self.lock)

    def remove(self) -> None:
        """Remove the state file, then the socket (call with the lock), unless a newer daemon owns them."""
        if self.removed:
            return
        self.removed = True
        try:
            owner = json.loads(self.state.read_text(encoding="utf-8")).get("pid")
        except (OSError, ValueError, AttributeError):
            owner = None
        if owner == os.getpid():
            for path in (self.state, self.socket):
                with contextlib.suppress(OSError):
                    path.unlink()


class Sources:
    """The files of every imported module, with their size and modification time when first seen."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[int, int]] = {}

    def note(self) -> None:
        """Remember the files of modules imported since the last call."""
        for module in list(sys.modules.values()):
            path = getattr(module, "__file__", None)
            if isinstance(path, str) and path not in self.seen:
                with contextlib.suppress(OSError):
                    st = os.stat(path)
                    self.seen[path] = (st.st_size, st.st_mtime_ns)

    def changed(self) -> str:
        """The first remembered file that changed or went away since it was imported ("" when none did)."""
        for path, was in self.seen.items():
            try:
                st = os.stat(path)
            except OSError:
                return path
            if (st.st_size, st.st_mtime_ns) != was:
                return path
        return ""


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (None where the platform does not say)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    return int(struct.unpack("3i", creds)[1])


def close_inherited_fds(keep: int) -> None:
    """Close descriptors above 2 except ``keep`` (e.g. a make jobserver's pipe the session had)."""
    with contextlib.suppress(OSError, ValueError):
        import resource

        limit = min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 65536)
        os.closerange(3, keep)
        os.closerange(keep + 1, limit)
