"""Reporting: the ``reproducibility`` terminal section and the JSON and HTML report publishers (HTML: report_html)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .._judge.messages import DRIFT_UNKNOWN, regen_command
from .._judge.verdict import PASSING, Verdict, parse_verdict
from . import extras
from .base import failed

if TYPE_CHECKING:
    import pytest

    from ..session import ReproSession
    from ..settings import Settings
    from .base import Publication

_GREEN = {"passed", "unchanged"}
_YELLOW = {"passed-cross-env", "written"}


def _label(verdict: str) -> tuple[str, str]:
    v = parse_verdict(verdict)
    color = "green" if v.value in _GREEN else "yellow" if v.value in _YELLOW else "red"
    return v.label, color


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


def write_summary(tr: Writer, session: ReproSession) -> None:
    """Write one line per check, then the references written, drift, warnings and session notes."""
    outcomes, rootdir = session.outcomes, session.rootdir
    notes = list(session.notes)
    if session.unused_note:
        notes.append(session.unused_note)
        notes += [f"  {relative(str(folder), rootdir)}" for folder in session.unused]
        notes += [f"  kept: {path}" for path in session.unused_kept]
    if not outcomes:
        for line in notes:
            tr.write_line(f"reproducibility: {line}" if not line.startswith(" ") else line)
        return
    counts = verdict_counts(outcomes)
    tally = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
    if tr.verbosity < 0:
        for o in outcomes:  # asked for explicitly: shown even with -q
            for line in calibration_lines(o) if o.get("calibration") else []:
                tr.write_line(line)
        tr.write_line(f"reproducibility: {tally}")
        for line in notes:
            tr.write_line(f"reproducibility: {line}" if not line.startswith(" ") else line)
        return
    tr.write_sep("=", "reproducibility")
    width = max(len(v.label) for v in Verdict)
    for o in outcomes:
        label, color = _label(o["verdict"])
        name = o["nodeid"] + (f" [{o['name']}]" if o["name"] else "") + (f" ({o['env_key']})" if o["env_key"] else "")
        runs = (
            f"{len(o['seconds'])} run(s), " + "/".join(f"{s:.2f}" for s in o["seconds"]) + " s" if o["seconds"] else ""
        )
        extra = f": {o['detail']}" if o["detail"] else ""
        suffix = f"  ({runs})" if runs and tr.verbosity > 0 else ""
        tr.write_line(f"{label:<{width}} {name}{extra}{suffix}", **{color: True})
        if tr.verbosity > 0:
            if o["max_abs"]:
                figures = ", ".join(f"{k} {_g(v)}" for k, v in o["max_abs"].items())
                tr.write_line(f"{'':<{width}} max abs diff vs reference (largest over each section): {figures}")
            for line in o["details"]:
                tr.write_line(f"{'':<{width}} {line.strip()}")
    for o in outcomes:
        if o.get("calibration"):
            for line in calibration_lines(o):
                tr.write_line(line)
    written = [o for o in outcomes if o["verdict"] == Verdict.WRITTEN.value]
    if written:
        tr.write_line(f"references written ({len(written)}):")
        for o in written:
            tr.write_line(f"  {relative(o['path'], rootdir)}")
    good = {v.value for v in PASSING}
    known = [(o, [x for x in o["drift"] if not x.startswith(DRIFT_UNKNOWN)]) for o in outcomes if o["verdict"] in good]
    drifted = [(o, lines) for o, lines in known if lines]
    if drifted:
        tr.write_line(
            "environment drift: these passed, but numerics-relevant parts of the environment changed "
            "since their reference was recorded:",
            yellow=True,
        )
        for line in _drift_lines([{**o, "drift": lines} for o, lines in drifted]):
            tr.write_line(line, yellow=True)
    unknown = [(o, x) for o in outcomes if o["verdict"] in good for x in o["drift"] if x.startswith(DRIFT_UNKNOWN)]
    if unknown:
        tr.write_line(
            "environment not compared: these passed, but their reference's manifest could not be read:", yellow=True
        )
        for o, line in unknown:
            tr.write_line(f"  {o['nodeid']}: {line}", yellow=True)
            where = relative(str(Path(o["path"]) / "manifest.yaml"), rootdir) if o["path"] else "manifest.yaml"
            tr.write_line(
                f"    fix: restore {where} from version control, or rewrite it from this run: "
                f"{regen_command(o['nodeid'])}",
                yellow=True,
            )
    warned = [o for o in outcomes if o["warnings"]]
    if warned:
        tr.write_line("warnings:", yellow=True)
        for o in warned:
            for line in o["warnings"]:
                tr.write_line(f"  {o['nodeid']}: {line}", yellow=True)
    tr.write_line(f"reproducibility: {tally}")
    for line in notes:
        tr.write_line(f"reproducibility: {line}" if not line.startswith(" ") else line)


def _drift_lines(drifted: Sequence[Mapping[str, Any]]) -> list[str]:
    """The drift block's lines: drift shared by every check once, then per check only what is its own."""
    common = [line for line in drifted[0]["drift"] if all(line in o["drift"] for o in drifted[1:])]
    if len(drifted) < 2 or not common:
        common = []
    lines = (
        [f"  the same for all {len(drifted)} checks that passed with drift:", *(f"    {line}" for line in common)]
        if common
        else []
    )
    for o in drifted:
        own = [line for line in o["drift"] if line not in common]
        if own:
            name = o["nodeid"] + (f" [{o['name']}]" if o["name"] else "")
            lines.append(f"  {name}{', also' if common else ''}:")
            lines += [f"    {line}" for line in own]
    return lines


