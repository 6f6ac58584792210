"""Writing the reference store: stage a reference beside its folder, then swap it in or discard it."""

from __future__ import annotations

import errno
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from .record import DIGESTS_FILE, Record, dump_json, load_record, save_record, write_text_atomic
from .storage import MANIFEST_FILE, PLUGIN_FILES, PROVENANCE_FILE, locked, removal_fix, remove_tree

# Run details that change on every run and so do not belong in a diffable reference record.
VOLATILE_META = ("wall_s", "run_index")
_RANK_DIR = re.compile(r"^rank\d+$")  # the records of ranks 1..N-1 of a job on several ranks


def not_removable(folder: Path) -> Path | None:
    """Return the first folder of a tree whose entries we may not list or remove (read-only), else None."""
    unlistable: list[Path] = []

    def record(exc: OSError) -> None:
        unlistable.append(Path(exc.filename) if exc.filename else folder)

    for current, _dirs, _files in os.walk(folder, onerror=record):  # symlinks are removed, not entered
        if unlistable:
            break
        if not os.access(current, os.R_OK | os.W_OK | os.X_OK):
            return Path(current)
    return unlistable[0] if unlistable else None


class _PlainDumper(yaml.SafeDumper):
    """A safe dumper that writes shared objects out in full instead of as &anchors/*aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(data: Any) -> str:
    """Serialize to YAML with sorted keys and no aliases, for readable diffs."""
    return yaml.dump(data, Dumper=_PlainDumper, sort_keys=True, default_flow_style=False, allow_unicode=True)


def stage_reference(
    path: Path,
    record: Record,
    manifest: dict[str, Any],
    provenance: dict[str, Any],
    digests: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a complete, verified reference beside ``path`` (hidden); return the staging folder.

    ``digests``: run 1's module digests of its first steps (``digests.json``), where later differences start.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.new-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    stable = _stable(record)
    try:
        save_record(stable, staging)
        write_text_atomic(staging / MANIFEST_FILE, dump_yaml(manifest))
        write_text_atomic(staging / PROVENANCE_FILE, dump_yaml(provenance))
        if digests is not None:
            write_text_atomic(staging / DIGESTS_FILE, dump_json(digests))
        load_record(staging)  # verify what we are about to publish
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _stable(record: Record) -> Record:
    """The record without run details that change on every run (wall time, run index)."""
    return Record(
        losses=record.losses,
        weights=record.weights,
        metrics=record.metrics,
        outputs=record.outputs,
        meta={k: v for k, v in record.meta.items() if k not in VOLATILE_META},
        ranks={rank: _stable(r) for rank, r in record.ranks.items()},
    )


def user_files(path: Path) -> list[str]:
    """Return the names of files in a reference folder that pytest-repro did not write."""
    if not path.is_dir():
        return []
    return sorted(
        p.name
        for p in path.iterdir()
        if p.name not in PLUGIN_FILES and not p.name.startswith(".") and not _RANK_DIR.match(p.name)
    )


def commit_reference(staging: Path, path: Path, warnings: list[str] | None = None) -> list[str]:
    """Swap a staged reference into place atomically, keeping files the user added; return those kept.

    What could not be cleaned up after the swap (the old reference, e.g. an immutable file in it) is added
    to ``warnings``.
    """
    if path.is_symlink():  # a symlink inside the reference tree (check_in_the_way refuses outward ones)
        path = path.resolve()
        staged = path.with_name(staging.name)
        os.replace(staging, staged)
        staging = staged
    with locked(path.parent, exclusive=True):
        kept = user_files(path)
        for name in kept:
            src = path / name
            if src.is_dir():
                shutil.copytree(src, staging / name, symlinks=True)
            else:
                shutil.copy2(src, staging / name, follow_symlinks=False)
        backup = path.with_name(f".{path.name}.old-{os.getpid()}")
        try:
            blocked = not_removable(path) if path.is_dir() else None
            if blocked is not None:  # swapping would strand the old reference in a hidden folder we cannot remove
                what = "it is" if blocked == path else f"{blocked} is"
                raise PermissionError(
                    errno.EACCES,
                    f"cannot replace {path}: permission denied ({what} read-only, so the old reference could "
                    f"not be removed; make it writable: chmod -R u+w {shlex.quote(str(path))})",
                )
            old = None
            if not path.exists():
                os.replace(staging, path)
            elif _exchange(staging, path):
                old = staging  # now the old reference
            else:
                os.replace(path, backup)
                os.replace(staging, path)
                old = backup
        except BaseException:
            if not path.exists() and backup.exists():
                os.replace(backup, path)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        problem = remove_tree(old) if old is not None else None
        if old is not None and problem is not None and warnings is not None:
            warnings.append(
                f"the new reference is in place, but the old one, moved to {old}, could not be removed: {problem}; "
                f"fix: {removal_fix(old)}"
            )
    return kept


def discard_staged(staging: Path, root: Path | None = None) -> None:
    """Remove a staged reference that must not be published, and the folders staging created (up to ``root``)."""
    shutil.rmtree(staging, ignore_errors=True)
    parent = staging.parent
    while root is not None and parent != root and parent.is_relative_to(root) and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return bool(rc == 0)


def write_reference(path: Path, record: Record, manifest: dict[str, Any], provenance: dict[str, Any]) -> list[str]:
    """Write a reference folder atomically (stage, then swap into place); return the user files kept."""
    return commit_reference(stage_reference(path, record, manifest, provenance), path)


def settle_staged(staged: Path, target: Path, publish: bool, root: Path) -> tuple[list[str], OSError | None]:
    """Commit a staged reference to ``target`` when ``publish``, else discard it; return (warnings, write error).

    A reference that could not be committed is discarded too.
    """
    if not publish:
        discard_staged(staged, root)
        return [], None
    warnings: list[str] = []
    try:
        kept = commit_reference(staged, target, warnings)
    except OSError as exc:
        discard_staged(staged, root)
        return warnings, exc
    if kept:
        warnings.append(f"kept files you added to the reference folder: {', '.join(kept)}")
    return warnings, None
