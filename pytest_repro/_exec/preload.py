"""What the warm worker should import before forking, found without being told.

- Statically: the import statements (top-level and inside functions) of a job's module, of the
  user's own modules it imports, and of the test modules that hold reproducible tests, read with
  ``ast`` (never imported), resolved to installed distributions.
- From runs: what a run's child imported that the worker did not have (``child.IMPORTS_FILE``).
- Across sessions: the list is kept in pytest's cache (``repro/preload``), so that the next
  session's worker imports it while pytest collects.

Never preloaded: the user's own modules (anything under the rootdir or a test's folder that is not
in site-packages, or not from an installed distribution), the job's own package, the standard library.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import pytest

    from ..context import JobRef

CACHE_KEY = "repro/preload"
MAX_ENTRIES = 20000  # a cache entry larger than this is ignored (not a list of modules any more)
_MAX_FILES = 200  # user modules followed per scan
_MAX_DEPTH = 4  # how far imports of user modules are followed


DISTRIBUTIONS_KEY = "repro/distributions"
_DISTS: frozenset[str] | None = None
_DISTS_DIGEST = ""  # the packages digest _DISTS was read under ("" when unknown)


def _distributions() -> frozenset[str]:
    """Top-level import names provided by installed distributions (reading them all takes ~1 s)."""
    global _DISTS
    if _DISTS is None:
        import importlib.metadata

        _DISTS = frozenset(importlib.metadata.packages_distributions())
    return _DISTS


def distributions_cached(cache: Any) -> None:
    """Take the distributions' import names from pytest's cache while the packages are unchanged; else store them."""
    global _DISTS, _DISTS_DIGEST
    from .daemon_key import packages_digest

    digest = packages_digest()
    try:
        value = cache.get(DISTRIBUTIONS_KEY, None)
    except Exception:  # an unreadable cache costs only speed
        value = None
    names = value.get("names") if isinstance(value, dict) and value.get("digest") == digest else None
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        _DISTS, _DISTS_DIGEST = frozenset(names), digest
        return
    if digest != _DISTS_DIGEST:  # read them again (once per process while the packages stay as they are)
        _DISTS = None
    _DISTS_DIGEST = digest
    with contextlib.suppress(Exception):
        cache.set(DISTRIBUTIONS_KEY, {"digest": digest, "names": sorted(_distributions())})


@functools.cache
def _site_dirs() -> tuple[Path, ...]:
    import site
    import sysconfig

    dirs = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    dirs |= set(site.getsitepackages()) | {site.getusersitepackages()}
    return tuple(Path(d).resolve() for d in dirs if d)


def _under(path: Path, folders: Iterable[Path]) -> bool:
    return any(path == f or f in path.parents for f in folders)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_in(tree: ast.AST) -> list[tuple[str, tuple[str, ...], int]]:
    """Every import statement in the tree, at any depth: (module, imported names, relative level).

    ``import a.b`` gives ("a.b", (), 0); ``from a import b, c`` gives ("a", ("b", "c"), 0); imports
    under ``if TYPE_CHECKING:`` are left out (they never run).
    """
    found: list[tuple[str, tuple[str, ...], int]] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            found += [(alias.name, (), 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = tuple(a.name for a in node.names if a.name != "*")
            found.append((node.module or "", names, node.level))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack += reversed(node.orelse)
            continue
        stack += reversed(list(ast.iter_child_nodes(node)))
    return found


def job_names(tree: ast.AST) -> set[str]:
    """Names a test passes as the job to ``repro.check``/``check_resume`` (first argument or ``job=``)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        func = node.func if isinstance(node, ast.Call) else None
        if isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and func.attr in ("check", "check_resume"):
            args = [*node.args[:1], *(k.value for k in node.keywords if k.arg == "job")]
            names |= {a.id for a in args if isinstance(a, ast.Name)}
    return names


