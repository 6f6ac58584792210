"""The warm worker's protocol, shared by both sides: one JSON object per line, never pickle.

The worker first sends a ``ReadyMessage`` (``{"ready": true, ...}``, the outcome of its start-up imports),
then answers each ``RunRequest`` (``{"op": "run", "id": N, ...}``) with a ``RunReply`` (``{"id": N,
"status": ...}``, in the order runs finish) and each ``ImportRequest`` with an ``ImportReply`` (in order);
an ``ExitRequest`` or a closed stdin stops it. A run's results come back as files in its workdir (see
``child``), not through the protocol. Imports only the standard library.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal, TypedDict


class PreloadResult(TypedDict):
    """What importing a list of entries ("module" or "module:name") gave, and whether forking is still safe."""

    errors: dict[str, str]  # entry -> why importing it failed
    missing: list[str]  # entries not installed
    tainted: str  # why forking became unsafe ("" while it is safe)
    culprit: str  # the entry whose import made it unsafe


class _Ready(PreloadResult):
    ready: Literal[True]
    pid: int


class ReadyMessage(_Ready, total=False):
    """The worker's first line to a session: it has imported its start-up list (a daemon: and what else it has)."""

    requested: list[str]  # every entry it was asked to import so far (errors and missing: of all of them)
    served: int  # runs forked so far
    started: float  # when it started (time.time())
    stale: str  # a daemon that must not serve: which of its imported files changed (it has retired)


class ImportReply(PreloadResult):
    """The answer to an ImportRequest."""

    op: Literal["import"]


class _Run(TypedDict):
    op: Literal["run"]
    id: int
    spec: dict[str, Any]  # a RunSpec as a dict
    timeout: float  # seconds before the child is killed
    env: dict[str, str]  # the child's whole environment


class RunRequest(_Run, total=False):
    """Fork a child that runs one job; its reply carries the same id."""

    cwd: str  # the session's folder: first on the child's sys.path, as for a worker the session started
    umask: int  # the session's umask (a daemon's child takes it)


class ImportRequest(TypedDict, total=False):
    """Import more entries before the runs that follow: inline, or from a JSON file (long lists)."""

    op: Literal["import"]
    modules: list[str]
    file: str


class ExitRequest(TypedDict):
    """Stop the worker (its running children are killed): a daemon for every session."""

    op: Literal["exit"]


class OtherRequest(TypedDict):
    """``status`` (answered with a StatusReply) or ``retire`` (a daemon takes no new sessions)."""

    op: Literal["status", "retire"]


class StatusReply(TypedDict):
    """What a worker is doing: for ``pytest-repro worker status``."""

    op: Literal["status"]
    pid: int
    key: str  # a daemon's key ("" for a session's own worker)
    python: str
    started: float
    idle_s: float  # it exits after this long without sessions or runs (0: never)
    idle_for_s: float
    sessions: int  # connected now
    sessions_served: int
    running: int  # runs in progress
    served: int  # runs forked so far
    modules: int  # modules in its sys.modules
    retired: bool


class _ReplyStatus(TypedDict):
    status: str  # exited, signaled, timeout, unforkable; the parent adds worker-died


class RunReply(_ReplyStatus, total=False):
    """How one run ended, as the worker (or, for a spawned run, the parent) saw its process end."""

    id: int
    wall_s: float
    returncode: int  # exited
    signal: int  # signaled
    orphans: int  # processes the job left behind (killed)
    preload_errors: dict[str, str]  # the job's own preload entries that failed to import in the worker
    detail: str  # unforkable, worker-died: why
    log: str  # worker-died: the tail of the worker's log


Request = RunRequest | ImportRequest | ExitRequest | OtherRequest


def encode(msg: Mapping[str, Any]) -> str:
    """One message as a protocol line (newline included)."""
    return json.dumps(msg) + "\n"


def decode(line: bytes | str) -> dict[str, Any]:
    """One protocol line as a message (which kind it is, the caller tells from its keys)."""
    msg = json.loads(line)
    if not isinstance(msg, dict):
        raise ValueError(f"not a protocol message: {line!r}")
    return msg
