"""The option table's building blocks: one row (:class:`Option`), and the parsers of option values.

A parser takes (value, where it was set) and returns the typed value, or raises :class:`SettingsError`
naming where (``--repro-runs``, ``repro_runs`` or ``@pytest.mark.reproducible(runs=…)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._judge.tolerances import ToleranceError, ToleranceSpec, parse_tolerance

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
    marker_metavar: str = "..."  # how the keyword's value is shown in `pytest --markers`
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


def int_at_least(minimum: int) -> Parse:
    """An integer >= minimum."""

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


def optional_int(minimum: int) -> Parse:
    """None, or an integer >= minimum."""
    plain = int_at_least(minimum)
    return lambda value, where: None if value is None else plain(value, where)


def seconds(value: Any, where: str) -> float:
    """A finite number of seconds > 0."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{where}: expected a number of seconds, got {value!r}") from None
    if not (number > 0 and math.isfinite(number)):
        raise SettingsError(f"{where}: expected a finite number of seconds > 0, got {value!r}")
    return number


def boolean(value: Any, where: str) -> bool:
    """true/false (also 1/0, yes/no, on/off)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise SettingsError(f"{where}: expected true or false, got {value!r}")


def device_name(value: Any, where: str) -> str:
    """auto, cpu, cuda or cuda:N."""
    text = str(value).strip()
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise SettingsError(f"{where}: expected auto, cpu, cuda or cuda:N, got {value!r}")


def choice(*choices: str) -> Parse:
    """One of the given words."""

    def parse(value: Any, where: str) -> str:
        text = str(value).strip()
        if text not in choices:
            raise SettingsError(f"{where}: expected one of {', '.join(choices)}, got {value!r}")
        return text

    return parse


def isolation(value: Any, where: str) -> str:
    """auto, fork or spawn."""
    if value not in ("auto", "fork", "spawn"):
        raise SettingsError(f"{where}: expected auto, fork or spawn, got {value!r}")
    return str(value)


def parallel(value: Any, where: str) -> int:
    """repro_parallel_runs: auto (0) or an integer >= 1."""
    if value is None or str(value).strip().lower() in ("", "auto"):
        return 0
    try:
        return int(int_at_least(1)(value, where))
    except SettingsError:
        raise SettingsError(
            f"{where}: expected auto or an integer >= 1 (1 runs a check's runs one after the other), got {value!r}"
        ) from None


def tolerance(value: Any, where: str) -> ToleranceSpec:
    """A tolerance: a name or a map (a marker's value), or the text of an ini option (a name or a YAML map)."""
    import yaml

    try:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("{") else value.strip()
        return parse_tolerance(value, where)
    except (yaml.YAMLError, ToleranceError) as exc:
        raise SettingsError(str(exc)) from None


def marker_tolerance(value: Any, where: str) -> ToleranceSpec:
    """A marker's tolerance: a name or a map, as written in Python (no YAML text)."""
    if value is None:
        return ToleranceSpec()
    try:
        return parse_tolerance(value, where)
    except ToleranceError as exc:
        raise SettingsError(str(exc)) from None


def text(value: Any, where: str) -> str | None:
    """Any text (None when not given)."""
    return None if value is None else str(value)


def present(value: Any, where: str) -> bool:
    """Whether a store_true flag was given."""
    return bool(value)


def names(value: Any, where: str) -> tuple[str, ...]:
    """The lines of a linelist option."""
    return tuple(value or ())


def path(value: Any, where: str) -> Path:
    """A path, as given (made absolute against the rootdir by base_settings)."""
    return Path(str(value))


def regen(value: Any, where: str) -> str | None:
    """--repro-regen: all or missing (None when not given)."""
    if value not in (None, "all", "missing"):
        raise SettingsError(f"--repro-regen={value}: expected all or missing (e.g. --repro-regen=missing)")
    return None if value is None else str(value)


@dataclass(frozen=True)
class Switch:
    """An off/on/value option (--repro-mlflow, --repro-wandb): value None when off, "" when on without a value."""

    value: str | None
    where: str  # as the user wrote it: "--repro-mlflow=URI" or "repro_mlflow = URI"


_OFF = ("0", "false", "no", "off")


def switch(*on: str) -> Parse:
    """An off/on/value option; ``on`` lists the words that mean on without a value."""

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
