"""``pytest-repro migrate``: rename legacy ``cpu`` reference folders to their ``cpu-<vendor>-<capability>`` key."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .common import CliError, where

LEGACY_CPU_KEY = "cpu"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments (its one-line help is its row in ``cli.COMMANDS``)."""
    parser.add_argument("reference_dir", nargs="?", default="reference_outputs", help="default: ./reference_outputs")
    parser.add_argument("--dry-run", action="store_true", help="print what would be renamed, rename nothing")


def command(args: argparse.Namespace) -> int:
    """Migrate the folders under the reference folder; return 1 when some were kept, else 0."""
    root = Path(args.reference_dir)
    fix = "pass the reference folder (ini repro_reference_dir, default reference_outputs)"
    if not root.exists():
        raise CliError(f"{root} does not exist", fix)
    if not root.is_dir():
        raise CliError(f"{root} is a file, not a folder", fix)
    return 1 if migrate_cpu_folders(root, args.dry_run) else 0


def migrate_cpu_folders(root: Path, dry_run: bool = False, echo: Callable[[str], None] = print) -> int:
    """Rename legacy ``cpu`` reference folders under ``root`` to their vendor/capability key; return how many stayed.

    Each folder's new key comes from its own manifest.yaml (``environment_key(manifest, "cpu")``). A folder
    is left as is when the target exists or its manifest cannot say which CPU recorded it.
    """
    from ..manifest import environment_key
    from ..record import RECORD_FILE

    folders = sorted(
        p.parent
        for p in root.rglob(RECORD_FILE)
        if p.parent.name == LEGACY_CPU_KEY and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not folders:
        echo(f"no legacy '{LEGACY_CPU_KEY}' reference folders under {root}; nothing to migrate")
        return 0
    kept = 0
    for folder in folders:
        manifest, problem = _legacy_manifest(folder)
        key = environment_key(manifest, "cpu")
        if problem is None and (folder.parent / key).exists():
            problem = f"{key} already exists beside it; compare the two, delete one, then run migrate again"
        if problem is not None:
            kept += 1
            echo(f"kept {folder} (still used, as a reference from another environment): {problem}")
        elif dry_run:
            echo(f"would rename {folder} -> {key}")
        else:
            os.rename(folder, folder.parent / key)
            _update_provenance_key(folder.parent / key, key)
            echo(f"renamed {folder} -> {key}")
    echo(f"{len(folders) - kept} folder(s) {'would be renamed' if dry_run else 'renamed'}, {kept} kept")
    return kept


def _legacy_manifest(folder: Path) -> tuple[dict[str, Any], str | None]:
    """Return a legacy folder's manifest, and why it cannot give the new key (None when it can)."""
    from ..manifest import cpu_capability, cpu_vendor
    from ..storage import MANIFEST_FILE

    path = folder / MANIFEST_FILE
    fix = "re-record it on that machine type with pytest --repro --repro-regen"
    if not path.is_file():
        return {}, f"it holds no {MANIFEST_FILE}; {fix}"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return {}, f"its {MANIFEST_FILE} is unreadable{where(exc)}; {fix}"
    if not isinstance(data, dict):
        return {}, f"its {MANIFEST_FILE} is not a mapping; {fix}"
    missing = [
        name
        for name, value in (("cpu.vendor/cpu.model", cpu_vendor(data)), ("torch.cpu_capability", cpu_capability(data)))
        if value == "unknown"
    ]
    if missing:
        return data, f"its {MANIFEST_FILE} lacks {' and '.join(missing)}, so its CPU is unknown; {fix}"
    return data, None


def _update_provenance_key(folder: Path, key: str) -> None:
    """Point provenance.yaml's environment_key at the new folder name, leaving the rest of the file as is."""
    from ..storage import PROVENANCE_FILE

    path = folder / PROVENANCE_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return
    new = re.sub(rf"^environment_key: {LEGACY_CPU_KEY}$", f"environment_key: {key}", text, count=1, flags=re.M)
    if new != text:
        from ..record import write_text_atomic

        write_text_atomic(path, new)
