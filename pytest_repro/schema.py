"""Validate a job config (mapping) against a declared dataclass schema, reporting every problem at once."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config with one or more problems, each naming its path."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} has {len(problems)} problem(s):\n{lines}")


def field(
    default: Any = dataclasses.MISSING,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    choices: tuple[Any, ...] | None = None,
    help: str = "",
) -> Any:
    """Declare a schema field with a default, optional bounds/choices, and a one-line help."""
    meta = {"gt": gt, "ge": ge, "lt": lt, "choices": choices, "help": help}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _describe(tp: Any, meta: Mapping[str, Any]) -> str:
    text = _type_name(tp)
    if meta.get("gt") is not None:
        text += f" > {meta['gt']}"
    if meta.get("ge") is not None:
        text += f" >= {meta['ge']}"
    if meta.get("lt") is not None:
        text += f" < {meta['lt']}"
    if meta.get("choices"):
        text = "one of " + ", ".join(map(repr, meta["choices"]))
    return text


def _check_scalar(value: Any, tp: Any, meta: Mapping[str, Any], path: str, problems: list[str]) -> Any:
    expected = _describe(tp, meta)
    ok = False
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    if not ok:
        problems.append(f"{path}: expected {expected}, got {value!r}")
        return value
    bad = (
        (meta.get("gt") is not None and not value > meta["gt"])
        or (meta.get("ge") is not None and not value >= meta["ge"])
        or (meta.get("lt") is not None and not value < meta["lt"])
        or (meta.get("choices") is not None and value not in meta["choices"])
    )
    if bad:
        problems.append(f"{path}: expected {expected}, got {value!r}")
    return value


def _validate(cls: type[T], data: Any, path: str, problems: list[str]) -> T | None:
    if not isinstance(data, Mapping):
        problems.append(f"{path or 'config'}: expected a mapping, got {data!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append(f"{path}{key}: unknown key{suggestion}; allowed: {', '.join(fields)}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            continue
        tp, value, where = hints[name], data[name], f"{path}{name}"
        if dataclasses.is_dataclass(tp):
            values[name] = _validate(tp, value, f"{where}.", problems)  # type: ignore[arg-type]
        elif typing.get_origin(tp) in (list, tuple):
            (item_tp, *_) = typing.get_args(tp)
            if not isinstance(value, (list, tuple)):
                problems.append(f"{where}: expected a list of {_type_name(item_tp)}, got {value!r}")
            else:
                values[name] = [_check_scalar(v, item_tp, {}, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        else:
            values[name] = _check_scalar(value, _unoptional(tp), f.metadata, where, problems)
    if problems:
        return None
    return cls(**values)


def _unoptional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def validate(cls: type[T], data: Mapping[str, Any] | None, source: str = "config") -> T:
    """Build ``cls`` from ``data``; raise ConfigError listing every unknown key, wrong type or bad value."""
    problems: list[str] = []
    result = _validate(cls, data or {}, "", problems)
    if problems or result is None:
        raise ConfigError(problems or ["invalid config"], source)
    return result


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(data, Mapping) and data:
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
    elif prefix:
        out[prefix[:-1]] = data
    return out


def effective_config(cls: type[Any] | None, user: Mapping[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """Return every effective config field as {path: {"value", "source"}}: default, user:<source> or derived.

    With a schema (a dataclass), fields the user left out are tagged ``default``; a schema method
    ``derived(self) -> dict`` adds computed fields tagged ``derived``. Without one, the user's keys are all.
    """
    given = _flatten(user)
    out = {path: {"value": value, "source": f"user:{source}"} for path, value in given.items()}
    if cls is None:
        return out
    instance = validate(cls, user)
    for path, value in _flatten(dataclasses.asdict(instance)).items():
        if path not in out:
            out[path] = {"value": value, "source": "default"}
    derive = getattr(instance, "derived", None)
    if callable(derive):
        for path, value in _flatten(derive()).items():
            out[path] = {"value": value, "source": "derived"}
    return dict(sorted(out.items()))
