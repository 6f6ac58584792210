"""A self-contained HTML report (no network): loss curves per test, difference tables, environment drift.

The plots are drawn by report_plots.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .report_plots import GRAY, RED, plots

COLORS = {
    "passed": "#1a7f37",
    "unchanged": "#1a7f37",
    "passed-cross-env": "#9a6700",
    "written": "#9a6700",
}
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1f2328}
h1{font-size:1.6rem;margin-bottom:.2rem} .meta{color:#59636e;margin-bottom:1.5rem}
.tally{margin:.3rem 0}
.tally span{display:inline-block;margin-right:.6rem;padding:.15rem .55rem;border-radius:1rem;color:#fff;font-size:.9rem}
section{border:1px solid #d1d9e0;border-radius:8px;padding:1rem 1.2rem;margin:1.2rem 0}
section h2{font-size:1.05rem;margin:0 0 .4rem 0;font-family:ui-monospace,SFMono-Regular,Menlo,monospace}
h3{font-size:.95rem;margin:.9rem 0 .3rem 0}
.verdict{font-weight:600} .detail{color:#59636e;margin:.2rem 0 .8rem 0}
.outcome{font-weight:600;font-size:.85rem;padding:.05rem .45rem;border-radius:1rem;color:#fff}
.context{border-left:4px solid #cf222e;background:#fff5f5}
.note{color:#59636e;font-size:.9rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem} th,td{border:1px solid #d1d9e0;padding:.25rem .55rem}
th{background:#f6f8fa;text-align:left} td.num{text-align:right;font-family:ui-monospace,monospace}
pre{background:#f6f8fa;padding:.6rem;border-radius:6px;overflow-x:auto;font-size:.85rem}
img{max-width:100%;height:auto;display:block}
"""


def _color(verdict: str) -> str:
    return COLORS.get(verdict, RED)


def _outcome(test: Mapping[str, Any]) -> str | None:
    """Pytest's own outcome of the test (schema 2), None in older reports."""
    value = test.get("test_outcome")
    return None if value is None else str(value)


def _rank(test: Mapping[str, Any]) -> int:
    """0: a failure (bad verdict, or the test failed/errored), 1: skipped, 2: fine."""
    outcome = _outcome(test)
    if str(test.get("verdict")) not in COLORS or outcome in ("failed", "error"):
        return 0
    return 1 if outcome not in (None, "passed") else 2


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return html.escape("" if value is None else str(value))


def _statistical_table(stat: Mapping[str, Any]) -> str:
    """Per-seed metric values of this run and of the reference, one column per seed."""
    ref = stat.get("reference") or {}
    sides = [("this run", list(stat.get("seeds") or []), stat.get("metrics") or {})]
    if ref:
        sides.append(("reference", list(ref.get("seeds") or []), ref.get("metrics") or {}))

    def keyed(seeds: list[Any]) -> list[tuple[Any, int]]:
        return [(s, seeds[:i].count(s)) for i, s in enumerate(seeds)]

    columns: list[tuple[Any, int]] = []
    for _, seeds, _ in sides:
        columns += [c for c in keyed(seeds) if c not in columns]
    names = list(dict.fromkeys(n for _, _, metrics in sides for n in metrics))
    if not names or not columns:
        return ""
    head = "<th>metric</th><th></th>" + "".join(
        f"<th>seed {_fmt(s)}{f' #{n + 1}' if n else ''}</th>" for s, n in columns
    )
    rows = []
    for name in names:
        for side, seeds, metrics in sides:
            values = list(metrics.get(name) or [])
            by_col = dict(zip(keyed(seeds), values, strict=False))
            finite = [float(v) for v in values if v is not None and math.isfinite(v)]
            mean = sum(finite) / len(finite) if finite else None
            cells = "".join(f"<td class=num>{_fmt(by_col.get(c))}</td>" for c in columns)
            rows.append(f"<tr><td>{_fmt(name)}</td><td>{side}</td>{cells}<td class=num>{_fmt(mean)}</td></tr>")
    return f'<h3>per-seed values</h3><table data-table="seeds"><tr>{head}<th>mean</th></tr>{"".join(rows)}</table>'


def _verdict_line(test: Mapping[str, Any]) -> str:
    verdict, outcome = str(test.get("verdict")), _outcome(test)
    label, color = verdict.upper(), _color(verdict)
    if outcome not in (None, "passed"):
        color = GRAY if outcome == "skipped" and verdict in COLORS else RED
        if verdict in COLORS:  # the check agreed, but the test did not pass: never shown as a pass
            label = f"TEST {outcome.upper()} (check: {verdict})"
    env = f" · {html.escape(str(test['env_key']))}" if test.get("env_key") else ""
    badge = ""
    if outcome is not None:
        bg = {"passed": COLORS["passed"], "skipped": GRAY}.get(outcome, RED)
        badge = (
            f' <span class="outcome" data-outcome="{html.escape(outcome)}" style="background:{bg}">'
            f"test {html.escape(outcome)}</span>"
        )
    return f'<div class="verdict" style="color:{color}">{html.escape(label)}{env}{badge}</div>'


