"""The config audit's findings: config keys a run read that the config lacks, and keys it never read."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..record import Record


def near_miss_pairs(audit: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """(key the job read but the config lacks, close key of the same section the job never read) pairs."""
    import difflib

    if not audit:
        return []
    unused = [str(k) for k in audit.get("unused_keys") or []]
    found = []
    for path in sorted(str(k) for k in audit.get("undeclared_reads") or []):
        parent, _, leaf = path.rpartition(".")
        siblings = {u.rpartition(".")[2]: u for u in unused if u.rpartition(".")[0] == parent}
        close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
        if close:
            found.append((path, siblings[close[0]]))
    return found


def near_misses(audit: Mapping[str, Any] | None) -> list[str]:
    """Config keys the job read but the config lacks, next to a key of the config the job never read."""
    return [
        f"the job read config key {path!r}, which the config does not have; the config has {given!r}, which the "
        f"job never read: did you mean {path!r}?"
        for path, given in near_miss_pairs(audit)
    ]


def audit_findings(record: Record) -> list[str]:
    """The config audit's findings for a run: undeclared reads and keys never read."""
    audit = record.meta.get("config_audit") or {}
    misses = near_misses(audit)  # a typo shows as one read default and one unread key: say so once
    paired = {key for pair in near_miss_pairs(audit) for key in pair}
    problems = [
        f"the job read config key {k!r}, which the config does not declare (it used a default)"
        for k in audit.get("undeclared_reads", [])
        if k not in paired
    ]
    unread = [f"config key {k!r} was never read by the job" for k in audit.get("unused_keys", []) if k not in paired]
    return misses + problems + unread