class Preloads:
    """Decides which modules the warm worker may import, from job sources and from what runs imported."""

    def __init__(self, roots: Sequence[Path]) -> None:
        self.roots: list[Path] = []
        for root in roots:
            self.add_root(root)
        self._third_party: dict[str, bool] = {}
        self._scanned: dict[tuple[Path, bool], list[str]] = {}
        self.job_packages: set[str] = set()  # top-level packages holding jobs: never preloaded

    def add_root(self, folder: Path) -> None:
        """Treat everything under ``folder`` (outside site-packages) as the user's own code."""
        folder = Path(folder).resolve()
        if folder not in self.roots:
            self.roots.append(folder)

    def _is_user_path(self, path: Path) -> bool:
        path = path.resolve()
        return _under(path, self.roots) and not _under(path, _site_dirs())

    def third_party(self, top: str) -> bool:
        """Whether the top-level module ``top`` comes from an installed distribution and is not the user's code."""
        known = self._third_party.get(top)
        if known is not None:
            return known
        ok = False
        stdlib = top in sys.stdlib_module_names or top in sys.builtin_module_names
        if top and not stdlib and top in _distributions():
            try:
                spec = importlib.util.find_spec(top)  # a top-level name: imports nothing
            except (ImportError, ValueError):
                spec = None
            if spec is not None:
                places = [spec.origin] if spec.origin and spec.origin not in ("built-in", "frozen") else []
                places += list(spec.submodule_search_locations or [])
                ok = bool(places) and not any(self._is_user_path(Path(p)) for p in places)
        self._third_party[top] = ok
        return ok

    # ------------------------------------------------------------ static

    def _user_file(self, module: str, sys_path: Sequence[str]) -> Path | None:
        """The source file of one of the user's own modules, found without importing it."""
        loaded = sys.modules.get(module)
        candidates: list[Path] = []
        file = getattr(loaded, "__file__", None)
        if file:
            candidates.append(Path(file))
        parts = module.split(".")
        for entry in sys_path:
            base = Path(entry or ".").joinpath(*parts)
            candidates += [base.with_suffix(".py"), base / "__init__.py"]
        for path in candidates:
            if path.suffix == ".py" and path.is_file() and self._is_user_path(path):
                return path
        return None

    def scan(
        self, files: Iterable[Path], sys_path: Sequence[str] | None = None, exclude: str = "", tests: bool = False
    ) -> list[str]:
        """Third-party entries ("module" or "module:name") imported by the files and the user modules they import.

        ``exclude``: a top-level package never to preload (the job's own). ``tests``: the files are test
        modules, whose jobs (what they pass to ``repro.check``) are followed but never preloaded.
        """
        paths = list(sys.path) if sys_path is None else list(sys_path)
        out: dict[str, None] = {}
        seen: set[Path] = set()
        todo = [(Path(f), 0) for f in files]
        while todo and len(seen) < _MAX_FILES:
            file, depth = todo.pop(0)
            file = file.resolve()
            if file in seen:
                continue
            seen.add(file)
            for entry in self._scan_file(file, tests and depth == 0):
                if entry.startswith("@"):  # one of the user's own modules: follow it
                    found = self._user_file(entry[1:], [str(file.parent), *paths]) if depth < _MAX_DEPTH else None
                    if found is not None:
                        todo.append((found, depth + 1))
                    continue
                top = entry.partition(":")[0].partition(".")[0]
                if top != exclude and top not in self.job_packages:
                    out.setdefault(entry, None)
        return list(out)

    def _scan_file(self, file: Path, test: bool) -> list[str]:
        """Entries of one file: third-party ones, and "@module" for imports of the user's own modules."""
        key = (file, test)
        if key in self._scanned:
            return self._scanned[key]
        entries: list[str] = []
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            tree = ast.Module(body=[], type_ignores=[])
        jobs = job_names(tree) if test else set()
        package = self._package_of(file)
        for module, names, level in imports_in(tree):
            if level:  # relative: always the user's own package
                if package is None:
                    continue
                parts = package.split(".")
                module = ".".join([*parts[: len(parts) - (level - 1)], *([module] if module else [])])
                entries += [f"@{module}.{n}" for n in names] + [f"@{module}"]
                continue
            top = module.partition(".")[0]
            if top in sys.stdlib_module_names or top in sys.builtin_module_names:
                continue
            if self.third_party(top) and not jobs.intersection(names):
                entries += [f"{module}:{n}" for n in names] if names else [module]
            else:  # the user's own module (or a job: scanned for what it imports, never preloaded itself)
                entries += [f"@{module}.{n}" for n in names] + [f"@{module}"]
        self._scanned[key] = entries
        return entries

    @staticmethod
    def _package_of(file: Path) -> str | None:
        """The dotted package a file belongs to, from the __init__.py files above it (None outside packages)."""
        parts: list[str] = []
        folder = file.parent
        while (folder / "__init__.py").is_file():
            parts.insert(0, folder.name)
            folder = folder.parent
        return ".".join(parts) or None

    def for_job(self, ref: JobRef, test_dir: Path | None = None) -> list[str]:
        """What the job's module imports (top-level and inside functions), for the worker to preload."""
        if test_dir is not None:
            self.add_root(test_dir)
        self.job_packages.add(ref.module.partition(".")[0])
        file = ref.file or getattr(sys.modules.get(ref.module), "__file__", None)
        if not file or not str(file).endswith(".py") or not Path(file).is_file():
            return []
        return self.scan([Path(file)], exclude=ref.module.partition(".")[0])

    def tests(self, files: Sequence[Path]) -> list[str]:
        """What the test modules (and the user modules they import, their jobs included) import."""
        for file in files:
            self.add_root(Path(file).parent)
        return self.scan(files, tests=True)

    def keep(self, entries: Iterable[str]) -> list[str]:
        """Drop entries in a job's package (found after they were wanted): what is safe to persist."""
        return [e for e in entries if e.partition(":")[0].partition(".")[0] not in self.job_packages]

    # ------------------------------------------------------------ learned

    def learned(self, names: Sequence[str], job_module: str) -> list[str]:
        """Filter a child's report of what it imported down to preloadable modules, in import order.

        Keeps third-party modules outside the job's own package, and of those only the ones no other
        reported module lies below (importing ``a.b.c`` imports ``a`` and ``a.b``).
        """
        self.job_packages.add(job_module.partition(".")[0])
        keep = [
            n for n in names if n.partition(".")[0] not in self.job_packages and self.third_party(n.partition(".")[0])
        ]
        parents = {n.rsplit(".", i)[0] for n in keep for i in range(1, n.count(".") + 1)}
        return [n for n in keep if n not in parents]


