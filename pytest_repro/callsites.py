"""Read a test's source for repro.check calls that would share one name, before the first of them runs."""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_CHECKS = ("check", "check_resume")
_UNKNOWN = object()  # a name computed at run time: cannot clash as far as the source shows


@dataclass(frozen=True)
class _Call:
    line: int
    name: Any  # None, a literal, or _UNKNOWN
    branches: tuple[tuple[int, int], ...]  # (if/match node, branch taken) around the call
    in_loop: bool


def clashing_checks(test: Callable[..., Any], fixture: str = "repro") -> tuple[str | None, list[int]] | None:
    """Return the name and the lines of a test's repro.check/check_resume calls that can run with one name."""
    try:
        lines, first = inspect.getsourcelines(test)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError, ValueError):
        return None
    if not tree.body or not isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    calls: list[_Call] = []
    for statement in tree.body[0].body:
        _visit(statement, fixture, (), False, calls)
    for i, a in enumerate(calls):
        if a.name is _UNKNOWN:
            continue
        clashing = {a.line} if a.in_loop else set()
        clashing.update(b.line for b in calls[i + 1 :] if b.name == a.name and not _exclusive(a, b))
        if clashing:
            return a.name, sorted(line + first - 1 for line in clashing | {a.line})
    return None


def _exclusive(a: _Call, b: _Call) -> bool:
    """Whether two calls sit in different branches of one if/else or match: only one of them runs."""
    taken = dict(a.branches)
    return any(node in taken and taken[node] != branch for node, branch in b.branches)


def _name(call: ast.Call) -> Any:
    if any(k.arg is None for k in call.keywords) or any(isinstance(a, ast.Starred) for a in call.args):
        return _UNKNOWN  # **kwargs / *args: the name is not in the source
    given = next((k.value for k in call.keywords if k.arg == "name"), call.args[2] if len(call.args) > 2 else None)
    if given is None:
        return None
    return given.value if isinstance(given, ast.Constant) else _UNKNOWN


def _visit(node: ast.AST, fixture: str, branches: tuple[tuple[int, int], ...], loop: bool, out: list[_Call]) -> None:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
        return  # a nested function may run any number of times, or never
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in _CHECKS
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == fixture
    ):
        out.append(_Call(node.lineno, _name(node), branches, loop))
    if isinstance(node, (ast.If, ast.IfExp)):
        _visit(node.test, fixture, branches, loop, out)
        for k, part in enumerate((node.body, node.orelse)):
            for child in part if isinstance(part, list) else [part]:
                _visit(child, fixture, (*branches, (id(node), k)), loop, out)
        return
    if isinstance(node, ast.Match):
        _visit(node.subject, fixture, branches, loop, out)
        for k, case in enumerate(node.cases):
            for child in case.body:
                _visit(child, fixture, (*branches, (id(node), k)), loop, out)
        return
    if isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
        _visit(node.iter if isinstance(node, (ast.For, ast.AsyncFor)) else node.test, fixture, branches, loop, out)
        for child in node.body:
            _visit(child, fixture, branches, True, out)
        for child in node.orelse:
            _visit(child, fixture, branches, loop, out)
        return
    looping = loop or isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp))
    for sub in ast.iter_child_nodes(node):
        _visit(sub, fixture, branches, looping, out)
