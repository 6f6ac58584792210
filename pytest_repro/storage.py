"""The reference store: one folder per check, verified on load, never pickled (staging.py writes it)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .record import DIGESTS_FILE, NOISE_FILE, RECORD_FILE, CorruptRecordError, Record, load_record

if TYPE_CHECKING:
    from ._judge.policy import Found
    from .settings import Settings

MANIFEST_FILE = "manifest.yaml"
PROVENANCE_FILE = "provenance.yaml"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


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
    # an environment folder holds a record; a named check's folder beside them holds environment folders
    return {
        p.name: p
        for p in sorted(test_dir.iterdir())
        if p.is_dir() and not p.name.startswith(".") and (p / RECORD_FILE).exists()
    }


@dataclass
class Reference:
    """A stored reference: the record plus the manifest and provenance it was recorded with."""

    path: Path
    record: Record
    manifest: dict[str, Any]
    provenance: dict[str, Any]
    manifest_problem: str | None = None  # why manifest.yaml could not be used (then ``manifest`` is {})
    floor: Any = None  # NOISE_FILE's JSON as read (judged, never trusted, by _judge); None: none stored
    floor_problem: str | None = None  # why NOISE_FILE could not be read as JSON
    digests: Any = None  # DIGESTS_FILE's JSON as read (None: none recorded, or unreadable: see digests_problem)
    digests_problem: str | None = None


# A manifest or provenance file is a few KiB; the limit keeps a hostile one from filling memory.
YAML_MAX_BYTES = 1 << 20


class _NoAliasLoader(yaml.SafeLoader):
    """A safe loader that refuses *aliases: pytest-repro writes none, and they are how a YAML bomb explodes."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, f"found the alias *{event.anchor}, which pytest-repro never writes", event.start_mark
            )
        return super().compose_node(parent, index)  # type: ignore[no-untyped-call]


def parse_yaml(text: str) -> Any:
    """Parse YAML safely: no Python tags, no aliases, no nesting deep enough to exhaust the stack."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None


def read_yaml_text(path: Path, limit: int = YAML_MAX_BYTES) -> str:
    """Read a small text file; ValueError when it is larger than ``limit`` bytes (it is never read whole)."""
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit >> 10} KiB, which no file pytest-repro writes is")
    return data.decode("utf-8")


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = parse_yaml(read_yaml_text(path))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise CorruptRecordError(path, f"not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise CorruptRecordError(path, "expected a YAML mapping")
    return data


def read_manifest(path: Path) -> tuple[dict[str, Any], str | None]:
    """Return a reference's manifest, or ({}, why) when it is missing, invalid or not a manifest; OSError passes."""
    from .manifest import manifest_problem

    try:
        data = parse_yaml(read_yaml_text(path))
    except FileNotFoundError:
        return {}, "the file is missing"
    except UnicodeDecodeError as exc:
        return {}, f"not UTF-8 text: {exc}"
    except ValueError as exc:
        return {}, str(exc)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return {}, f"not valid YAML: {exc.problem or exc.context}{where}"
    except yaml.YAMLError as exc:
        return {}, f"not valid YAML: {exc}"
    problem = manifest_problem(data)
    return (data, None) if problem is None else ({}, problem)


class ReferenceBlockedError(OSError):
    """Something other than a reference folder stands where the reference should be (a file, a symlink out)."""

    def __init__(self, path: Path, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(f"{path}: {detail}")


PLUGIN_FILES = frozenset(
    {
        RECORD_FILE,
        "weights.safetensors",
        "outputs.safetensors",
        MANIFEST_FILE,
        PROVENANCE_FILE,
        NOISE_FILE,
        DIGESTS_FILE,
    }
)
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>new|old)-(?P<pid>\d+)$")


