"""Effective settings, and the one option table they come from.

Every option of pytest-repro is one field of :class:`Settings`, declared with :func:`option`: its
default, help text, parser, and where a user may set it (CLI flag, ini option, marker keyword). The
CLI flags, ini options, marker keywords and help text are generated from these fields
(``plugin.pytest_addoption`` registers them with pytest); adding an option is one field here.
Precedence: a CLI flag wins over the marker, which wins over the ini option.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from . import options as read
from ._judge.tolerances import ToleranceSpec
from .options import Option, SettingsError, Switch, option

__all__ = ["BY_FIELD", "MARKER", "MARKER_KWARGS", "OPTIONS", "Settings", "SettingsError", "Switch"]

MARKER = "reproducible"


@dataclass(frozen=True)
class Settings:
    """Settings for one reproducible test (or, before the marker is applied, the whole run): the option table."""

    enabled: bool = option(
        False,
        "run tests marked @pytest.mark.reproducible (skipped otherwise)",
        read.present,
        flag="--repro",
        flag_kwargs={"action": "store_true", "default": False},
    )
    regen: str | None = option(
        None,
        "write references: all (default) rewrites changed ones, missing writes only absent ones",
        read.regen,
        flag="--repro-regen",
        # No argparse choices: pytest's early parse would reject `--repro-regen tests/` before we can fix the args.
        flag_kwargs={"nargs": "?", "const": "all", "metavar": "all|missing"},
    )
    regen_force: bool = option(
        False,
        "allow --repro-regen when the CI environment variable is set",
        read.present,
        flag="--repro-regen-force",
        flag_kwargs={"action": "store_true", "default": False},
    )
    diagnose: bool = option(
        False,
        "when runs diverge, rerun them tracing every parameter and gradient per optimizer step "
        "and report the first tensor that differs",
        read.present,
        flag="--repro-diagnose",
        flag_kwargs={"action": "store_true", "default": False},
    )
    calibrate: int | None = option(
        None,
        "measure each check's noise floor with N perturbed runs and print it per value, with the tolerances "
        "it resolves (pytest-repro calibrate)",
        read.optional_int(2),
        flag="--repro-calibrate",
        flag_kwargs={"metavar": "N"},
    )
    calibrate_store: bool = option(
        False,
        "with --repro-calibrate: store the floor beside this environment's reference (noise_floor.json), for "
        "later cross-environment checks",
        read.present,
        flag="--repro-calibrate-store",
        flag_kwargs={"action": "store_true", "default": False},
    )
    report: str | None = option(
        None,
        "write every reproducibility check's outcome as JSON (schema: pytest_repro/report.schema.json)",
        read.text,
        flag="--repro-report",
        flag_kwargs={"metavar": "PATH"},
    )
    unused: str | None = option(
        None,
        "after a full run, report (or fail on, or delete) reference folders no collected test owns",
        read.text,
        flag="--repro-unused",
        flag_kwargs={"choices": ("report", "fail", "delete")},
    )
    unused_force: bool = option(
        False,
        "check unused references even though the run was filtered (-k, -m, --lf, paths)",
        read.present,
        flag="--repro-unused-force",
        flag_kwargs={"action": "store_true", "default": False},
    )
    html: str | None = option(
        None,
        "write a self-contained HTML report: loss curves, difference tables, environment drift",
        read.text,
        flag="--repro-html",
        flag_kwargs={"metavar": "PATH"},
    )
    tolerance: ToleranceSpec = option(
        None, "how close the runs and the reference must be", read.marker_tolerance, marker="tolerance"
    )
    cross_env: ToleranceSpec = option(
        "noise",
        "tolerance against a reference from another environment: noise (within k x the measured noise floor), "
        "close, bitwise or a YAML map",
        read.tolerance,
        ini="repro_cross_env_tolerance",
        marker="cross_env",
        marker_parse=read.marker_tolerance,
    )
    runs: int = option(
        "2",
        "how many times each reproducible test runs its job (>= 1)",
        read.int_at_least(1),
        ini="repro_runs",
        flag="--repro-runs",
        flag_help="runs per test (ini repro_runs)",
        marker="runs",
        marker_metavar="N",
    )
    seed: int | None = option(
        None,
        "the test's own seed instead of one derived",
        read.optional_int(0),
        marker="seed",
        marker_yields_to="base_seed",
        marker_metavar="S",
        marker_parse=read.int_at_least(0),  # a marker seed=None is an error, as it always was
    )
    base_seed: int = option(
        "0",
        "base seed; each test's seed is derived from it and the test's node id",
        read.int_at_least(0),
        ini="repro_seed",
        flag="--repro-seed",
        flag_help="base seed (ini repro_seed)",
    )
    deterministic: bool = option(
        "true",
        "true: torch deterministic algorithms and cuDNN/cuBLAS flags",
        read.boolean,
        ini="repro_deterministic",
        flag="--repro-deterministic",
        flag_help="torch deterministic mode (ini repro_deterministic)",
        flag_kwargs={"choices": ("true", "false")},
        marker="deterministic",
        marker_metavar="True",
    )
    timeout: float = option(
        "600",
        "seconds one run may take before it is killed",
        read.seconds,
        ini="repro_timeout",
        flag="--repro-timeout",
        flag_help="seconds per run before it is killed (ini repro_timeout)",
        marker="timeout",
        marker_metavar="SECONDS",
    )
    device: str = option(
        "auto",
        "auto, cpu, cuda or cuda:N",
        read.device_name,
        ini="repro_device",
        flag="--repro-device",
        flag_help="auto, cpu, cuda or cuda:N (ini repro_device)",
        marker="device",
    )
    threads: int = option(
        "1",
        "CPU threads of job processes (torch, OpenMP, MKL); 0 leaves torch's default",
        read.int_at_least(0),
        ini="repro_threads",
        flag="--repro-threads",
        flag_help="CPU threads of job processes, 0 = torch's default (ini repro_threads, default 1)",
    )
    parallel_runs: int = option(
        "auto",
        "runs of one check that run side by side: auto (CPU: free cores // repro_threads; GPU: what its free "
        "memory holds at the job's measured peak) or N",
        read.parallel,
        ini="repro_parallel_runs",
        flag="--repro-parallel-runs",
        flag_help="runs of one check side by side: auto or N, 1 = one after the other (ini repro_parallel_runs)",
        flag_kwargs={"metavar": "N|auto"},
    )
    isolation: str = option(
        "auto",
        "auto (fork worker on Linux), fork or spawn (fresh interpreter per run)",
        read.isolation,
        ini="repro_isolation",
        flag="--repro-isolation",
        flag_help="fork: warm worker forks a child per run; spawn: fresh interpreter per run",
        flag_kwargs={"choices": ("auto", "fork", "spawn")},
    )
    worker: str = option(
        "auto",
        "where runs are forked from: daemon (a warm worker that outlives the session, so later sessions skip "
        "the imports), session (a worker of this session's own) or auto (daemon, except when the CI or "
        "PYTEST_REPRO_WORKER=session environment variable is set)",
        read.choice("auto", "daemon", "session"),
        ini="repro_worker",
        flag="--repro-worker",
        flag_help="daemon, session or auto (ini repro_worker): fork runs from a warm worker that outlives the session",
        flag_kwargs={"choices": ("auto", "daemon", "session")},
    )
    worker_idle: float = option(
        "1800",
        "seconds the worker daemon waits without sessions before it exits",
        read.seconds,
        ini="repro_worker_idle",
    )
    bundle_dir: str | None = option(
        None,
        "write a self-describing bundle (.tar.gz) of every failing check, and of every reference --repro-regen "
        "wrote (for pytest-repro accept), into DIR, e.g. for CI artifacts",
        read.text,
        flag="--repro-bundle-dir",
        flag_kwargs={"metavar": "DIR"},
    )
    mlflow: Switch = option(
        "",
        "log every check to MLflow: true (local store in the rootdir) or a tracking URI; empty: off",
        read.switch("", "1", "true", "yes", "on", "local"),
        ini="repro_mlflow",
        flag="--repro-mlflow",
        flag_help="log every check as an MLflow run (ini repro_mlflow); without a URI: MLFLOW_TRACKING_URI, "
        "else a local SQLite store in <rootdir>/mlruns. Needs pip install 'pytest-repro[mlflow]'",
        flag_kwargs={"nargs": "?", "const": "", "metavar": "TRACKING_URI"},
    )
    wandb: Switch = option(
        "",
        "log every check to W&B (offline into <rootdir>/wandb): true or a project name; empty: off",
        read.switch("", "1", "true", "yes", "on"),
        ini="repro_wandb",
        flag="--repro-wandb",
        flag_help="log every check as a W&B run (ini repro_wandb), offline into <rootdir>/wandb unless "
        "WANDB_MODE=online; without a project: WANDB_PROJECT, else the project's name. "
        "Needs pip install 'pytest-repro[wandb]'",
        flag_kwargs={"nargs": "?", "const": "", "metavar": "PROJECT"},
    )
    reference_dir: Path = option(
        "reference_outputs",
        "folder (relative to rootdir) holding reference outputs",
        read.path,
        ini="repro_reference_dir",
    )
    config_audit: str = option(
        "warn",
        "warn, fail or off: config keys the job read but did not declare, or never read",
        read.choice("warn", "fail", "off"),
        ini="repro_config_audit",
    )
    identity: str = option(
        "hash",
        "hash, omit or plain: how hostname and user name appear in manifests",
        read.choice("hash", "omit", "plain"),
        ini="repro_manifest_identity",
    )
    manifest_packages: tuple[str, ...] = option(
        [], "extra packages whose versions every manifest records", read.names, ini="repro_manifest_packages"
    )
    env_key_fields: tuple[str, ...] = option(
        [],
        "manifest fields (dotted paths) added to the environment key of references",
        read.names,
        ini="repro_env_key_fields",
    )


def _table() -> tuple[Option, ...]:
    rows = []
    for f in fields(Settings):
        row = f.metadata.get("option")
        if row is None:
            raise TypeError(f"Settings.{f.name} is not declared with option(...)")
        rows.append(replace(row, name=f.name))
    return tuple(rows)


OPTIONS: tuple[Option, ...] = _table()
BY_FIELD = {o.name: o for o in OPTIONS}
MARKER_KWARGS = tuple(o.marker for o in OPTIONS if o.marker)


def base_settings(ini: Mapping[str, Any], cli: Mapping[str, Any], rootdir: Path) -> Settings:
    """Combine ini options with CLI flags (CLI wins) into run-wide settings; keys are ini names / flag dests."""
    values: dict[str, Any] = {}
    for o in OPTIONS:
        flag_value = cli.get(o.dest) if o.dest else None
        if flag_value is not None and not (o.flag_kwargs.get("action") == "store_true" and not flag_value):
            values[o.name] = o.parse(flag_value, str(o.flag))
        elif o.ini is not None:
            values[o.name] = o.parse(ini.get(o.ini, o.default), o.ini)
    settings = Settings(**values)
    ref = settings.reference_dir
    return replace(settings, reference_dir=ref if ref.is_absolute() else rootdir / ref)


def apply_marker(
    base: Settings, kwargs: Mapping[str, Any], cli: Mapping[str, Any], args: tuple[Any, ...] = ()
) -> Settings:
    """Apply a ``reproducible`` marker's arguments on top of the run settings; CLI flags still win."""
    if args:
        raise SettingsError(f"@pytest.mark.{MARKER} takes keyword arguments only ({', '.join(MARKER_KWARGS)})")
    unknown = sorted(set(kwargs) - set(MARKER_KWARGS))
    if unknown:
        raise SettingsError(
            f"@pytest.mark.{MARKER}: unknown argument(s) {', '.join(unknown)}; allowed: {', '.join(MARKER_KWARGS)}"
        )
    changes: dict[str, Any] = {}
    for o in OPTIONS:
        if o.marker is None or o.marker not in kwargs:
            continue
        winner = BY_FIELD[o.marker_yields_to] if o.marker_yields_to else o
        if winner.dest is not None and cli.get(winner.dest) is not None:
            continue
        parse = o.marker_parse or o.parse
        changes[o.name] = parse(kwargs[o.marker], f"@pytest.mark.{MARKER}({o.marker}=…)")
    return replace(base, **changes)
