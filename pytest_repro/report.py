"""Terminal reporting: the ``reproducibility`` summary section."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

LABELS = {
    "passed": ("PASSED", "green"),
    "unchanged": ("UNCHANGED", "green"),
    "passed-cross-env": ("CROSS-ENV", "yellow"),
    "written": ("WRITTEN", "yellow"),
    "diverged": ("DIVERGED", "red"),
    "differs": ("DIFFERS", "red"),
    "missing": ("MISSING", "red"),
    "corrupt": ("CORRUPT", "red"),
    "error": ("ERROR", "red"),
    "timeout": ("TIMEOUT", "red"),
    "non-finite": ("NON-FINITE", "red"),
}


class Writer(Protocol):
    """The part of pytest's TerminalReporter the summary uses."""

    verbosity: int

    def write_sep(self, sep: str, title: str | None = None, **markup: bool) -> None: ...

    def write_line(self, line: str, **markup: bool) -> None: ...


def relative(path: str | None, rootdir: Path) -> str:
    """Return ``path`` relative to the rootdir when it lies inside it."""
    if path is None:
        return ""
    try:
        return str(Path(path).relative_to(rootdir))
    except ValueError:
        return path


def verdict_counts(outcomes: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Return how many checks ended with each verdict."""
    return dict(Counter(str(o["verdict"]) for o in outcomes))


def write_summary(tr: Writer, outcomes: Sequence[Mapping[str, Any]], rootdir: Path) -> None:
    """Write one line per check, then the references written."""
    if not outcomes:
        return
    counts = verdict_counts(outcomes)
    tally = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
    if tr.verbosity < 0:
        tr.write_line(f"reproducibility: {tally}")
        return
    tr.write_sep("=", "reproducibility")
    width = max(len(label) for label, _ in LABELS.values())
    for o in outcomes:
        label, color = LABELS.get(o["verdict"], (o["verdict"].upper(), "red"))
        name = o["nodeid"] + (f" [{o['name']}]" if o["name"] else "") + (f" ({o['env_key']})" if o["env_key"] else "")
        runs = (
            f"{len(o['seconds'])} run(s), " + "/".join(f"{s:.2f}" for s in o["seconds"]) + " s" if o["seconds"] else ""
        )
        extra = f": {o['detail']}" if o["detail"] else ""
        suffix = f"  ({runs})" if runs and tr.verbosity > 0 else ""
        tr.write_line(f"{label:<{width}} {name}{extra}{suffix}", **{color: True})
        if tr.verbosity > 0:
            if o["max_abs"]:
                figures = ", ".join(f"{k} {v:.3g}" for k, v in o["max_abs"].items())
                tr.write_line(f"{'':<{width}} max abs diff vs reference: {figures}")
            for line in o["details"]:
                tr.write_line(f"{'':<{width}} {line.strip()}")
    written = [o for o in outcomes if o["verdict"] == "written"]
    if written:
        tr.write_line(f"references written ({len(written)}):")
        for o in written:
            tr.write_line(f"  {relative(o['path'], rootdir)}")
    drifted = [o for o in outcomes if o["drift"] and o["verdict"] in ("passed", "unchanged", "passed-cross-env")]
    if drifted:
        tr.write_line(
            "environment drift: these passed, but numerics-relevant parts of the environment changed "
            "since their reference was recorded:",
            yellow=True,
        )
        for o in drifted:
            tr.write_line(f"  {o['nodeid']}:", yellow=True)
            for line in o["drift"]:
                tr.write_line(f"    {line}", yellow=True)
    warned = [o for o in outcomes if o["warnings"]]
    if warned:
        tr.write_line("warnings:", yellow=True)
        for o in warned:
            for line in o["warnings"]:
                tr.write_line(f"  {o['nodeid']}: {line}", yellow=True)
    tr.write_line(f"reproducibility: {tally}")


REPORT_SCHEMA_VERSION = 1


def build_report(outcomes: Sequence[Mapping[str, Any]], rootdir: Path, exitstatus: int) -> dict[str, Any]:
    """Return the JSON report (see report.schema.json) for a run's outcomes."""
    from datetime import datetime, timezone

    from . import __version__

    counts = verdict_counts(outcomes)
    body = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "plugin_version": __version__,
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "rootdir": str(rootdir),
        "exitstatus": int(exitstatus),
        "summary": counts,
        "tests": sorted(outcomes, key=lambda o: (o["nodeid"], o["name"] or "")),
    }
    return finite(body)  # type: ignore[no-any-return]


def write_json_report(path: Path, report: Mapping[str, Any]) -> None:
    """Write a JSON report atomically."""
    import json

    from .record import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n")


def finite(data: Any) -> Any:
    """Replace NaN/inf (not representable in JSON) by None, recursively."""
    import math

    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, Mapping):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data
