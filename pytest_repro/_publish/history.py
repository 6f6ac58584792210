"""The CLI's history: a check's logged MLflow runs read back, as a table and since when it drifts."""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .mlflow import quiet
from .trackers import PASSING


def _final(metrics: Mapping[str, float], *keys: str) -> float | None:
    for key in keys:
        if key in metrics:
            return metrics[key]
    return None


def read_history(
    uri: str, experiment: str, nodeid: str, name: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """Return the logged runs of one check, oldest first (the latest ``limit``), read through MlflowClient."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    with quiet():
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no experiment {experiment!r}")
    # MLflow's filter syntax has no escape for quotes: such node ids are filtered here instead.
    filter_string = "" if "'" in nodeid else f"tags.`repro.nodeid` = '{nodeid}'"
    runs = []
    token = None
    while True:
        page = client.search_runs(
            [exp.experiment_id],
            filter_string=filter_string,
            order_by=["attributes.start_time DESC"],
            max_results=min(limit, 1000) if filter_string else 1000,
            page_token=token,
        )
        runs += [r for r in page if r.data.tags.get("repro.nodeid") == nodeid]
        token = page.token
        if not token or len(runs) >= limit:
            break
    out = []
    for run in runs[:limit]:
        tags, metrics = run.data.tags, run.data.metrics
        check = tags.get("repro.check") or None
        if name is not None and check != name:
            continue
        runs_final = {k[len("loss/") :]: v for k, v in metrics.items() if k.startswith("loss/run_")}
        out.append(
            {
                "run_id": run.info.run_id,
                "start_time": run.info.start_time,
                "check": check,
                "verdict": tags.get("repro.verdict", ""),
                "detail": tags.get("repro.detail", ""),
                "environment_key": tags.get("repro.environment_key", ""),
                "device": tags.get("repro.device", ""),
                "runner": tags.get("repro.runner", ""),
                "git_commit": tags.get("repro.git_commit", ""),
                "final_loss": _final(metrics, "loss/run_1", "loss/mean"),
                "final_loss_reference": _final(metrics, "loss/reference", "loss/reference_mean"),
                "final_loss_runs": runs_final,
            }
        )
    out.sort(key=lambda r: (r["start_time"] or 0, r["run_id"]))
    return out


def format_history(rows: Sequence[Mapping[str, Any]], nodeid: str, experiment: str, uri: str) -> list[str]:
    """Render the history table and a line saying since when (and where) the check drifts."""
    from datetime import datetime, timezone

    from .._judge.verdict import parse_verdict

    def when(row: Mapping[str, Any]) -> str:
        ms = row.get("start_time") or 0
        return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")

    def loss(value: Any) -> str:
        return f"{value:.8g}" if isinstance(value, (int, float)) else "-"

    checks = any(r["check"] for r in rows)
    header = ["started (UTC)", "verdict", "environment", "device", "runner", "commit", "final loss", "reference"]
    if checks:
        header.insert(1, "check")
    table = []
    for r in rows:
        cells = [
            when(r),
            parse_verdict(r["verdict"]).label if r["verdict"] else "?",
            r["environment_key"] or "-",
            r["device"] or "-",
            (r["runner"] or "-")[:23],
            (r["git_commit"] or "-")[:8],
            loss(r["final_loss"]),
            loss(r["final_loss_reference"]),
        ]
        if checks:
            cells.insert(1, r["check"] or "-")
        table.append(cells)
    widths = [max(len(str(row[i])) for row in [header, *table]) for i in range(len(header))]
    lines = [f"{nodeid}: {len(rows)} run(s) in experiment {experiment!r} at {uri}, oldest first"]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *table]]
    lines += _drift_summary(rows, when)
    return lines


def _drift_summary(rows: Sequence[Mapping[str, Any]], when: Any) -> list[str]:
    """Say since when the latest streak of failing verdicts runs, and where environments changed."""
    from .._judge.verdict import parse_verdict

    out = []
    for prev, row in itertools.pairwise(rows):
        if prev["environment_key"] and row["environment_key"] and prev["environment_key"] != row["environment_key"]:
            out.append(
                f"environment changed at {when(row)}: {prev['environment_key']} -> {row['environment_key']} "
                f"(runner {row['runner'] or '-'})"
            )
    failing = 0
    for row in reversed(rows):
        if row["verdict"] in PASSING:
            break
        failing += 1
    if not rows:
        return out
    if failing == 0:
        out.append("latest run passed")
    elif failing == len(rows):
        out.append(f"failing in all {failing} run(s) shown, since {when(rows[0])} (no passing run shown)")
    else:
        first, last_good = rows[len(rows) - failing], rows[len(rows) - failing - 1]
        label = parse_verdict(first["verdict"]).label
        out.append(
            f"drifting since {when(first)}: {label} on {first['environment_key'] or '-'} "
            f"(runner {first['runner'] or '-'}, commit {(first['git_commit'] or '-')[:8]}): {first['detail']}; "
            f"last passed {when(last_good)} at commit {(last_good['git_commit'] or '-')[:8]}"
        )
    return out