def load_cached(cache: Any) -> list[str]:
    """The preload list a previous session left in pytest's cache (empty when absent or malformed)."""
    try:
        value = cache.get(CACHE_KEY, None)
    except Exception:  # an unreadable cache costs only speed
        return []
    entries = value.get("modules") if isinstance(value, dict) else None
    if not isinstance(entries, list) or len(entries) > MAX_ENTRIES:
        return []
    return [e for e in entries if isinstance(e, str) and e and not e.startswith("@")]


def save_cached(cache: Any, entries: Sequence[str], drop: Iterable[str] = ()) -> bool:
    """Merge ``entries`` into the cached preload list, less ``drop`` (failed to import); return whether it changed.

    Merged, not replaced: xdist workers each save what they learned.
    """
    current = load_cached(cache)
    dropped = set(drop)
    merged = list(dict.fromkeys([*(e for e in current if e not in dropped), *entries]))[:MAX_ENTRIES]
    if merged == current:
        return False
    try:
        cache.set(CACHE_KEY, {"modules": merged, "python": sys.executable})
    except Exception:  # e.g. a read-only checkout: next session just learns again
        return False
    return True


class Preloader(Protocol):
    """What CollectionScan needs of the session (``session.ReproSession`` is one): no import of it here."""

    def preload_tests(self, files: Sequence[Path]) -> None:
        """Send the warm worker what the test modules (and their jobs) import."""


class CollectionScan:
    """A pytest plugin object: once collection is done, preload what the reproducible tests' modules import."""

    def __init__(self, session: Preloader) -> None:
        self.session = session

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Scan the files of the collected reproducible tests and send what they import to the warm worker."""
        from ..settings import MARKER

        files = {Path(str(item.path)) for item in session.items if item.get_closest_marker(MARKER) is not None}
        if files:
            self.session.preload_tests(sorted(files))
