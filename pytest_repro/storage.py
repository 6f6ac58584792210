"""The reference store: one folder per check, written atomically, verified on load, never pickled."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .record import RECORD_FILE, CorruptRecordError, Record, load_record, save_record, write_text_atomic

MANIFEST_FILE = "manifest.yaml"
PROVENANCE_FILE = "provenance.yaml"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# Run details that change on every run and so do not belong in a diffable reference record.
VOLATILE_META = ("wall_s", "run_index")


class MissingReferenceError(LookupError):
    """No reference has been recorded for a check yet."""


def safe_name(part: str) -> str:
    """Make one path component filesystem-safe; append a short hash when anything was replaced."""
    cleaned = _UNSAFE.sub("_", part).strip("._") or "_"
    if cleaned != part:
        cleaned += "-" + hashlib.sha256(part.encode()).hexdigest()[:8]
    return cleaned


def reference_path(root: Path, nodeid: str, name: str | None = None) -> Path:
    """Return the folder for a test's reference: module path + test name (+ check name)."""
    file_part, _, test_part = nodeid.partition("::")
    module = Path(file_part).with_suffix("")
    parts = [safe_name(p) for p in module.parts if p not in ("", ".", "..")]
    parts += [safe_name(p) for p in test_part.split("::") if p]
    if name:
        parts.append(safe_name(name))
    return root.joinpath(*parts)


def environment_dirs(test_dir: Path) -> dict[str, Path]:
    """Return the per-environment reference folders of one test, by environment key."""
    if not test_dir.is_dir():
        return {}
    return {p.name: p for p in sorted(test_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")}


@dataclass
class Reference:
    """A stored reference: the record plus the manifest and provenance it was recorded with."""

    path: Path
    record: Record
    manifest: dict[str, Any]
    provenance: dict[str, Any]


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CorruptRecordError(path, f"not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise CorruptRecordError(path, "expected a YAML mapping")
    return data


def recover_interrupted(path: Path) -> bool:
    """Put back the previous reference if a regeneration was killed between its two renames."""
    if path.exists():
        return False
    backups = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not backups:
        return False
    os.replace(backups[-1], path)
    return True


def load_reference(path: Path) -> Reference:
    """Load and verify a reference; raise MissingReferenceError or CorruptRecordError."""
    recover_interrupted(path)
    if not (path / RECORD_FILE).exists():
        if path.is_dir() and any(path.iterdir()):
            raise CorruptRecordError(path / RECORD_FILE, "is missing while other reference files exist")
        raise MissingReferenceError(str(path))
    record = load_record(path)
    return Reference(path, record, _load_yaml(path / MANIFEST_FILE), _load_yaml(path / PROVENANCE_FILE))


class _PlainDumper(yaml.SafeDumper):
    """A safe dumper that writes shared objects out in full instead of as &anchors/*aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(data: Any) -> str:
    """Serialize to YAML with sorted keys and no aliases, for readable diffs."""
    return yaml.dump(data, Dumper=_PlainDumper, sort_keys=True, default_flow_style=False, allow_unicode=True)


def write_reference(path: Path, record: Record, manifest: dict[str, Any], provenance: dict[str, Any]) -> None:
    """Write a reference folder atomically: build it beside the target, then swap it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(path)
    staging = path.with_name(f".{path.name}.new-{os.getpid()}")
    backup = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    stable = Record(
        losses=record.losses,
        weights=record.weights,
        metrics=record.metrics,
        outputs=record.outputs,
        meta={k: v for k, v in record.meta.items() if k not in VOLATILE_META},
    )
    try:
        save_record(stable, staging)
        write_text_atomic(staging / MANIFEST_FILE, dump_yaml(manifest))
        write_text_atomic(staging / PROVENANCE_FILE, dump_yaml(provenance))
        load_record(staging)  # verify what we are about to publish
        if path.exists():
            os.replace(path, backup)
        os.replace(staging, path)
    except BaseException:
        if not path.exists() and backup.exists():
            os.replace(backup, path)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)
