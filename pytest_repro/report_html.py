"""A self-contained HTML report (no network): loss curves per test, difference tables, environment drift."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

COLORS = {
    "passed": "#1a7f37",
    "unchanged": "#1a7f37",
    "passed-cross-env": "#9a6700",
    "written": "#9a6700",
}
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1f2328}
h1{font-size:1.6rem;margin-bottom:.2rem} .meta{color:#59636e;margin-bottom:1.5rem}
.tally span{display:inline-block;margin-right:.6rem;padding:.15rem .55rem;border-radius:1rem;color:#fff;font-size:.9rem}
section{border:1px solid #d1d9e0;border-radius:8px;padding:1rem 1.2rem;margin:1.2rem 0}
section h2{font-size:1.05rem;margin:0 0 .4rem 0;font-family:ui-monospace,SFMono-Regular,Menlo,monospace}
.verdict{font-weight:600} .detail{color:#59636e;margin:.2rem 0 .8rem 0}
table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem} th,td{border:1px solid #d1d9e0;padding:.25rem .55rem}
th{background:#f6f8fa;text-align:left} td.num{text-align:right;font-family:ui-monospace,monospace}
pre{background:#f6f8fa;padding:.6rem;border-radius:6px;overflow-x:auto;font-size:.85rem}
img{max-width:100%;height:auto}
"""


def _color(verdict: str) -> str:
    return COLORS.get(verdict, "#cf222e")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return html.escape("" if value is None else str(value))


def loss_plot_png(curves: Mapping[str, Sequence[float | None]], divergence: int | None, title: str) -> bytes:
    """Plot each run's and the reference's loss per step, marking the first divergent step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.2), dpi=110)
    for name, values in curves.items():
        ys = [math.nan if v is None else v for v in values]
        style = {"color": "black", "linewidth": 2.2, "alpha": 0.55} if name == "reference" else {"linewidth": 1.2}
        ax.plot(range(len(ys)), ys, label=name, **style)
    if divergence is not None:
        ax.axvline(divergence, color="#cf222e", linestyle="--", linewidth=1)
        ax.annotate(
            f"first divergence: step {divergence}",
            (divergence, 1),
            xycoords=("data", "axes fraction"),
            xytext=(4, -12),
            textcoords="offset points",
            color="#cf222e",
            fontsize=8,
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _divergence(test: Mapping[str, Any]) -> int | None:
    for d in test.get("differences", []):
        if d.get("section") == "losses" and d.get("step") is not None:
            return int(d["step"])
    return None


def _section(test: Mapping[str, Any]) -> str:
    verdict = str(test["verdict"])
    name = test["nodeid"] + (f" [{test['name']}]" if test.get("name") else "")
    parts = [
        f"<section><h2>{html.escape(name)}</h2>",
        f'<div class="verdict" style="color:{_color(verdict)}">{html.escape(verdict.upper())}'
        f"{' · ' + html.escape(str(test['env_key'])) if test.get('env_key') else ''}</div>",
    ]
    if test.get("detail"):
        parts.append(f'<div class="detail">{html.escape(str(test["detail"]))}</div>')
    facts = [
        ("seed", test.get("seed")),
        ("device", test.get("device")),
        ("seconds per run", " / ".join(f"{s:.2f}" for s in test.get("seconds", []))),
        ("reference", test.get("path")),
    ]
    parts.append("<table>" + "".join(f"<tr><th>{k}</th><td>{_fmt(v)}</td></tr>" for k, v in facts if v) + "</table>")
    curves = test.get("curves") or {}
    if any(curves.values()):
        png = loss_plot_png(curves, _divergence(test), name)
        parts.append(
            f'<img alt="loss curves of {html.escape(name)}" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        )
    if test.get("max_abs"):
        parts.append(
            "<table><tr><th>section</th><th>max abs diff vs reference</th></tr>"
            + "".join(
                f"<tr><td>{html.escape(k)}</td><td class=num>{_fmt(v)}</td></tr>" for k, v in test["max_abs"].items()
            )
            + "</table>"
        )
    diffs = test.get("differences") or []
    if diffs:
        head = "".join(
            f"<th>{h}</th>"
            for h in ("section", "key", "kind", "step / index", "elements differing", "max abs diff", "max rel diff")
        )
        rows = []
        for d in diffs[:50]:
            where = d.get("step") if d.get("step") is not None else d.get("index")
            count = f"{d.get('n_diff')} of {d.get('numel')}" if d.get("numel") else ""
            rows.append(
                f"<tr><td>{_fmt(d['section'])}</td><td>{_fmt(d.get('key'))}</td><td>{_fmt(d['kind'])}</td>"
                f"<td>{_fmt(where)}</td><td class=num>{count}</td><td class=num>{_fmt(d.get('max_abs'))}</td>"
                f"<td class=num>{_fmt(d.get('max_rel'))}</td></tr>"
            )
        parts.append(f"<table><tr>{head}</tr>{''.join(rows)}</table>")
    for title, lines in (
        ("details", test.get("details")),
        ("environment drift since the reference", test.get("drift")),
        ("warnings", test.get("warnings")),
    ):
        if lines:
            parts.append(f"<h3>{title}</h3><pre>{html.escape(chr(10).join(str(x) for x in lines))}</pre>")
    parts.append("</section>")
    return "\n".join(parts)


def render_html(report: Mapping[str, Any]) -> str:
    """Render a JSON report (see report.schema.json) as one self-contained HTML page."""
    tests = list(report.get("tests", []))
    bad = [t for t in tests if t["verdict"] not in COLORS]
    ordered = bad + [t for t in tests if t not in bad]  # what needs attention first
    tally = "".join(
        f'<span style="background:{_color(v)}">{n} {html.escape(v)}</span>'
        for v, n in sorted(report.get("summary", {}).items())
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
        f'<div class="tally">{tally}</div>{body}</body></html>\n'
    )


def write_html(path: Path, report: Mapping[str, Any]) -> None:
    """Write the HTML report atomically."""
    from .record import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, render_html(report))
