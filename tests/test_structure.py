"""The house's rules, checked on the source (ast): import cycles, the process boundary, judging, light start-up.

Imports are read statically. "Module-level" imports include those under ``if TYPE_CHECKING:`` (a type-only
cycle is still a cycle: it makes the two modules one unit); imports inside functions are lazy by intent and
count only for the rules that say "imports" outright (the job-process side, ``_judge`` and pytest).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pytest_repro"
HEAVY = ("torch", "numpy", "transformers", "peft", "safetensors", "deepdiff", "scipy", "matplotlib", "mlflow", "wandb")
# What runs in the job process before the user's job: it must not drag the pytest side in.
JOB_SIDE = ("pytest_repro._exec.child", "pytest_repro._exec.worker")
JOB_SIDE_MAY_IMPORT = (
    "pytest_repro",  # the package's __init__ (public names, lazily resolved)
    "pytest_repro.context",
    "pytest_repro.manifest",  # the environment is collected in the job process
    "pytest_repro.record",
    "pytest_repro.tensorfile",
    "pytest_repro.seeding",
    "pytest_repro._exec",
    "pytest_repro._exec.child",
    "pytest_repro._exec.procs",
    "pytest_repro._exec.protocol",
    "pytest_repro._exec.preimport",  # the worker: importing its preload list
    "pytest_repro._exec.serve",  # the worker: its server loop
    "pytest_repro._exec.daemon_files",  # the daemon: its files, the sources it imported
    "pytest_repro._exec.trace",
    "pytest_repro._exec.perturb",  # noise-floor runs: perturbed rounding and random streams
    "pytest_repro._exec.ops",  # diagnosis: the op tracer
    "pytest_repro._exec.distributed",
)


@dataclass
class Module:
    name: str
    path: Path
    top: set[str] = field(default_factory=set)  # imported at module level (TYPE_CHECKING included)
    lazy: set[str] = field(default_factory=set)  # imported inside functions
    typing: set[str] = field(default_factory=set)  # the part of top imported only under TYPE_CHECKING


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, module: str, is_package: bool, known: set[str]) -> tuple[set[str], set[str], set[str]]:
    """(module-level imports incl. TYPE_CHECKING, imports inside functions, TYPE_CHECKING-only imports)."""
    top: set[str] = set()
    lazy: set[str] = set()
    typing: set[str] = set()

    def visit(node: ast.AST, in_function: bool, in_typing: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names: set[str] = set()
            if isinstance(child, ast.Import):
                names = {alias.name for alias in child.names}
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(module, is_package, child)
                # `from . import record` imports the submodule pytest_repro.record
                names = {base} | {f"{base}.{a.name}" for a in child.names if f"{base}.{a.name}" in known}
            (lazy if in_function else top).update(names)
            if in_typing and not in_function:
                typing.update(names)
            visit(child, inner, in_typing or _is_type_checking(child))

    visit(tree, False, False)
    return top, lazy, typing


def _load() -> dict[str, Module]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {_module_name(p) for p in paths}
    modules: dict[str, Module] = {}
    for path in paths:
        name = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        top, lazy, typing = _imports(tree, name, path.name == "__init__.py", known)
        modules[name] = Module(name, path, top, lazy, typing)
    return modules


MODULES = _load()


def _internal(names: set[str]) -> set[str]:
    return {n for n in names if n in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _graph() -> dict[str, set[str]]:
    # A package's __init__ is imported by each of its submodules: leave that edge out, keep the rest.
    return {
        m.name: {d for d in _internal(m.top) if not m.name.startswith(d + ".")} - {m.name} for m in MODULES.values()
    }


def test_no_import_cycles() -> None:
    assert cycles(_graph()) == []


def test_the_cycle_check_catches_a_type_only_cycle() -> None:
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n"
    top, _, typing = _imports(ast.parse(source), "pkg.a", False, {"pkg.a", "pkg.b"})
    assert "pkg.b" in top and "pkg.b" in typing
    assert cycles({"pkg.a": top & {"pkg.b"}, "pkg.b": {"pkg.a"}}) == [["pkg.a", "pkg.b"]]
    assert cycles({"pkg.a": {"pkg.b"}, "pkg.b": set()}) == []


@pytest.mark.parametrize("name", [n for n in JOB_SIDE if n in MODULES] or ["(none)"])
def test_the_job_process_side_imports_only_what_it_may(name: str) -> None:
    module = MODULES.get(name)
    assert module is not None, f"{name} is missing: update JOB_SIDE in {Path(__file__).name}"
    ours = {n for n in module.top | module.lazy if n == "pytest_repro" or n.startswith("pytest_repro.")}
    assert sorted(ours - set(JOB_SIDE_MAY_IMPORT)) == []
    assert "pytest" not in {n.split(".")[0] for n in module.top | module.lazy}


def test_judging_never_imports_pytest() -> None:
    judges = [m for m in MODULES.values() if m.name.startswith("pytest_repro._judge")]
    assert judges
    offenders = {m.name for m in judges if {"pytest", "_pytest"} & {n.split(".")[0] for n in m.top | m.lazy}}
    assert offenders == set()


def test_nothing_heavy_is_imported_when_the_plugin_loads() -> None:
    seen: dict[str, str] = {}  # module -> the module that first imported it
    todo = ["pytest_repro.plugin", "pytest_repro"]
    while todo:
        name = todo.pop()
        for dep in sorted(MODULES[name].top - MODULES[name].typing):  # what runs on import
            parts = dep.split(".")
            # importing pytest_repro.a.b runs pytest_repro/__init__ and pytest_repro/a/__init__ too
            chain = [".".join(parts[: i + 1]) for i in range(len(parts))]
            for step in chain:
                if step not in seen:
                    seen[step] = name
                    if step in MODULES:
                        todo.append(step)
    heavy = {dep: by for dep, by in seen.items() if dep.split(".")[0] in HEAVY}
    assert heavy == {}, "module-level imports of heavy libraries reached from the plugin (library: importer)"


DOWNSTREAM = ("pytest_repro.plugin", "pytest_repro.fixture", "pytest_repro.check", "pytest_repro.runs")


@pytest.mark.parametrize("layer", ["pytest_repro._exec", "pytest_repro._judge"])
def test_data_flows_one_way(layer: str) -> None:
    """Running and judging never reach back into the pytest side, publishing or the CLI (lazily neither)."""
    later = (*DOWNSTREAM, "pytest_repro._publish", "pytest_repro._cli", "pytest_repro.cli")
    back = {
        m.name: sorted(d for d in m.top | m.lazy if any(d == x or d.startswith(x + ".") for x in later))
        for m in MODULES.values()
        if m.name.startswith(layer)
    }
    assert {name: deps for name, deps in back.items() if deps} == {}


def test_publishing_never_imports_the_cli() -> None:
    """The CLI reads what publishing wrote (bundles, history), never the other way round."""
    back = {
        m.name: sorted(d for d in m.top | m.lazy if d.startswith(("pytest_repro._cli", "pytest_repro.cli")))
        for m in MODULES.values()
        if m.name.startswith("pytest_repro._publish")
    }
    assert {name: deps for name, deps in back.items() if deps} == {}
