"""Finding reference folders that no collected test owns, and telling when a run was too filtered to know."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..record import RECORD_FILE
from ..storage import PLUGIN_FILES, reference_path

if TYPE_CHECKING:
    import pytest

    from ..session import ReproSession
    from ..settings import Settings
    from .base import Publication


def owned_prefixes(reference_dir: Path, nodeids: Iterable[str]) -> set[Path]:
    """Return the reference folders the given reproducible tests own (each with all its checks and environments)."""
    return {reference_path(reference_dir, nodeid) for nodeid in nodeids}


def find_unused(reference_dir: Path, owned: set[Path], scope: set[Path] | None = None) -> list[Path]:
    """Return reference folders (one per check and environment) under ``reference_dir`` that no owner covers.

    With ``scope``, only folders under one of those prefixes (the references of the paths the run collected).
    """
    if not reference_dir.is_dir():
        return []
    unused = []
    for record in sorted(reference_dir.rglob(RECORD_FILE)):
        folder = record.parent
        if any(part.startswith(".") for part in folder.relative_to(reference_dir).parts):
            continue  # staging/backup folders of an interrupted write
        if re.match(r"^rank\d+$", folder.name) and (folder.parent / RECORD_FILE).is_file():
            continue  # a rank of a reference recorded on several ranks
        if scope is not None and not any(folder.is_relative_to(prefix) for prefix in scope):
            continue  # not a path this run collected: unknown, not unused
        if not any(folder.is_relative_to(prefix) for prefix in owned):
            unused.append(folder)
    return unused


def delete(folders: Iterable[Path], reference_dir: Path) -> list[str]:
    """Remove the files pytest-repro wrote in unused reference folders, then folders left empty.

    Files the plugin did not write are kept (with their folders); their paths are returned.
    """
    kept: list[str] = []
    for folder in folders:
        for name in PLUGIN_FILES:
            with contextlib.suppress(FileNotFoundError):
                (folder / name).unlink()
        for ranks in folder.glob("rank*"):
            if re.match(r"^rank\d+$", ranks.name) and ranks.is_dir():
                delete([ranks], folder)
        left = sorted(p for p in folder.iterdir()) if folder.is_dir() else []
        if left:
            kept += [str(p.relative_to(reference_dir)) for p in left]
            continue
        folder.rmdir()
        parent = folder.parent
        while parent != reference_dir and parent.is_relative_to(reference_dir) and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    return kept


def check_unused(session: ReproSession, config: pytest.Config, mode: str) -> None:
    """Find (and per ``mode`` report, fail on or delete) unused references, only when the run saw every test."""
    reason = filter_reason(
        list(config.args),
        list(config.getini("testpaths")) or [str(config.rootpath)],
        config.option.keyword,
        bool(config.getoption("lf", False)),
        len(set(session.deselected_reproducible)),
        Path(config.invocation_params.dir),
        Path(config.rootpath),
    )
    if reason and not session.settings.unused_force:
        session.unused_note = (
            f"unused references not checked: the run was filtered ({reason}); "
            "run the whole suite, or add --repro-unused-force"
        )
        return
    unseen = sorted(set(session.not_collected))
    if unseen:
        shown = "; ".join(unseen[:5]) + (f"; and {len(unseen) - 5} more" if len(unseen) > 5 else "")
        session.unused_note = (
            f"unused references not checked: {len(unseen)} path(s) were not collected ({shown}); the references "
            "of tests that were not collected are unknown, not unused. Fix the collection errors (or run without "
            "the ignores/skips), then rerun with --repro-unused"
        )
        return
    reference_dir = session.settings.reference_dir
    root = Path(config.rootpath).resolve()
    scope = set()
    for arg in config.args:
        target = (Path(config.invocation_params.dir) / arg.split("::")[0]).resolve()
        if not target.is_relative_to(root):
            session.unused_note = f"unused references not checked: {arg} lies outside the rootdir {root}"
            return
        relative = target.relative_to(root)
        scope.add(reference_path(reference_dir, str(relative)) if relative.parts else reference_dir)
    owned = owned_prefixes(reference_dir, [*session.owned_nodeids, *session.deselected_reproducible])
    session.unused = find_unused(reference_dir, owned, scope)
    if session.unused and mode == "delete" and not reference_dir.resolve().is_relative_to(root):
        session.unused_note = (
            f"{len(session.unused)} unused reference folder(s) not deleted: repro_reference_dir ({reference_dir}) "
            f"lies outside the rootdir {root}; delete them by hand"
        )
        return
    count = len(session.unused)
    if session.unused and mode == "delete":
        session.unused_kept = delete(session.unused, reference_dir)
        kept = f"; kept {len(session.unused_kept)} file(s) pytest-repro did not write" if session.unused_kept else ""
        session.unused_note = f"deleted {count} unused reference folder(s){kept}"
    elif session.unused and mode == "fail":
        session.unused_note = (
            f"{count} unused reference folder(s): failing (--repro-unused=fail); remove them with --repro-unused=delete"
        )
    elif session.unused:
        session.unused_note = f"{count} unused reference folder(s); remove them with --repro-unused=delete"
    else:
        session.unused_note = "no unused references"


def filter_reason(
    args: list[str],
    default_args: list[str],
    keyword: str,
    lastfailed: bool,
    deselected_reproducible: int,
    invocation_dir: Path,
    rootdir: Path,
) -> str | None:
    """Say why this run cannot see every reproducible test (None when it can)."""
    if keyword:
        return f"-k {keyword!r}"
    if lastfailed:
        return "--lf"
    if deselected_reproducible:
        return f"{deselected_reproducible} reproducible test(s) deselected (-m/--deselect)"
    explicit = [a for a in args if not a.startswith("-")]
    if explicit and not _covers(explicit, default_args, invocation_dir, rootdir):
        return f"test paths given on the command line ({' '.join(explicit)})"
    return None


def _covers(explicit: list[str], default_args: list[str], invocation_dir: Path, rootdir: Path) -> bool:
    """Whether the paths given cover every default test path (testpaths, else the rootdir): a whole-suite run."""
    given = [(invocation_dir / a).resolve() for a in explicit if "::" not in a]  # a node id narrows the run
    defaults: list[Path] = []
    for arg in default_args:
        expanded = sorted(rootdir.glob(arg)) if any(c in arg for c in "*?[") else [rootdir / arg]
        defaults += [p.resolve() for p in expanded]
    return bool(defaults) and all(any(d.is_relative_to(g) for g in given) for d in defaults)


class UnusedReferences:
    """--repro-unused: after a full run, report, fail on or delete the reference folders no collected test owns."""

    def problems(self, settings: Settings, config: pytest.Config) -> list[str]:
        """None: the option's values are argparse choices."""
        return []

    def publish(self, run: Publication, exitstatus: int) -> int | None:
        """Check for unused references; with --repro-unused=fail, any found fails the run."""
        import pytest

        mode = run.session.settings.unused
        if not mode:
            return None
        check_unused(run.session, run.config, mode)
        return pytest.ExitCode.TESTS_FAILED if run.session.unused and mode == "fail" else None
