"""Effective settings, and the one option table they come from.

Every option of pytest-repro is one field of :class:`Settings`, declared with :func:`option`: its
default, help text, parser, and where a user may set it (CLI flag, ini option, marker keyword). The
CLI flags, ini options, marker keywords and help text are generated from these fields
(``plugin.pytest_addoption`` registers them with pytest); adding an option is one field here.
Precedence: a CLI flag wins over the marker, which wins over the ini option.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ._judge.tolerances import ToleranceError, ToleranceSpec, parse_tolerance

MARKER = "reproducible"
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


class SettingsError(ValueError):
    """A bad ini option, CLI flag or marker argument."""


Parse = Callable[[Any, str], Any]


@dataclass(frozen=True)
class Option:
    """One row of the option table: a Settings field and where a user sets it."""

    name: str  # the Settings field
    help: str
    parse: Parse
    ini: str | None = None  # ini option name (repro_...); None: not an ini option
    default: str | list[str] | None = None  # the ini text of the default (a list for a linelist option)
    flag: str | None = None  # CLI flag (--repro-...); None: no flag
    flag_help: str | None = None  # the flag's --help text when it is not the ini help
    flag_kwargs: Mapping[str, Any] = field(default_factory=dict)  # argparse: choices, metavar, nargs, ...
    marker: str | None = None  # keyword of @pytest.mark.reproducible(...)
    marker_yields_to: str | None = None  # the option (field) whose CLI flag wins over this keyword
    marker_parse: Parse | None = None  # how the keyword's value is read, when not as the ini text

    @property
    def dest(self) -> str | None:
        """The argparse destination of the flag (config.getoption name)."""
        return self.flag[2:].replace("-", "_") if self.flag else None


def option(default: Any, help: str, parse: Parse, **where: Any) -> Any:
    """Declare a Settings field that is an option (a row of the table; see :class:`Option`)."""
    text = default if isinstance(default, (str, list)) else None
    row = Option(name="", help=help, parse=parse, default=text, **where)

    def make() -> Any:
        return parse(list(default) if isinstance(default, list) else default, row.ini or row.flag or "default")

    return field(default_factory=make, metadata={"option": row})


# ---- parsers: (value, where it was set) -> value; raise SettingsError naming where ----


def _int(minimum: int) -> Parse:
    def parse(value: Any, where: str) -> int:
        try:
            number = int(value)
            if isinstance(value, bool) or float(value) != number:
                raise ValueError
        except (TypeError, ValueError):
            raise SettingsError(f"{where}: expected an integer, got {value!r}") from None
        if number < minimum:
            raise SettingsError(f"{where}: expected an integer >= {minimum}, got {number}")
        return number

    return parse


def _optional_int(minimum: int) -> Parse:
    plain = _int(minimum)
    return lambda value, where: None if value is None else plain(value, where)


def _seconds(value: Any, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{where}: expected a number of seconds, got {value!r}") from None
    if not (number > 0 and math.isfinite(number)):
        raise SettingsError(f"{where}: expected a finite number of seconds > 0, got {value!r}")
    return number


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise SettingsError(f"{where}: expected true or false, got {value!r}")


def _device(value: Any, where: str) -> str:
    text = str(value).strip()
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise SettingsError(f"{where}: expected auto, cpu, cuda or cuda:N, got {value!r}")


def _choice(*choices: str) -> Parse:
    def parse(value: Any, where: str) -> str:
        text = str(value).strip()
        if text not in choices:
            raise SettingsError(f"{where}: expected one of {', '.join(choices)}, got {value!r}")
        return text

    return parse


def _isolation(value: Any, where: str) -> str:
    if value not in ("auto", "fork", "spawn"):
        raise SettingsError(f"{where}: expected auto, fork or spawn, got {value!r}")
    return str(value)


def _parallel(value: Any, where: str) -> int:
    """repro_parallel_runs: auto (0) or an integer >= 1."""
    if value is None or str(value).strip().lower() in ("", "auto"):
        return 0
    try:
        return int(_int(1)(value, where))
    except SettingsError:
        raise SettingsError(
            f"{where}: expected auto or an integer >= 1 (1 runs a check's runs one after the other), got {value!r}"
        ) from None


def _tolerance(value: Any, where: str) -> ToleranceSpec:
    """A tolerance: a name or a map (a marker's value), or the text of an ini option (a name or a YAML map)."""
    import yaml

    try:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("{") else value.strip()
        return parse_tolerance(value, where)
    except (yaml.YAMLError, ToleranceError) as exc:
        raise SettingsError(str(exc)) from None


def _marker_tolerance(value: Any, where: str) -> ToleranceSpec:
    """A marker's tolerance: a name or a map, as written in Python (no YAML text)."""
    if value is None:
        return ToleranceSpec()
    try:
        return parse_tolerance(value, where)
    except ToleranceError as exc:
        raise SettingsError(str(exc)) from None


def _text(value: Any, where: str) -> str | None:
    return None if value is None else str(value)


def _flag(value: Any, where: str) -> bool:
    return bool(value)


def _names(value: Any, where: str) -> tuple[str, ...]:
    return tuple(value or ())


def _path(value: Any, where: str) -> Path:
    return Path(str(value))


def _regen(value: Any, where: str) -> str | None:
    if value not in (None, "all", "missing"):
        raise SettingsError(f"--repro-regen={value}: expected all or missing (e.g. --repro-regen=missing)")
    return None if value is None else str(value)


@dataclass(frozen=True)
class Switch:
    """An off/on/value option (--repro-mlflow, --repro-wandb): value None when off, "" when on without a value."""

    value: str | None
    where: str  # as the user wrote it: "--repro-mlflow=URI" or "repro_mlflow = URI"


_OFF = ("0", "false", "no", "off")


def _switch(*on: str) -> Parse:
    def parse(value: Any, where: str) -> Switch:
        if where.startswith("--"):
            text, said = str(value).strip(), where + (f"={value}" if value else "")
        else:
            text, said = str(value or "").strip(), f"{where} = {value}"
            if text == "":
                return Switch(None, said)
        if text.lower() in _OFF:
            return Switch(None, said)
        return Switch("" if text.lower() in on else text, said)

    return parse


@dataclass(frozen=True)
class Settings:
    """Settings for one reproducible test (or, before the marker is applied, the whole run): the option table."""

    enabled: bool = option(
        False,
        "run tests marked @pytest.mark.reproducible (skipped otherwise)",
        _flag,
        flag="--repro",
        flag_kwargs={"action": "store_true", "default": False},
    )
    regen: str | None = option(
        None,
        "write references: all (default) rewrites changed ones, missing writes only absent ones",
        _regen,
        flag="--repro-regen",
        # No argparse choices: pytest's early parse would reject `--repro-regen tests/` before we can fix the args.
        flag_kwargs={"nargs": "?", "const": "all", "metavar": "all|missing"},
    )
    regen_force: bool = option(
        False,
        "allow --repro-regen when the CI environment variable is set",
        _flag,
        flag="--repro-regen-force",
        flag_kwargs={"action": "store_true", "default": False},
    )
    diagnose: bool = option(
        False,
        "when runs diverge, rerun them tracing every parameter and gradient per optimizer step "
        "and report the first tensor that differs",
        _flag,
        flag="--repro-diagnose",
        flag_kwargs={"action": "store_true", "default": False},
    )
    report: str | None = option(
        None,
        "write every reproducibility check's outcome as JSON (schema: pytest_repro/report.schema.json)",
        _text,
        flag="--repro-report",
        flag_kwargs={"metavar": "PATH"},
    )
    unused: str | None = option(
        None,
        "after a full run, report (or fail on, or delete) reference folders no collected test owns",
        _text,
        flag="--repro-unused",
        flag_kwargs={"choices": ("report", "fail", "delete")},
    )
    unused_force: bool = option(
        False,
        "check unused references even though the run was filtered (-k, -m, --lf, paths)",
        _flag,
        flag="--repro-unused-force",
        flag_kwargs={"action": "store_true", "default": False},
    )
    html: str | None = option(
        None,
        "write a self-contained HTML report: loss curves, difference tables, environment drift",
        _text,
        flag="--repro-html",
        flag_kwargs={"metavar": "PATH"},
    )
    tolerance: ToleranceSpec = option(
        None, "how close the runs and the reference must be", _marker_tolerance, marker="tolerance"
    )
    cross_env: ToleranceSpec = option(
        "close",
        "tolerance against a reference from another environment: close, bitwise or a YAML map",
        _tolerance,
        ini="repro_cross_env_tolerance",
        marker="cross_env",
        marker_parse=_marker_tolerance,
    )
    runs: int = option(
        "2",
        "how many times each reproducible test runs its job (>= 1)",
        _int(1),
        ini="repro_runs",
        flag="--repro-runs",
        flag_help="runs per test (ini repro_runs)",
        marker="runs",
    )
    seed: int | None = option(
        None,
        "the test's own seed instead of one derived",
        _optional_int(0),
        marker="seed",
        marker_yields_to="base_seed",
    )
    base_seed: int = option(
        "0",
        "base seed; each test's seed is derived from it and the test's node id",
        _int(0),
        ini="repro_seed",
        flag="--repro-seed",
        flag_help="base seed (ini repro_seed)",
    )
    deterministic: bool = option(
        "true",
        "true: torch deterministic algorithms and cuDNN/cuBLAS flags",
        _bool,
        ini="repro_deterministic",
        flag="--repro-deterministic",
        flag_help="torch deterministic mode (ini repro_deterministic)",
        flag_kwargs={"choices": ("true", "false")},
        marker="deterministic",
    )
    timeout: float = option(
        "600",
        "seconds one run may take before it is killed",
        _seconds,
        ini="repro_timeout",
        flag="--repro-timeout",
        flag_help="seconds per run before it is killed (ini repro_timeout)",
        marker="timeout",
    )
    device: str = option(
        "auto",
        "auto, cpu, cuda or cuda:N",
        _device,
        ini="repro_device",
        flag="--repro-device",
        flag_help="auto, cpu, cuda or cuda:N (ini repro_device)",
        marker="device",
    )
    threads: int = option(
        "1",
        "CPU threads of job processes (torch, OpenMP, MKL); 0 leaves torch's default",
        _int(0),
        ini="repro_threads",
        flag="--repro-threads",
        flag_help="CPU threads of job processes, 0 = torch's default (ini repro_threads, default 1)",
    )
    parallel_runs: int = option(
        "auto",
        "runs of one check that run side by side: auto (CPU: free cores // repro_threads; GPU: 1) or N",
        _parallel,
        ini="repro_parallel_runs",
        flag="--repro-parallel-runs",
        flag_help="runs of one check side by side: auto or N, 1 = one after the other (ini repro_parallel_runs)",
        flag_kwargs={"metavar": "N|auto"},
    )
    isolation: str = option(
        "auto",
        "auto (fork worker on Linux), fork or spawn (fresh interpreter per run)",
        _isolation,
        ini="repro_isolation",
        flag="--repro-isolation",
        flag_help="fork: warm worker forks a child per run; spawn: fresh interpreter per run",
        flag_kwargs={"choices": ("auto", "fork", "spawn")},
    )
    bundle_dir: str | None = option(
        None,
        "write a self-describing bundle (.tar.gz) of every failing check, and of every reference --repro-regen "
        "wrote (for pytest-repro accept), into DIR, e.g. for CI artifacts",
        _text,
        flag="--repro-bundle-dir",
        flag_kwargs={"metavar": "DIR"},
    )
    mlflow: Switch = option(
        "",
        "log every check to MLflow: true (local store in the rootdir) or a tracking URI; empty: off",
        _switch("", "1", "true", "yes", "on", "local"),
        ini="repro_mlflow",
        flag="--repro-mlflow",
        flag_help="log every check as an MLflow run (ini repro_mlflow); without a URI: MLFLOW_TRACKING_URI, "
        "else a local SQLite store in <rootdir>/mlruns. Needs pip install 'pytest-repro[mlflow]'",
        flag_kwargs={"nargs": "?", "const": "", "metavar": "TRACKING_URI"},
    )
    wandb: Switch = option(
        "",
        "log every check to W&B (offline into <rootdir>/wandb): true or a project name; empty: off",
        _switch("", "1", "true", "yes", "on"),
        ini="repro_wandb",
        flag="--repro-wandb",
        flag_help="log every check as a W&B run (ini repro_wandb), offline into <rootdir>/wandb unless "
        "WANDB_MODE=online; without a project: WANDB_PROJECT, else the project's name. "
        "Needs pip install 'pytest-repro[wandb]'",
        flag_kwargs={"nargs": "?", "const": "", "metavar": "PROJECT"},
    )
    reference_dir: Path = option(
        "reference_outputs", "folder (relative to rootdir) holding reference outputs", _path, ini="repro_reference_dir"
    )
    config_audit: str = option(
        "warn",
        "warn, fail or off: config keys the job read but did not declare, or never read",
        _choice("warn", "fail", "off"),
        ini="repro_config_audit",
    )
    identity: str = option(
        "hash",
        "hash, omit or plain: how hostname and user name appear in manifests",
        _choice("hash", "omit", "plain"),
        ini="repro_manifest_identity",
    )
    manifest_packages: tuple[str, ...] = option(
        [], "extra packages whose versions every manifest records", _names, ini="repro_manifest_packages"
    )
    env_key_fields: tuple[str, ...] = option(
        [],
        "manifest fields (dotted paths) added to the environment key of references",
        _names,
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
