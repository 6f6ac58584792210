"""Scratch folders in the temp dir that know their owner, and the removal of those whose owner was killed.

A session's scratch folder holds a lock file that its process keeps flock-ed for as long as it lives: the
kernel releases the lock when the process dies, however it dies (SIGKILL, OOM). A later session removes
the folders whose lock it can take, so only the scratch of dead processes, never a live session's. A folder
without a lock file (an older version's, or one being created right now) is never touched.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import tempfile
from pathlib import Path

PREFIX = "pytest-repro-"
LOCK_FILE = ".owner.lock"

_held: dict[Path, int] = {}  # scratch folders this process owns -> the descriptor holding their lock


def _temp_root() -> Path:
    return Path(tempfile.gettempdir())


def make_scratch(prefix: str = PREFIX) -> Path:
    """Create a scratch folder in the temp dir, locked as this process's until release_scratch or its death."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        import fcntl
    except ImportError:  # not POSIX: no owner lock, so no later session will remove it
        return folder
    # Locked before it gets its name: a cleaner never finds the lock file of a live owner unlocked.
    pending = folder / f"{LOCK_FILE}.{os.getpid()}"
    fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.rename(pending, folder / LOCK_FILE)
    _held[folder] = fd
    return folder


def release_scratch(folder: Path) -> None:
    """Remove a scratch folder this process made, then let go of its lock."""
    shutil.rmtree(folder, ignore_errors=True)
    fd = _held.pop(folder, None)
    if fd is not None:
        os.close(fd)


def _size(folder: Path) -> int:
    total = 0
    for current, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(current, name)).st_size
    return total


def _owner_gone(lock: Path) -> tuple[int, str] | None:
    """If no live process holds ``lock``, take it and return (descriptor, recorded pid); else None."""
    import fcntl

    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # no lock file (not ours to judge), or another user's folder
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        pid = os.read(fd, 32).decode("ascii", "replace").strip()
    except OSError:  # BlockingIOError: its owner is alive
        os.close(fd)
        return None
    return fd, pid


def clean_stale_scratch(root: Path | None = None) -> list[str]:
    """Remove the scratch folders of dead pytest-repro processes from the temp dir; return what was done, once."""
    try:
        import fcntl  # noqa: F401
    except ImportError:
        return []
    root = root if root is not None else _temp_root()
    try:
        candidates = sorted(p for p in root.iterdir() if p.name.startswith(PREFIX))
    except OSError:
        return []
    removed: list[str] = []
    freed = 0
    notes: list[str] = []
    for folder in candidates:
        if folder in _held or folder.is_symlink() or not folder.is_dir():
            continue
        taken = _owner_gone(folder / LOCK_FILE)
        if taken is None:
            continue
        fd, pid = taken
        try:
            size = _size(folder)
            problem = _remove(folder)
            if problem is not None:
                notes.append(
                    f"could not remove the scratch folder {folder} of a killed session (pid {pid} is gone): "
                    f"{problem}; fix: make it writable and remove it: rm -rf {shlex.quote(str(folder))}"
                )
                continue
            removed.append(f"{folder.name} (pid {pid})")
            freed += size
        finally:
            os.close(fd)
    if removed:
        shown = ", ".join(removed[:5]) + (f" and {len(removed) - 5} more" if len(removed) > 5 else "")
        notes.insert(
            0,
            f"removed {len(removed)} scratch folder(s) of killed sessions from {root} ({freed / 1e6:.1f} MB): {shown}",
        )
    return notes


def _remove(folder: Path) -> str | None:
    """Remove a folder tree; return the first error if it is still there (None: it is gone)."""
    errors: list[str] = []

    def record(func: object, path: str, info: tuple[type[BaseException], BaseException, object]) -> None:
        exc = info[1]
        errors.append(f"{exc.strerror} ({path})" if isinstance(exc, OSError) and exc.strerror else str(exc))

    shutil.rmtree(folder, onerror=record)
    if not folder.exists():
        return None
    return errors[0] if errors else "it is still there"
