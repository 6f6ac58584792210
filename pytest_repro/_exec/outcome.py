"""How a run ended, as the pytest process tells it from the worker's reply and the files in the run's folder."""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .child import ERROR_FILE, LOG_FILE, RECORD_DIR
from .pool import read_tail
from .protocol import RunReply


@dataclass(frozen=True)
class RunOutcome:
    """How one run ended: ok, error (the job raised), timeout, or crashed."""

    status: str
    wall_s: float
    workdir: Path
    detail: str = ""
    log_tail: str = ""
    stage: str = ""  # where an error happened: setup, import, job, record
    orphans: int = 0  # processes the job left behind (killed when the run ended)
    config_audit: dict[str, Any] | None = None  # a failed job's config reads when it failed (the child's audit)

    @property
    def record_dir(self) -> Path:
        """Where the child wrote its record."""
        return self.workdir / RECORD_DIR


def outcome(reply: RunReply, workdir: Path, timeout: float) -> RunOutcome:
    """How the run ended, with the processes it left behind."""
    found = classify(reply, workdir, timeout)
    orphans = int(reply.get("orphans") or 0)
    return replace(found, orphans=orphans) if orphans else found


def classify(reply: RunReply, workdir: Path, timeout: float) -> RunOutcome:
    """ok, error (the job raised: its error report), timeout or crashed, from the reply and the run's folder."""
    wall = float(reply.get("wall_s", 0.0))
    tail = read_tail(workdir / LOG_FILE)
    status = reply.get("status")
    if status == "timeout":
        return RunOutcome("timeout", wall, workdir, f"killed after {timeout:g} s without finishing", tail)
    if status == "worker-died":
        return RunOutcome(
            "crashed", wall, workdir, f"the fork worker failed: {reply.get('detail')}", reply.get("log", "") or tail
        )
    error_file = workdir / ERROR_FILE
    if error_file.exists():
        stage, audit = "job", None
        try:
            err = json.loads(error_file.read_text(encoding="utf-8"))
            detail = str(err["traceback"])
            stage = str(err.get("stage", "job"))
            audit = err.get("config_audit") if isinstance(err.get("config_audit"), dict) else None
        except (OSError, ValueError, KeyError, TypeError):
            detail = "the job raised, and its error report is unreadable"
        return RunOutcome("error", wall, workdir, detail, tail, stage=stage, config_audit=audit)
    if status == "signaled":
        name = signal.Signals(int(reply["signal"])).name
        return RunOutcome("crashed", wall, workdir, f"the job process was killed by {name}", tail)
    if reply.get("returncode") != 0 or not (workdir / RECORD_DIR).is_dir():
        return RunOutcome(
            "crashed",
            wall,
            workdir,
            f"the job process exited with code {reply.get('returncode')} and wrote no record",
            tail,
        )
    return RunOutcome("ok", wall, workdir, "", tail)
