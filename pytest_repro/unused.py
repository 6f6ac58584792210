"""Finding reference folders that no collected test owns, and telling when a run was too filtered to know."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from .record import RECORD_FILE
from .storage import reference_path


def owned_prefixes(reference_dir: Path, nodeids: Iterable[str]) -> set[Path]:
    """Return the reference folders the given reproducible tests own (each with all its checks and environments)."""
    return {reference_path(reference_dir, nodeid) for nodeid in nodeids}


def find_unused(reference_dir: Path, owned: set[Path]) -> list[Path]:
    """Return reference folders (one per check and environment) under ``reference_dir`` that no owner covers."""
    if not reference_dir.is_dir():
        return []
    unused = []
    for record in sorted(reference_dir.rglob(RECORD_FILE)):
        folder = record.parent
        if any(part.startswith(".") for part in folder.relative_to(reference_dir).parts):
            continue  # staging/backup folders of an interrupted write
        if not any(folder.is_relative_to(prefix) for prefix in owned):
            unused.append(folder)
    return unused


def delete(folders: Iterable[Path], reference_dir: Path) -> None:
    """Remove unused reference folders, then any parent folders left empty (never ``reference_dir`` itself)."""
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        parent = folder.parent
        while parent != reference_dir and parent.is_relative_to(reference_dir) and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent


def filter_reason(
    args: list[str], default_args: list[str], keyword: str, lastfailed: bool, deselected_reproducible: int
) -> str | None:
    """Say why this run cannot see every reproducible test (None when it can)."""
    if keyword:
        return f"-k {keyword!r}"
    if lastfailed:
        return "--lf"
    if deselected_reproducible:
        return f"{deselected_reproducible} reproducible test(s) deselected (-m/--deselect)"
    explicit = [a for a in args if not a.startswith("-")]
    if explicit and sorted(_norm(a) for a in explicit) != sorted(_norm(a) for a in default_args):
        return f"test paths given on the command line ({' '.join(explicit)})"
    return None


def _norm(arg: str) -> str:
    return re.sub(r"/+$", "", arg) or "."
