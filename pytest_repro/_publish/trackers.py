"""What the trackers (MLflow, W&B) share: their on/off/value option, names, tags and metrics of a check.

Nothing here imports a tracker's library.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Publication

PASSING = ("passed", "passed-cross-env", "unchanged", "written")
TAG_LIMIT = 5000  # MLflow's longest tag value
_ON = ("", "1", "true", "yes", "on", "local")
_OFF = ("0", "false", "no", "off")
_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


def experiment_name(rootdir: Path, environ: Mapping[str, str] = os.environ) -> str:
    """Return the experiment: MLFLOW_EXPERIMENT_NAME, else the project's name in pyproject.toml, else the folder's."""
    if environ.get("MLFLOW_EXPERIMENT_NAME"):
        return environ["MLFLOW_EXPERIMENT_NAME"]
    try:
        import tomllib

        with open(rootdir / "pyproject.toml", "rb") as fh:
            name = tomllib.load(fh).get("project", {}).get("name")
        if isinstance(name, str) and name.strip():
            return name.strip()
    except (ImportError, OSError, ValueError):
        pass
    return rootdir.resolve().name or "pytest-repro"


def git_commit(rootdir: Path) -> str:
    """The project's git commit (empty when it is not a checkout or git is missing)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=rootdir, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def runner_name(identity: str, environ: Mapping[str, str] = os.environ) -> str:
    """Name the machine: the CI runner's name when set, else the hostname as repro_manifest_identity says."""
    for var in ("RUNNER_NAME", "CI_RUNNER_DESCRIPTION", "BUILDKITE_AGENT_NAME", "NODE_NAME"):
        if environ.get(var):
            return environ[var]
    import hashlib
    import platform

    host = platform.node()
    if identity == "plain":
        return host
    if identity == "omit":
        return ""
    return "sha256:" + hashlib.sha256(host.encode()).hexdigest()[:16]


def safe_key(text: str) -> str:
    """``text`` as a metric, param or tag key both trackers accept (unsafe characters replaced, at most 250)."""
    return _KEY.sub("_", text)[:250] or "_"


def clip(value: Any, limit: int) -> str:
    """``value`` as text (JSON unless a string), cut to ``limit`` characters with an ellipsis."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def curve_label(label: str) -> str:
    """A loss curve's label as a metric key."""
    return safe_key(label.replace(" ", "_"))


def check_metrics(o: Mapping[str, Any]) -> Iterator[tuple[str, float, int]]:
    """Yield (key, value, step) for a check: losses per step of every run and the reference, means, max diffs."""
    import math
    import statistics

    for label, losses in (o.get("curves") or {}).items():
        for step, value in enumerate(losses or []):
            if isinstance(value, (int, float)):
                yield f"loss/{curve_label(label)}", float(value), step
    for section, value in (o.get("max_abs") or {}).items():
        if isinstance(value, (int, float)):
            yield f"max_abs/{safe_key(section)}", float(value), 0
    for run, seconds in enumerate(o.get("seconds") or [], start=1):
        yield "run_seconds", float(seconds), run
    stat = o.get("statistical") or {}
    for prefix, values in (("mean", stat), ("reference_mean", stat.get("reference") or {})):
        for name, per_seed in (values.get("metrics") or {}).items():
            numbers = [float(v) for v in per_seed if isinstance(v, (int, float)) and math.isfinite(v)]
            if numbers:
                yield f"stat/{prefix}/{safe_key(name)}", statistics.fmean(numbers), 0
        traces = [t for t in (values.get("losses") or []) if t]
        for step in range(min((len(t) for t in traces), default=0)):
            column = [float(t[step]) for t in traces if isinstance(t[step], (int, float))]
            if column:
                yield f"loss/{prefix}", statistics.fmean(column), step


def effective_config(o: Mapping[str, Any], provenance: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """This run's effective config when the outcome carries it, else the reference's (and say which)."""
    if isinstance(o.get("effective_config"), dict):
        return o["effective_config"], "this run"
    effective = provenance.get("effective_config")
    if isinstance(effective, dict) and effective:
        return effective, "the reference's provenance.yaml (the outcome does not carry this run's config)"
    return {}, "none (no reference with a provenance.yaml)"


def drift_text(o: Mapping[str, Any]) -> str:
    """A check's verdict, drift, context, details and warnings as plain text (a run's note, drift.txt)."""
    parts = [f"{o.get('nodeid')}{' [' + str(o['name']) + ']' if o.get('name') else ''}: {o.get('verdict')}"]
    parts.append(f"  {o.get('detail') or ''}")
    for title, key in (
        ("environment drift since the reference (numerics-relevant)", "drift"),
        ("what changed since the reference", "context"),
        ("details", "details"),
        ("warnings", "warnings"),
    ):
        lines = o.get(key) or []
        parts.append(f"{title}:" + ("" if lines else " none"))
        parts += [f"  {line}" for line in lines]
    return "\n".join(parts) + "\n"


def relative(path: Path | None, rootdir: Path) -> str:
    """``path`` relative to the rootdir when under it, else as given; empty for None."""
    if path is None:
        return ""
    try:
        return str(path.resolve().relative_to(rootdir.resolve()))
    except ValueError:
        return str(path)


def common_tags(run: Publication) -> dict[str, str]:
    """The tags every tracker puts on every check's run: plugin version, git commit, runner, command (computed once)."""
    if run.tags is None:
        from .. import __version__

        session = run.session
        run.tags = {
            "repro.plugin_version": __version__,
            "repro.git_commit": git_commit(session.rootdir),
            "repro.runner": runner_name(session.settings.identity),
            "repro.command": clip(" ".join(session.invocation), TAG_LIMIT),
        }
    return run.tags


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Raise the named loggers to WARNING for a while (a tracker's INFO lines are not the user's)."""
    import logging

    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
