"""Effective settings: ini options, overridden per test by the marker and per run by CLI flags."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ._judge.tolerances import CLOSE, ToleranceError, ToleranceSpec, parse_tolerance

MARKER = "reproducible"
MARKER_KWARGS = ("tolerance", "cross_env", "runs", "seed", "deterministic", "timeout", "device")
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")

# name -> (help, default) for [tool.pytest.ini_options]
INI_OPTIONS: dict[str, tuple[str, str]] = {
    "repro_reference_dir": ("folder (relative to rootdir) holding reference outputs", "reference_outputs"),
    "repro_runs": ("how many times each reproducible test runs its job (>= 1)", "2"),
    "repro_seed": ("base seed; each test's seed is derived from it and the test's node id", "0"),
    "repro_device": ("auto, cpu, cuda or cuda:N", "auto"),
    "repro_deterministic": ("true: torch deterministic algorithms and cuDNN/cuBLAS flags", "true"),
    "repro_timeout": ("seconds one run may take before it is killed", "600"),
    "repro_isolation": ("auto (fork worker on Linux), fork or spawn (fresh interpreter per run)", "auto"),
    "repro_threads": ("CPU threads of job processes (torch, OpenMP, MKL); 0 leaves torch's default", "1"),
    "repro_parallel_runs": (
        "runs of one check that run side by side: auto (CPU: free cores // repro_threads; GPU: 1) or N",
        "auto",
    ),
    "repro_cross_env_tolerance": (
        "tolerance against a reference from another environment: close, bitwise or a YAML map",
        "close",
    ),
    "repro_config_audit": ("warn, fail or off: config keys the job read but did not declare, or never read", "warn"),
    "repro_manifest_identity": ("hash, omit or plain: how hostname and user name appear in manifests", "hash"),
    "repro_mlflow": ("log every check to MLflow: true (local store in the rootdir) or a tracking URI; empty: off", ""),
    "repro_wandb": ("log every check to W&B (offline into <rootdir>/wandb): true or a project name; empty: off", ""),
}
# name -> (help, default) for list-valued ini options (one value per line)
INI_LISTS: dict[str, tuple[str, list[str]]] = {
    "repro_manifest_packages": ("extra packages whose versions every manifest records", []),
    "repro_env_key_fields": ("manifest fields (dotted paths) added to the environment key of references", []),
}


class SettingsError(ValueError):
    """A bad ini option, CLI flag or marker argument."""


@dataclass(frozen=True)
class Settings:
    """Settings for one reproducible test (or, before the marker is applied, the whole run)."""

    reference_dir: Path
    runs: int
    base_seed: int
    seed: int | None
    device: str
    deterministic: bool
    timeout: float
    isolation: str
    tolerance: ToleranceSpec
    regen: str | None  # None, "all" or "missing"
    threads: int = 1
    cross_env: ToleranceSpec = field(default_factory=lambda: ToleranceSpec(default=CLOSE))
    config_audit: str = "warn"
    identity: str = "hash"
    manifest_packages: tuple[str, ...] = ()
    env_key_fields: tuple[str, ...] = ()
    diagnose: bool = False
    parallel_runs: int = 0  # 0 = auto


def _int(value: Any, where: str, minimum: int) -> int:
    try:
        number = int(value)
        if isinstance(value, bool) or float(value) != number:
            raise ValueError
    except (TypeError, ValueError):
        raise SettingsError(f"{where}: expected an integer, got {value!r}") from None
    if number < minimum:
        raise SettingsError(f"{where}: expected an integer >= {minimum}, got {number}")
    return number


def _float(value: Any, where: str) -> float:
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


def base_settings(ini: dict[str, Any], cli: dict[str, Any], rootdir: Path) -> Settings:
    """Combine ini options with CLI flags (CLI wins) into run-wide settings."""

    def pick(name: str) -> tuple[Any, str]:
        flag = cli.get(name)
        if flag is not None:
            return flag, f"--{name.replace('_', '-')}"
        return ini[name], name

    isolation, where = pick("repro_isolation")
    if isolation not in ("auto", "fork", "spawn"):
        raise SettingsError(f"{where}: expected auto, fork or spawn, got {isolation!r}")
    ref = Path(str(ini["repro_reference_dir"]))
    return Settings(
        reference_dir=ref if ref.is_absolute() else rootdir / ref,
        runs=_int(*pick("repro_runs"), minimum=1),
        base_seed=_int(*pick("repro_seed"), minimum=0),
        seed=None,
        device=_device(*pick("repro_device")),
        deterministic=_bool(*pick("repro_deterministic")),
        timeout=_float(*pick("repro_timeout")),
        isolation=str(isolation),
        threads=_int(*pick("repro_threads"), minimum=0),
        tolerance=ToleranceSpec(),
        regen=cli.get("repro_regen"),
        cross_env=_tolerance_text(ini["repro_cross_env_tolerance"], "repro_cross_env_tolerance"),
        config_audit=_choice(ini["repro_config_audit"], "repro_config_audit", ("warn", "fail", "off")),
        identity=_choice(ini["repro_manifest_identity"], "repro_manifest_identity", ("hash", "omit", "plain")),
        manifest_packages=tuple(ini.get("repro_manifest_packages") or ()),
        env_key_fields=tuple(ini.get("repro_env_key_fields") or ()),
        diagnose=bool(cli.get("repro_diagnose")),
        parallel_runs=_parallel(*pick("repro_parallel_runs")),
    )


def _parallel(value: Any, where: str) -> int:
    """repro_parallel_runs: auto (0) or an integer >= 1."""
    if value is None or str(value).strip().lower() in ("", "auto"):
        return 0
    try:
        return _int(value, where, minimum=1)
    except SettingsError:
        raise SettingsError(
            f"{where}: expected auto or an integer >= 1 (1 runs a check's runs one after the other), got {value!r}"
        ) from None


def _choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    text = str(value).strip()
    if text not in choices:
        raise SettingsError(f"{where}: expected one of {', '.join(choices)}, got {value!r}")
    return text


def _tolerance_text(value: Any, where: str) -> ToleranceSpec:
    """Parse a tolerance written in an ini file: a name, or a YAML/JSON map."""
    import yaml

    try:
        parsed = yaml.safe_load(str(value)) if str(value).strip().startswith("{") else str(value).strip()
        return parse_tolerance(parsed, where)
    except (yaml.YAMLError, ToleranceError) as exc:
        raise SettingsError(str(exc)) from None


def apply_marker(base: Settings, kwargs: dict[str, Any], cli: dict[str, Any], args: tuple[Any, ...] = ()) -> Settings:
    """Apply a ``reproducible`` marker's arguments on top of the run settings; CLI flags still win."""
    if args:
        raise SettingsError(f"@pytest.mark.{MARKER} takes keyword arguments only ({', '.join(MARKER_KWARGS)})")
    unknown = sorted(set(kwargs) - set(MARKER_KWARGS))
    if unknown:
        raise SettingsError(
            f"@pytest.mark.{MARKER}: unknown argument(s) {', '.join(unknown)}; allowed: {', '.join(MARKER_KWARGS)}"
        )
    where = f"@pytest.mark.{MARKER}"
    s = base
    try:
        if "tolerance" in kwargs:
            s = replace(s, tolerance=parse_tolerance(kwargs["tolerance"], f"{where}(tolerance=…)"))
        if "cross_env" in kwargs:
            s = replace(s, cross_env=parse_tolerance(kwargs["cross_env"], f"{where}(cross_env=…)"))
    except ToleranceError as exc:
        raise SettingsError(str(exc)) from None
    if "runs" in kwargs and cli.get("repro_runs") is None:
        s = replace(s, runs=_int(kwargs["runs"], f"{where}(runs=…)", minimum=1))
    if "seed" in kwargs and cli.get("repro_seed") is None:
        s = replace(s, seed=_int(kwargs["seed"], f"{where}(seed=…)", minimum=0))
    if "deterministic" in kwargs and cli.get("repro_deterministic") is None:
        s = replace(s, deterministic=_bool(kwargs["deterministic"], f"{where}(deterministic=…)"))
    if "timeout" in kwargs and cli.get("repro_timeout") is None:
        s = replace(s, timeout=_float(kwargs["timeout"], f"{where}(timeout=…)"))
    if "device" in kwargs and cli.get("repro_device") is None:
        s = replace(s, device=_device(kwargs["device"], f"{where}(device=…)"))
    return s
