"""Run-failure rules: what a run that timed out, crashed or raised means for the check (pure, no pytest)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from . import messages
from .audit import near_misses
from .policy import Decision
from .verdict import Verdict


def nondeterministic_op(traceback_text: str) -> str | None:
    """Return the op torch named in a 'does not have a deterministic implementation' error, if that is the error."""
    m = re.search(r"(\S+) does not have a deterministic implementation, but you set", traceback_text)
    return m.group(1) if m else None


def run_failed(
    nodeid: str,
    run: int,
    device: str,
    status: str,
    detail: str,
    log_tail: str,
    stage: str = "",
    config_audit: Mapping[str, Any] | None = None,
) -> Decision | None:
    """The decision for run ``run`` that ended with ``status`` (None when it is "ok")."""
    if status == "timeout":
        return Decision(Verdict.TIMEOUT, f"run {run} timed out", messages.timeout(nodeid, run, detail, log_tail))
    if status == "error" and stage == "record":
        return Decision(
            Verdict.ERROR, f"run {run}: the result cannot be recorded", messages.unrecordable(nodeid, run, detail)
        )
    if status == "ok":
        return None
    op = nondeterministic_op(detail)
    if op is not None:
        last = detail.strip().splitlines()[-1]
        return Decision(
            Verdict.ERROR,
            f"run {run}: {op} has no deterministic implementation",
            messages.nondeterministic_op(nodeid, run, op, device, last),
        )
    if status != "error":  # ended without writing a traceback
        return Decision(
            Verdict.ERROR, f"run {run} crashed: {detail}", messages.job_crashed(nodeid, run, detail, log_tail)
        )
    what = "crashed" if "RankFailed" in detail else "raised an exception"
    return Decision(
        Verdict.ERROR,
        f"run {run} {what}",
        messages.job_failed(nodeid, run, what, detail, log_tail, near_misses(config_audit)),
    )


def unreadable_run_record(nodeid: str, run: int, exc: BaseException) -> Decision:
    """A run's record, written and checked by the child, that cannot be read back."""
    return Decision(Verdict.ERROR, f"run {run} wrote an unreadable record", messages.unreadable(nodeid, exc))


def record_unreadable(nodeid: str, exc: BaseException) -> Decision:
    """A record file that changed or broke while the check read it."""
    return Decision(Verdict.ERROR, f"a record became unreadable: {exc}", messages.unreadable(nodeid, exc))