def _section(test: Mapping[str, Any]) -> str:
    name = str(test.get("nodeid", "")) + (f" [{test['name']}]" if test.get("name") else "")
    parts = [f"<section><h2>{html.escape(name)}</h2>", _verdict_line(test)]
    if test.get("detail"):
        parts.append(f'<div class="detail">{html.escape(str(test["detail"]))}</div>')
    if test.get("context") and _rank(test) == 0:
        parts.append(
            '<h3>Changed since the reference was recorded</h3><pre class="context">'
            + html.escape("\n".join(str(x) for x in test["context"]))
            + "</pre>"
        )
    stat = test.get("statistical") or {}
    seeds = stat.get("seeds") or []
    facts = [
        ("seed", test.get("seed") if not seeds else ", ".join(str(s) for s in seeds)),
        ("device", test.get("device")),
        ("seconds per run", " / ".join(f"{s:.2f}" for s in test.get("seconds") or [])),
        ("reference", test.get("path")),
        ("compared with", test.get("compared_with")),
    ]
    parts.append("<table>" + "".join(f"<tr><th>{k}</th><td>{_fmt(v)}</td></tr>" for k, v in facts if v) + "</table>")
    parts += plots(test, name)
    if stat:
        parts.append(_statistical_table(stat))
    if test.get("max_abs"):
        parts.append(
            '<table data-table="max-abs"><tr><th>section</th>'
            "<th>max abs diff vs reference (largest over the whole section, any tolerance)</th></tr>"
            + "".join(
                f"<tr><td>{html.escape(k)}</td><td class=num>{_fmt(v)}</td></tr>" for k, v in test["max_abs"].items()
            )
            + "</table>"
        )
    diffs = test.get("differences") or []
    if diffs:
        head = "".join(
            f"<th>{h}</th>"
            for h in (
                "section",
                "key",
                "kind",
                "first divergent step / index",
                "abs diff at that step",
                "steps / elements differing",
                "max abs diff (over those differing)",
                "max rel diff (over those differing)",
            )
        )
        rows = []
        for d in diffs[:50]:
            where = d.get("step") if d.get("step") is not None else d.get("index")
            count = f"{d.get('n_diff')} of {d.get('numel')}" if d.get("numel") else ""
            rows.append(
                f"<tr><td>{_fmt(d.get('section'))}</td><td>{_fmt(d.get('key'))}</td><td>{_fmt(d.get('kind'))}</td>"
                f"<td>{_fmt(where)}</td><td class=num>{_fmt(d.get('first_step_abs'))}</td>"
                f"<td class=num>{count}</td><td class=num>{_fmt(d.get('max_abs'))}</td>"
                f"<td class=num>{_fmt(d.get('max_rel'))}</td></tr>"
            )
        parts.append(f'<table data-table="differences"><tr>{head}</tr>{"".join(rows)}</table>')
    if test.get("origin"):
        parts.append(f'<h3>where it starts</h3><p data-origin="1">{html.escape(str(test["origin"]))}</p>')
    for title, lines in (
        ("details", test.get("details")),
        ("environment drift since the reference", test.get("drift")),
        ("warnings", test.get("warnings")),
    ):
        if lines:
            parts.append(f"<h3>{title}</h3><pre>{html.escape(chr(10).join(str(x) for x in lines))}</pre>")
    parts.append("</section>")
    return "\n".join(parts)


def _tally(counts: Mapping[str, int], color: Any) -> str:
    return "".join(
        f'<span style="background:{color(v)}">{n} {html.escape(v)}</span>' for v, n in sorted(counts.items())
    )


def render_html(report: Mapping[str, Any]) -> str:
    """Render a JSON report (see report.schema.json) as one self-contained HTML page."""
    tests = list(report.get("tests") or [])
    ordered = sorted(tests, key=_rank)  # what needs attention first; stable within each rank
    tally = f'<div class="tally">checks: {_tally(report.get("summary") or {}, _color)}</div>'
    outcomes: dict[str, int] = {}
    for t in tests:
        if _outcome(t) is not None:
            outcomes[str(_outcome(t))] = outcomes.get(str(_outcome(t)), 0) + 1
    if outcomes:
        tally += (
            '<div class="tally">tests: '
            + _tally(outcomes, lambda o: {"passed": COLORS["passed"], "skipped": GRAY}.get(o, RED))
            + "</div>"
        )
    body = "\n".join(_section(t) for t in ordered) or "<p>No reproducibility checks ran.</p>"
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        "<title>pytest-repro report</title>"
        f"<style>{CSS}</style></head><body>"
        "<h1>Reproducibility report</h1>"
        f'<div class="meta">{html.escape(str(report.get("created", "")))} · pytest-repro '
        f"{html.escape(str(report.get('plugin_version', '')))} · {html.escape(str(report.get('rootdir', '')))} · "
        f"exit status {html.escape(str(report.get('exitstatus', '')))}</div>"
        f"{tally}{body}</body></html>\n"
    )


def write_html(path: Path, report: Mapping[str, Any]) -> None:
    """Write the HTML report atomically."""
    from ..record import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, render_html(report))
