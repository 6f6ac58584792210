"""Process groups of job processes: kill a group, reap what a finished job left running, die with the parent.

Used on both sides of the process boundary (the warm worker and the pytest process); imports only the
standard library.
"""

from __future__ import annotations

import contextlib
import os
import signal


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
        kill_group(pgid)
    return len(members)


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (or the process alone when it leads none)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def die_with_parent() -> None:
    """Linux: have the kernel kill this job process if the worker dies (e.g. pytest was interrupted)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the worker died before prctl took effect
            os._exit(1)
