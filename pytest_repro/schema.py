"""Validate a job config (mapping) against a declared dataclass schema, reporting every problem at once."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections import abc
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
    le: float | None = None,
    choices: tuple[Any, ...] | None = None,
    help: str = "",
) -> Any:
    """Declare a schema field with a default, optional bounds/choices, and a one-line help."""
    meta = {"gt": gt, "ge": ge, "lt": lt, "le": le, "choices": choices, "help": help}
    mutable = isinstance(default, (list, dict, set)) or (
        dataclasses.is_dataclass(default) and type(default).__hash__ is None  # a non-frozen dataclass instance
    )
    if mutable:
        value = default
        return dataclasses.field(default_factory=lambda: copy.deepcopy(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_SEQUENCES = (list, tuple, set, frozenset, abc.Sequence, abc.MutableSequence, abc.Set, abc.MutableSet)
_MAPPINGS = (dict, abc.Mapping, abc.MutableMapping)


def _type_name(tp: Any) -> str:
    """Return a readable name for an annotation: int, list of str, mapping of str to float, int or None."""
    if tp is Any or tp is object:
        return "any value"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if tp in _SEQUENCES or origin in _SEQUENCES:
        items = [a for a in args if a is not Ellipsis]
        return "a list" + (f" of {_type_name(items[0])}" if len(set(items)) == 1 else "")
    if tp in _MAPPINGS or origin in _MAPPINGS:
        return "a mapping" + (f" of {_type_name(args[0])} to {_type_name(args[1])}" if len(args) == 2 else "")
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({getattr(tp, '__name__', tp)})"
    return getattr(tp, "__name__", str(tp))


def _describe(tp: Any, meta: Mapping[str, Any]) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(map(repr, meta["choices"]))
    bounds = [
        f"{op} {meta[key]}"
        for key, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
        if meta.get(key) is not None
    ]
    return " ".join([_type_name(tp), " and ".join(bounds)]) if bounds else _type_name(tp)


def _check_scalar(value: Any, tp: Any, meta: Mapping[str, Any], path: str, problems: list[str]) -> Any:
    expected = _describe(tp, meta)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(tp, type):
        ok = isinstance(value, tp)
    else:
        ok = True  # an annotation this validator does not model (a TypeVar, a Protocol, ...): accept
    if not ok:
        problems.append(f"{path}: expected {expected}, got {value!r}")
        return value
    try:
        bad = (
            (meta.get("gt") is not None and not value > meta["gt"])
            or (meta.get("ge") is not None and not value >= meta["ge"])
            or (meta.get("lt") is not None and not value < meta["lt"])
            or (meta.get("le") is not None and not value <= meta["le"])
            or (meta.get("choices") is not None and value not in meta["choices"])
        )
    except TypeError:  # bounds on a value that has no order (e.g. a str field with gt=)
        bad = True
    if bad:
        problems.append(f"{path}: expected {expected}, got {value!r}")
    return value


def _check(value: Any, tp: Any, meta: Mapping[str, Any], path: str, problems: list[str]) -> Any:
    """Check ``value`` against annotation ``tp``; append each problem with its path; return the converted value.

    Bounds and choices (``meta``) apply to a scalar, or to each element of a list / value of a mapping.
    """
    if tp is Any or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _check(value, options[0], meta, path, problems)
        for option in options:  # the first alternative that accepts the value wins
            scratch: list[str] = []
            converted = _check(value, option, meta, path, scratch)
            if not scratch:
                return converted
        problems.append(f"{path}: expected {_describe(tp, meta)}, got {value!r}")
        return value
    if origin is typing.Literal:
        if value not in args:
            problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        return _validate(tp, value, f"{path}.", problems)
    if tp in _SEQUENCES or origin in _SEQUENCES:
        return _check_sequence(value, tp, origin or tp, args, meta, path, problems)
    if tp in _MAPPINGS or origin in _MAPPINGS:
        if not isinstance(value, Mapping):
            problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
            return value
        key_tp, value_tp = args if len(args) == 2 else (Any, Any)
        out: dict[Any, Any] = {}
        for key, item in value.items():
            out[_check(key, key_tp, {}, f"{path} key {key!r}", problems)] = _check(
                item, value_tp, meta, f"{path}.{key}", problems
            )
        return out
    return _check_scalar(value, tp, meta, path, problems)


def _check_sequence(
    value: Any, tp: Any, container: Any, args: tuple[Any, ...], meta: Mapping[str, Any], path: str, problems: list[str]
) -> Any:
    if not isinstance(value, (list, tuple, set, frozenset)):
        problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return value
    items = list(value)
    if container is tuple and args and Ellipsis not in args:  # tuple[int, str]: a fixed length, a type per slot
        if len(items) != len(args):
            problems.append(f"{path}: expected {len(args)} items ({', '.join(map(_type_name, args))}), got {value!r}")
            return value
        checked = [
            _check(v, a, meta, f"{path}[{i}]", problems) for i, (v, a) in enumerate(zip(items, args, strict=True))
        ]
    else:
        item_tp = args[0] if args else Any
        checked = [_check(v, item_tp, meta, f"{path}[{i}]", problems) for i, v in enumerate(items)]
    if container in (tuple,):
        return tuple(checked)
    if container in (set, abc.Set, abc.MutableSet):
        return set(checked)
    if container is frozenset:
        return frozenset(checked)
    return checked


def _hints(cls: type[Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as exc:
        raise TypeError(
            f"config schema {cls.__qualname__}: cannot resolve its annotations ({exc}); "
            "define the schema's dataclasses at module level and import every type they name"
        ) from exc


def _validate(cls: type[T], data: Any, path: str, problems: list[str]) -> T | None:
    if not isinstance(data, Mapping):
        problems.append(f"{path[:-1] or 'config'}: expected a mapping, got {data!r}")
        return None
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    before = len(problems)
    for key in data:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append(f"{path}{key}: unknown key{suggestion}; allowed: {', '.join(fields)}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{path}{name}: missing (required, {_describe(hints[name], f.metadata)})")
            continue
        values[name] = _check(data[name], hints[name], f.metadata, f"{path}{name}", problems)
    if len(problems) > before:
        return None
    return cls(**values)


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