def _g(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) else str(value)


class JsonReport:
    """--repro-report: every check's outcome and the run's final exit status as JSON (report.schema.json)."""

    option = "report"  # the Settings field
    flag = "--repro-report"
    kind = "JSON"
    suffix = ".json"

    def problems(self, settings: Settings, config: pytest.Config) -> list[str]:
        """Whether the path is a file path (not a folder)."""
        target = getattr(settings, self.option)
        if target and Path(target).is_dir():
            flag = self.flag
            return [f"{flag}={target} is a folder; give a file path, e.g. {flag}={Path(target) / 'repro'}{self.suffix}"]
        return []

    def publish(self, run: Publication, exitstatus: int) -> int | None:
        """Write the report; one that cannot be written is noted and fails a passing run."""
        path = getattr(run.session.settings, self.option)
        if not path:
            return None
        if run.report is None:  # built once: the JSON and the HTML report say the same
            run.report = build_report(run.session.outcomes, run.session.rootdir, exitstatus)
        try:
            self.write(Path(path), run.report)
        except Exception as exc:  # a report that cannot be written fails the run, never the session
            run.session.notes.append(
                f"could not write the {self.kind} report {path}: {type(exc).__name__}: {exc}; give a writable file path"
            )
            return failed(exitstatus)
        run.session.notes.append(f"{self.kind} report: {path}")
        return None

    def write(self, path: Path, report: Mapping[str, Any]) -> None:
        """Write the report file."""
        write_json_report(path, report)


class HtmlReport(JsonReport):
    """--repro-html: a self-contained HTML report (loss curves, difference tables, environment drift)."""

    option = "html"
    flag = "--repro-html"
    kind = "HTML"
    suffix = ".html"

    def problems(self, settings: Settings, config: pytest.Config) -> list[str]:
        """Whether the path is a file path, and matplotlib (which draws the loss curves) importable."""
        problems = super().problems(settings, config)
        html = settings.html
        if html and not extras.installed("matplotlib"):
            problems.append(
                f"--repro-html={html} needs matplotlib (it draws the loss curves), which is not installed for this "
                f"Python; {extras.report_install()}"
            )
        return problems

    def write(self, path: Path, report: Mapping[str, Any]) -> None:
        """Write the HTML file."""
        from .report_html import write_html

        write_html(path, report)


REPORT_SCHEMA_VERSION = 3


def build_report(outcomes: Sequence[Mapping[str, Any]], rootdir: Path, exitstatus: int) -> dict[str, Any]:
    """Return the JSON report (see report.schema.json) for a run's outcomes."""
    from datetime import datetime, timezone

    from .. import __version__

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

    from ..record import write_text_atomic

    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder")
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


def calibration_lines(o: Mapping[str, Any]) -> list[str]:
    """The noise floor of a calibrated check, per value, with what k x it resolves and where it was stored."""
    c = o["calibration"]
    f = c["floor"]
    parts = " + ".join(f["parts"]) or "none"
    lines = [f"noise floor of {o['nodeid']}: {parts}, {f['runs']} perturbed runs ({f['seconds']:.1f} s)"]
    rows = [(f"loss step {t}", v) for t, v in enumerate(f["losses"])]
    rows += [
        (f"{section}[{k!r}]" + (" (norm)" if section in ("weights", "outputs") else ""), v)
        for section in ("metrics", "weights", "outputs")
        for k, v in f[section].items()
    ]
    width = max(len(name) for name, _ in rows) if rows else 0
    lines.append(f"  {'value':<{width}}  {'floor':>10}  {'resolution (' + format(c['k'], 'g') + ' x)':>16}")
    for name, v in rows:
        lines.append(f"  {name:<{width}}  {_g(v):>10}  {_g(None if v is None else c['k'] * v):>16}")
    if c["suggested"]:
        lines.append(f"  explicit tolerances this floor resolves: {c['suggested']} (or keep cross_env='noise')")
    if c["stored"]:
        lines.append(f"  stored: {c['stored']}")
    elif c["not_stored"]:
        lines.append(f"  not stored: {c['not_stored']}")
    return lines