@contextlib.contextmanager
def locked(folder: Path, exclusive: bool) -> Iterator[None]:
    """Hold an advisory lock on a test's reference folder: readers share it, a writer holds it alone."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (this process counts; another user's does too)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(folder: Path) -> list[tuple[Path, str, str]]:
    """Return (path, env name, kind) of staging/backup folders under ``folder`` left by dead processes."""
    out = []
    for entry in folder.iterdir() if folder.is_dir() else []:
        m = _STAGING.match(entry.name)
        if m and not pid_alive(int(m["pid"])):
            out.append((entry, m["name"], m["kind"]))
    return out


def removal_fix(path: Path) -> str:
    """The commands that remove a folder we could not: permissions first, immutable files second."""
    shown = shlex.quote(str(path))
    return (
        f"make it writable and remove it: chmod -R u+w {shown} && rm -rf {shown} (a file that stays "
        f"'Operation not permitted' is immutable: lsattr -R {shown} shows it, chattr -R -i {shown} clears it)"
    )


def clean_stale(test_dir: Path) -> list[str]:
    """Finish what a killed writer left: restore an interrupted swap, remove dead staging folders; say what."""
    if not _stale(test_dir):
        return []
    notes = []
    with locked(test_dir, exclusive=True):
        for entry, name, kind in _stale(test_dir):
            target = test_dir / name
            pid = entry.name.rsplit("-", 1)[1]
            if kind == "old" and not target.exists():
                try:
                    os.replace(entry, target)
                except OSError as exc:
                    notes.append(
                        f"could not restore {target.name} from the backup {entry.name} of a killed regeneration "
                        f"(pid {pid} is gone): {_why(exc)}; fix: make {test_dir} writable, then rerun"
                    )
                    continue
                notes.append(
                    f"restored {target.name} from the backup {entry.name} of a killed regeneration (pid {pid})"
                )
                continue
            what = "staging" if kind == "new" else "backup"
            failed = remove_tree(entry)
            if failed is None:
                notes.append(
                    f"removed the stale {what} folder {entry.name} of a killed regeneration (pid {pid} is gone)"
                )
            else:
                # Not necessarily a killed one: a regeneration whose old reference could not be removed leaves it too.
                notes.append(
                    f"could not remove the leftover {what} folder {entry} of an earlier regeneration (pid {pid} is "
                    f"gone): {failed}; fix: {removal_fix(entry)}"
                )
    return notes


def _why(exc: OSError) -> str:
    """An OS error in a few words: 'Permission denied (path)' rather than '[Errno 13] Permission denied: ...'."""
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def remove_tree(path: Path) -> str | None:
    """Remove a file, symlink or folder tree; return what could not be removed (None: it is gone)."""
    errors: list[str] = []

    def record(func: Any, failed: str, info: Any) -> None:
        exc = info[1]
        errors.append(_why(exc) if isinstance(exc, OSError) else str(exc))

    try:
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            path.unlink()
        else:
            shutil.rmtree(path, onerror=record)
    except FileNotFoundError:
        pass
    except OSError as exc:
        errors.append(_why(exc))
    if not (path.exists() or path.is_symlink()):
        return None
    return errors[0] if errors else "it is still there"


def check_in_the_way(path: Path, root: Path | None = None) -> None:
    """Raise ReferenceBlockedError if a file or an outward symlink stands at ``path`` or one of its parents."""
    stop = root.parent if root is not None else None
    current = path
    while current != stop and current != current.parent:
        if current.is_symlink():
            resolved = current.resolve()
            if root is not None and not resolved.is_relative_to(root.resolve()):
                raise ReferenceBlockedError(current, f"is a symlink to {resolved}, outside {root}; it is not followed")
        if current.exists() and not current.is_dir():
            raise ReferenceBlockedError(current, "is a file, not a reference folder")
        current = current.parent


def load_reference(path: Path, root: Path | None = None) -> Reference:
    """Load and verify a reference; raise MissingReferenceError, CorruptRecordError or ReferenceBlockedError."""
    check_in_the_way(path, root)
    if not path.parent.is_dir():
        raise MissingReferenceError(str(path))
    clean_stale(path.parent)
    for name in PLUGIN_FILES:
        if (path / name).is_dir():
            raise ReferenceBlockedError(path / name, "is a folder, not a reference file (is it yours?)")
    with locked(path.parent, exclusive=False):
        if not (path / RECORD_FILE).exists():
            if path.is_dir() and any(path.iterdir()):
                raise CorruptRecordError(path / RECORD_FILE, "is missing while other reference files exist")
            raise MissingReferenceError(str(path))
        record = load_record(path)
        manifest, problem = read_manifest(path / MANIFEST_FILE)
        floor, floor_problem = _read_json(path / NOISE_FILE)
        digests, digests_problem = _read_json(path / DIGESTS_FILE)
        return Reference(
            path,
            record,
            manifest,
            _load_yaml(path / PROVENANCE_FILE),
            problem,
            floor,
            floor_problem,
            digests,
            digests_problem,
        )


def _read_json(path: Path) -> tuple[Any, str | None]:
    """A small JSON file beside a reference (None when there is none), or why it cannot be read."""
    try:
        if not path.exists():
            return None, None
        if path.stat().st_size > YAML_MAX_BYTES:
            return None, f"{path.name} is larger than {YAML_MAX_BYTES} bytes"
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, ValueError) as exc:
        return None, f"{path.name} is unreadable ({type(exc).__name__}: {exc})"


def find_references(test_dir: Path, env_key: str, root: Path) -> tuple[Found, list[str]]:
    """What the store holds for one check: this environment's reference, or the others; and cleanup notes."""
    from ._judge.policy import Found

    found = Found(env_key, test_dir / env_key)
    notes: list[str] = []
    try:
        notes += clean_stale(test_dir)
        found.here = load_reference(found.target, root)
    except MissingReferenceError:
        pass
    except CorruptRecordError as exc:
        found.problem = ("corrupt", str(exc))
        return found, notes
    except ReferenceBlockedError as exc:
        found.problem = ("blocked", str(exc))
        return found, notes
    except OSError as exc:  # e.g. unreadable folder
        found.problem = ("unreadable", f"{test_dir}: {type(exc).__name__}: {exc}")
        return found, notes
    if found.here is None:
        for other_key, folder in environment_dirs(test_dir).items():
            if other_key == env_key:
                continue
            try:
                found.others.append((other_key, load_reference(folder, root)))
            except (MissingReferenceError, CorruptRecordError, OSError) as exc:
                found.unusable.append(f"{other_key} ({exc})")
    return found, notes


def provenance(
    test: str,
    job: str,
    seed: int,
    device: str,
    env_key: str,
    settings: Settings,
    config: tuple[dict[str, Any], str, dict[str, dict[str, Any]]],
    invocation: Sequence[str],
    wall_s: Any,
) -> dict[str, Any]:
    """The provenance.yaml a written reference carries: when, by which plugin and command, from what config."""
    from . import __version__

    cfg, source, effective = config
    return {
        "recorded_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "plugin_version": __version__,
        "test": test,
        "job": job,
        "seed": seed,
        "base_seed": settings.base_seed,
        "device": device,
        "environment_key": env_key,
        "deterministic": settings.deterministic,
        "runs": settings.runs,
        "config": cfg,
        "config_source": source,
        "effective_config": effective,
        "command": " ".join(shlex.quote(a) for a in invocation),
        "wall_s": wall_s,
    }
