"""The HTML report's plots of one check: loss curves and loss differences per step, as embedded PNG images.

matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

RED = "#cf222e"
GRAY = "#59636e"
FLOOR = 1e-12  # where an exact zero difference is drawn on the log-scale difference plot


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(plt: Any, fig: Any) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _mark_step(ax: Any, step: int, text: str) -> None:
    ax.axvline(step, color=RED, linestyle="--", linewidth=1)
    left, right = ax.get_xlim()
    flip = step > (left + right) / 2  # past the middle: write the label to the left of the line
    ax.annotate(
        text,
        (step, 1),
        xycoords=("data", "axes fraction"),
        xytext=(-4 if flip else 4, -12),
        textcoords="offset points",
        ha="right" if flip else "left",
        color=RED,
        fontsize=8,
        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
    )


def loss_plot_png(
    curves: Mapping[str, Sequence[float | None]],
    divergence: int | None,
    title: str,
    band: tuple[float, Sequence[float]] | None = None,
) -> bytes:
    """Plot each run's and the reference's loss per step, marking the first divergent step.

    ``band``: (k, noise floor per step) of a noise-aware check, drawn as reference ± k x floor.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.2), dpi=110)
    reference = curves.get("reference")
    if band is not None and reference:
        k, floor = band
        n = min(len(reference), len(floor))
        ref = [math.nan if v is None else v for v in reference[:n]]
        width = [k * f for f in floor[:n]]
        lower = [r - w for r, w in zip(ref, width, strict=True)]
        upper = [r + w for r, w in zip(ref, width, strict=True)]
        ax.fill_between(range(n), lower, upper, color=GRAY, alpha=0.25, label=f"reference ± {k:g} x noise floor")
    for name, values in curves.items():
        ys = [math.nan if v is None else v for v in values]
        style = {"color": "black", "linewidth": 2.2, "alpha": 0.55} if name == "reference" else {"linewidth": 1.2}
        if name.startswith("reference "):  # one of several reference seeds (statistical mode)
            style = {"color": "black", "linewidth": 1.4, "alpha": 0.4, "linestyle": "--"}
        ax.plot(range(len(ys)), ys, label=name, **style)
    if divergence is not None:
        _mark_step(ax, divergence, f"first divergence: step {divergence}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(curves) > 6 else 1)
    return _png(plt, fig)


def diff_plot_png(
    series: Mapping[str, Sequence[float]],
    divergence: int | None,
    first_nonzero: int | None,
    title: str,
    floor: float = FLOOR,
) -> bytes:
    """Plot |loss difference| per step on a log scale; exact zeros are drawn at ``floor``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 2.8), dpi=110)
    top = floor
    for name, values in series.items():
        ys = [v if math.isnan(v) else max(v, floor) for v in values]
        top = max([top, *(y for y in ys if not math.isnan(y))])
        ax.plot(range(len(ys)), ys, label=name, linewidth=1.2, marker=".", markersize=4)
    ax.axhline(floor, color=GRAY, linestyle=":", linewidth=1, label=f"identical (difference 0), drawn at {floor:g}")
    ax.set_yscale("log")
    ax.set_ylim(floor / 4, max(top * 30, floor * 100))
    # the step markers go into the legend, which loc="best" keeps off the curves
    if divergence is not None:
        ax.axvline(divergence, color=RED, linestyle="--", linewidth=1, label=f"first divergence: step {divergence}")
    if first_nonzero is not None and first_nonzero != divergence:
        label = f"first nonzero difference: step {first_nonzero}"
        ax.axvline(first_nonzero, color=GRAY, linestyle="-.", linewidth=1, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(f"|Δ loss|  (0 drawn at {floor:g})", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best", ncol=2 if len(series) > 4 else 1)
    return _png(plt, fig)


def _absdiff(a: Sequence[float | None], b: Sequence[float | None]) -> list[float]:
    """|a - b| per step; NaN where either side is missing or non-finite; over the shorter length."""
    out = []
    for x, y in zip(a, b, strict=False):
        if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
            out.append(math.nan)
        else:
            out.append(abs(float(x) - float(y)))
    return out


def _seed_labels(test: Mapping[str, Any]) -> dict[str, str]:
    """Map 'run k' to 'seed S' for a statistical check (run k used seeds[k-1])."""
    stat = test.get("statistical") or {}
    seeds = list(stat.get("seeds") or [])
    labels = {}
    for k, seed in enumerate(seeds, start=1):
        labels[f"run {k}"] = f"seed {seed}" if seeds.count(seed) == 1 else f"seed {seed} (run {k})"
    return labels


def _runs(test: Mapping[str, Any]) -> dict[str, Sequence[float | None]]:
    """This run's loss curves, labelled by seed for statistical checks."""
    curves: Mapping[str, Sequence[float | None]] = test.get("curves") or {}
    runs = {k: v for k, v in curves.items() if k != "reference"}
    stat = test.get("statistical") or {}
    if not runs and stat.get("losses"):
        runs = {f"run {k}": v for k, v in enumerate(stat["losses"], start=1)}
    labels = _seed_labels(test)
    return {labels.get(k, k): v for k, v in runs.items()}


def _references(test: Mapping[str, Any]) -> dict[str, Sequence[float | None]]:
    """The reference's loss curves: one per reference seed for statistical checks, else 'reference'."""
    ref = (test.get("statistical") or {}).get("reference") or {}
    seeds, losses = list(ref.get("seeds") or []), list(ref.get("losses") or [])
    if losses and len(seeds) == len(losses) and len(set(seeds)) == len(seeds):
        return {f"reference seed {s}": v for s, v in zip(seeds, losses, strict=True)}
    curve = (test.get("curves") or {}).get("reference")
    return {"reference": curve} if curve else {}


def _diff_series(test: Mapping[str, Any]) -> tuple[dict[str, list[float]], str]:
    """|run - reference| per run (matched by seed when statistical), else |run k - run 1|; and what against."""
    runs, refs = _runs(test), _references(test)
    stat = test.get("statistical") or {}
    if refs:
        plain = refs.get("reference") or (test.get("curves") or {}).get("reference")
        series = {}
        for label, values in runs.items():
            seed_ref = refs.get(f"reference {label.split(' (')[0]}") if label.startswith("seed ") else None
            if seed_ref is not None:
                series[f"{label} − reference {label.split(' (')[0]}"] = _absdiff(values, seed_ref)
            elif plain:
                series[f"{label} − reference"] = _absdiff(values, plain)
        return series, "reference"
    items = list(runs.items())
    seeds = list(stat.get("seeds") or [])
    if len(items) < 2:
        return {}, ""
    first_label, first = items[0]
    series = {}
    for k, (label, values) in enumerate(items[1:], start=1):
        if seeds and k < len(seeds) and seeds[k] != seeds[0]:
            continue  # different seeds are meant to differ
        series[f"{label} − {first_label}"] = _absdiff(values, first)
    return series, first_label


def _first_nonzero(series: Mapping[str, Sequence[float]]) -> int | None:
    steps = [next((i for i, v in enumerate(vs) if math.isnan(v) or v > 0), None) for vs in series.values()]
    found = [s for s in steps if s is not None]
    return min(found) if found else None


def _divergence(test: Mapping[str, Any]) -> int | None:
    for d in test.get("differences") or []:
        if d.get("section") == "losses" and d.get("step") is not None:
            return int(d["step"])
    return None


def _img(png: bytes, kind: str, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<img data-plot="{kind}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def plots(test: Mapping[str, Any], name: str) -> list[str]:
    """The check's plots; a plot matplotlib cannot draw (extreme values) becomes a note, never a crash."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. -W error: a flat curve's identical ylims is no error of the run
            return _draw_plots(test, name)
    except (ValueError, OverflowError, RuntimeError, MemoryError) as exc:
        return [
            f'<p class="note">plots unavailable for this check ({html.escape(type(exc).__name__)}: '
            f"{html.escape(str(exc))})</p>"
        ]


def _draw_plots(test: Mapping[str, Any], name: str) -> list[str]:
    parts = []
    curves = {**_runs(test), **_references(test)}
    if any(curves.values()):
        noise = test.get("noise") or {}
        floor = (noise.get("floor") or {}).get("losses")
        band = (float(noise["k"]), [math.nan if f is None else f for f in floor]) if floor and noise.get("k") else None
        png = loss_plot_png(curves, _divergence(test), name, band)
        parts.append(_img(png, "loss", f"loss curves of {name}"))
    series, against = _diff_series(test)
    series = {k: v for k, v in series.items() if v}
    if not series or all(math.isnan(v) for vs in series.values() for v in vs):
        return parts
    first = _first_nonzero(series)
    if first is None:
        parts.append(
            f'<p class="note" data-plot="identical">losses identical to the {html.escape(against)} '
            "at every step (|Δ loss| = 0)</p>"
        )
        return parts
    title = f"{name}: |loss difference| vs the {against} per step"
    png = diff_plot_png(series, _divergence(test), first, title)
    parts.append(_img(png, "diff", f"loss difference per step of {name} against the {against}"))
    return parts
