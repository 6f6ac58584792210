"""The option table (settings.Settings): every option is registered, read and overridden the same way."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_repro.settings import MARKER_KWARGS, OPTIONS, Settings, SettingsError, apply_marker, base_settings

PACKAGE = Path(__file__).resolve().parent.parent / "pytest_repro"
INI_DEFAULTS = {o.ini: o.default for o in OPTIONS if o.ini}


def test_every_flag_and_ini_option_of_the_table_is_registered_with_pytest(pytester: pytest.Pytester) -> None:
    config = pytester.parseconfig()
    for option in OPTIONS:
        if option.dest:
            assert config.getoption(option.dest) in (None, False), option.flag
        if option.ini:
            assert config.getini(option.ini) == option.default, option.ini
    flags = [o.flag for o in OPTIONS if o.flag]
    assert len(flags) == len(set(flags)) and "--repro" in flags


def test_every_option_the_code_reads_is_in_the_table() -> None:
    """A flag read with getoption/getini but never registered (it happened once) fails here, by name."""
    known = {o.dest for o in OPTIONS if o.dest} | {o.ini for o in OPTIONS if o.ini}
    read: dict[str, str] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("getoption", "getini")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and str(node.args[0].value).startswith("repro")
            ):
                read[str(node.args[0].value)] = path.name
    assert {name: where for name, where in read.items() if name not in known} == {}


def test_the_defaults_of_settings_are_those_of_the_ini_options(tmp_path: Path) -> None:
    from_ini = base_settings(INI_DEFAULTS, {}, tmp_path)
    assert from_ini == Settings(reference_dir=tmp_path / "reference_outputs")


def test_marker_keywords_come_from_the_table_in_their_documented_order() -> None:
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    line = next(x for x in readme.splitlines() if x.startswith("Marker: `@pytest.mark.reproducible("))
    documented = [part.split("=")[0].strip() for part in line.split("(", 1)[1].split(")")[0].split(",")]
    assert tuple(documented) == MARKER_KWARGS
    assert MARKER_KWARGS[:3] == ("tolerance", "cross_env", "runs")  # the most used first, as error messages list them


@given(
    ini=st.integers(1, 50),
    flag=st.one_of(st.none(), st.integers(1, 50)),
    marker=st.one_of(st.none(), st.integers(1, 50)),
)
def test_a_flag_wins_over_the_marker_which_wins_over_the_ini_option(
    ini: int, flag: int | None, marker: int | None
) -> None:
    cli: dict[str, Any] = {"repro_runs": None if flag is None else str(flag)}
    base = base_settings({**INI_DEFAULTS, "repro_runs": str(ini)}, cli, Path("/r"))
    kwargs = {} if marker is None else {"runs": marker}
    runs = apply_marker(base, kwargs, cli).runs
    assert runs == (flag if flag is not None else marker if marker is not None else ini)


def test_a_marker_seed_yields_to_the_seed_flag() -> None:
    base = base_settings(INI_DEFAULTS, {"repro_seed": "7"}, Path("/r"))
    assert apply_marker(base, {"seed": 3}, {"repro_seed": "7"}).seed is None
    assert apply_marker(base, {"seed": 3}, {}).seed == 3


@pytest.mark.parametrize(
    ("ini", "cli", "says"),
    [
        ({"repro_runs": "0"}, {}, "repro_runs: expected an integer >= 1, got 0"),
        ({}, {"repro_runs": "x"}, "--repro-runs: expected an integer, got 'x'"),
        ({"repro_timeout": "inf"}, {}, "repro_timeout: expected a finite number of seconds > 0, got 'inf'"),
        ({"repro_config_audit": "loud"}, {}, "repro_config_audit: expected one of warn, fail, off, got 'loud'"),
        ({}, {"repro_isolation": "thread"}, "--repro-isolation: expected auto, fork or spawn, got 'thread'"),
    ],
)
def test_a_bad_value_names_where_it_was_set(ini: dict[str, str], cli: dict[str, str], says: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(says)):
        base_settings({**INI_DEFAULTS, **ini}, cli, Path("/r"))


def test_switch_options_say_where_they_were_switched_on(tmp_path: Path) -> None:
    on = base_settings({**INI_DEFAULTS, "repro_mlflow": "true"}, {}, tmp_path).mlflow
    assert (on.value, on.where) == ("", "repro_mlflow = true")
    uri = base_settings(INI_DEFAULTS, {"repro_mlflow": "http://x:5000"}, tmp_path).mlflow
    assert (uri.value, uri.where) == ("http://x:5000", "--repro-mlflow=http://x:5000")
    off = base_settings({**INI_DEFAULTS, "repro_wandb": "true"}, {"repro_wandb": "off"}, tmp_path).wandb
    assert off.value is None


def test_the_readme_documents_every_flag_and_ini_option() -> None:
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Options\n", 1)[1].split("\n## ", 1)[0]
    named = {o.flag for o in OPTIONS if o.flag} | {o.ini for o in OPTIONS if o.ini} | set(MARKER_KWARGS)
    assert sorted(name for name in named if f"`{name}" not in section and f"{name}=" not in section) == []


def test_a_marker_seed_must_be_an_integer() -> None:
    base = base_settings(INI_DEFAULTS, {}, Path("/r"))
    with pytest.raises(
        SettingsError, match=re.escape("@pytest.mark.reproducible(seed=…): expected an integer, got None")
    ):
        apply_marker(base, {"seed": None}, {})
