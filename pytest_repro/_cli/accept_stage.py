"""``pytest-repro accept``, the project side: collect this checkout, place each bundle, stage and compare it.

``plan`` turns bundles (read by ``accept_read``) into candidates that are refused, unchanged, or staged beside
their target, ready to be swapped into place; ``discard`` removes what staging left.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._publish.bundle import BundleError, read_yaml
from ..storage import MANIFEST_FILE, PROVENANCE_FILE, safe_name
from .accept_read import AcceptError, Candidate, extract, read_bundle


@dataclass
class Project:
    """What the collection of this checkout says: the tests that exist, where references live, the key fields."""

    rootdir: Path
    reference_dir: Path
    env_key_fields: tuple[str, ...]
    nodeids: set[str]
    failed_files: dict[str, str]  # test file -> why collecting it failed
    root_existed: bool = True  # whether the reference folder existed before staging (else discard removes it)


_COLLECT = """
import json, sys
import pytest

class Collect:
    def __init__(self):
        self.ids, self.failed, self.ini = [], {}, {}

    def pytest_collectreport(self, report):
        if report.failed:
            self.failed[report.nodeid.split("::")[0]] = str(report.longrepr).strip().splitlines()[-1:]

    def pytest_collection_finish(self, session):
        self.ids = [item.nodeid for item in session.items]
        for name in ("repro_reference_dir", "repro_env_key_fields"):
            try:
                self.ini[name] = session.config.getini(name)
            except ValueError:
                pass
        self.ini["rootdir"] = str(session.config.rootpath)

c = Collect()
code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *sys.argv[2:]], plugins=[c])
with open(sys.argv[1], "w", encoding="utf-8") as fh:
    json.dump({"code": int(code), "ids": c.ids, "failed": c.failed, "ini": c.ini}, fh)
"""


def collect(rootdir: Path, files: list[str], timeout: float = 600.0) -> Project:
    """Collect ``files`` with pytest in a fresh process (the tests that exist, as pytest names them); AcceptError."""
    fix = f"run 'pytest --collect-only -q {' '.join(map(shlex.quote, files))}' in {rootdir} and fix what it reports"
    with tempfile.TemporaryDirectory(prefix="pytest-repro-accept-") as tmp:
        out = Path(tmp) / "collected.json"
        command = [sys.executable, "-c", _COLLECT, str(out), f"--rootdir={rootdir}", *files]
        try:
            proc = subprocess.run(command, cwd=rootdir, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise AcceptError(f"collecting the bundles' tests took over {timeout:.0f} s", fix) from None
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        try:
            data = json.loads(out.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        # 0: collected, 5: none of these collected; 2 with failed files: those files are refused one by one
        if data.get("code") not in (0, 5) and not data.get("failed"):
            code = data.get("code", f"{proc.returncode} before collecting")
            raise AcceptError(f"pytest could not collect the bundles' tests (exit {code}: {' | '.join(tail)})", fix)
    ini = data.get("ini") or {}
    root = Path(ini.get("rootdir") or rootdir)
    ref = Path(str(ini.get("repro_reference_dir") or "reference_outputs"))
    return Project(
        rootdir=root,
        reference_dir=ref if ref.is_absolute() else root / ref,
        env_key_fields=tuple(ini.get("repro_env_key_fields") or ()),
        nodeids=set(data.get("ids") or []),
        failed_files={k: " ".join(v) for k, v in (data.get("failed") or {}).items()},
    )


def _check_name(
    index: Mapping[str, Any], nodeid: str, env_key: str, prefix: tuple[str, ...] = ()
) -> tuple[bool, str | None]:
    """The check name= the bundle's reference folder encodes: (whether its layout fits the test, the name).

    ``prefix``: this project's reference folder relative to the rootdir; a folder under it is read exactly,
    any other (exported from elsewhere) by its last components.
    """
    from ..storage import reference_path

    parts = Path(str(index.get("reference") or "")).parts
    test = reference_path(Path(""), nodeid).parts
    if not parts or parts[-1] != env_key or not test:
        return False, None
    if prefix and parts[: len(prefix)] == prefix:
        rest = parts[len(prefix) : -1]
        if rest == test:
            return True, None
        return (True, rest[-1]) if len(rest) == len(test) + 1 and rest[:-1] == test else (False, None)
    if parts[-1 - len(test) : -1] == test:
        return True, None
    if len(parts) > len(test) + 1 and parts[-2 - len(test) : -2] == test:
        return True, parts[-2]
    return False, None


def _place(c: Candidate, project: Project) -> None:
    """Read the check name from the bundle's reference folder; refuse a folder that does not fit the test."""
    try:
        prefix = project.reference_dir.relative_to(project.rootdir).parts
    except ValueError:
        prefix = ()
    fits, c.name = _check_name(c.index, c.nodeid, c.env_key, prefix)
    if not fits or (c.name is not None and safe_name(c.name) != c.name):
        c.refuse(
            f"its reference folder {c.index.get('reference')!r} does not fit the test {c.nodeid} and environment "
            f"{c.env_key} (<reference dir>/<test module>/<test>[/<check name>]/<environment>); export it again"
        )


def _summary(record: Any) -> str:
    """One line on a record: steps and last loss, tensors, metrics."""
    losses = f"{len(record.losses)} losses (last {record.losses[-1]:.6g})" if record.losses else "no losses"
    tensors = f"{len(record.weights)} weight and {len(record.outputs)} output tensors"
    metrics = ", ".join(f"{k} {v:.6g}" for k, v in sorted(record.metrics.items())) or "no metrics"
    return f"{losses}, {tensors}, metrics: {metrics}"


def _compare(c: Candidate, staged: Any, stored: Any) -> None:
    """Say what a replacement changes: the check's own difference lines, bitwise, and the largest differences."""
    from .._judge import policy
    from .._judge.compare import section_max_abs
    from .._judge.tolerances import ToleranceSpec

    cmp = policy.compare(stored.record, staged.record, ToleranceSpec())
    provenance = read_yaml(c.staging / PROVENANCE_FILE) if c.staging else {}
    if cmp.ok and stored.provenance.get("config") == provenance.get("config"):
        c.action = "unchanged"
        c.lines.append("same values (bitwise) and config as the current reference: left as it is")
        return
    c.action = "replace"
    if cmp.ok:
        c.lines.append("same values (bitwise); its provenance differs (the config it was recorded with)")
    else:
        c.lines.append(f"differs from the current reference {policy.headline(cmp)} (bitwise comparison):")
        c.lines += cmp.describe("current reference", "bundle").splitlines()
        largest = section_max_abs(stored.record, staged.record)
        c.lines.append("largest absolute difference: " + ", ".join(f"{k} {v:.3g}" for k, v in largest.items()))
    effective = provenance.get("effective_config")
    effective = {k: v for k, v in effective.items() if isinstance(v, dict) and "value" in v} if effective else {}
    manifest = read_yaml(c.staging / MANIFEST_FILE) if c.staging else {}
    changed = policy.changes(stored, staged.record, effective, manifest)
    if changed:
        c.lines.append("recorded differently from the current reference:")
        c.lines += [f"  {line.replace(', this run ', ', bundle ')}" for line in changed]


def _stage(c: Candidate, project: Project) -> None:
    """Extract into a staging folder beside the target, check the environment key, and compare with what is there."""
    from ..manifest import environment_key
    from ..record import CorruptRecordError, close_record, load_record
    from ..storage import (
        MissingReferenceError,
        Reference,
        ReferenceBlockedError,
        check_in_the_way,
        load_reference,
        reference_path,
    )

    root = project.reference_dir
    c.target = reference_path(root, c.nodeid, c.name) / c.env_key
    try:
        check_in_the_way(c.target, root)
    except ReferenceBlockedError as exc:
        c.refuse(f"{exc}; move it out of the way")
        return
    if not c.target.resolve().is_relative_to(root.resolve()):
        c.refuse(f"it would be written to {c.target.resolve()}, outside the reference folder {root}")
        return
    c.staging = c.target.with_name(f".{c.target.name}.new-{os.getpid()}")
    try:
        extract(c, c.staging)
        record = load_record(c.staging)
    except (BundleError, CorruptRecordError, OSError, tarfile.TarError, zipfile.BadZipFile) as exc:
        c.refuse(f"its reference cannot be installed: {exc}")
        return
    manifest = read_yaml(c.staging / MANIFEST_FILE)
    provenance = read_yaml(c.staging / PROVENANCE_FILE)
    device = str(provenance.get("device") or record.meta.get("device") or "")
    derived = environment_key(manifest, device, project.env_key_fields) if manifest and device else None
    if derived != c.env_key:
        why = (
            f"its manifest.yaml (device {device}) gives {derived!r}"
            if derived
            else "it holds no manifest.yaml and device to confirm it"
        )
        c.refuse(
            f"it says environment {c.env_key!r} but {why}: the key clashes with the environment that recorded it "
            "(or repro_env_key_fields differ between here and there); record it again on the right runner"
        )
        close_record(record)
        return
    staged = Reference(c.staging, record, manifest, provenance)
    try:
        stored = load_reference(c.target, root)
    except MissingReferenceError:
        c.action = "add"
        c.lines.append(f"new reference: {_summary(record)}")
    except CorruptRecordError as exc:
        c.action = "replace"
        c.lines.append(f"replaces a corrupt reference ({exc.detail}); the bundle: {_summary(record)}")
    except (ReferenceBlockedError, OSError) as exc:
        c.refuse(f"the current reference cannot be read ({exc}); fix its folder first")
    else:
        try:
            _compare(c, staged, stored)
        finally:
            close_record(stored.record)
    close_record(record)


def _refuse_clashes(candidates: list[Candidate]) -> None:
    """Two bundles for the same test, check and environment: refuse both (which one is meant is not known)."""
    by_target: dict[tuple[str, str | None, str], list[Candidate]] = {}
    for c in candidates:
        if c.action != "refused":
            by_target.setdefault((c.nodeid, c.name, c.env_key), []).append(c)
    for (nodeid, _, key), group in by_target.items():
        if len(group) > 1:
            names = ", ".join(str(g.bundle) for g in group)
            for g in group:
                g.refuse(
                    f"{len(group)} bundles ({names}) hold a reference for {nodeid} in environment {key}; "
                    "pass only the one you mean"
                )


def plan(bundles: list[Path], rootdir: Path, reference_dir: Path | None = None) -> tuple[list[Candidate], Project]:
    """Verify, place and compare every bundle, staging the files of those that can be installed."""
    candidates = [read_bundle(b) for b in bundles]
    files = sorted({c.nodeid.partition("::")[0] for c in candidates if c.action != "refused"})
    present = [f for f in files if (rootdir / f).is_file()]
    project = collect(rootdir, present) if present else Project(rootdir, rootdir / "reference_outputs", (), set(), {})
    if reference_dir is not None:
        project.reference_dir = reference_dir if reference_dir.is_absolute() else rootdir / reference_dir
    for c in candidates:
        if c.action == "refused":
            continue
        file = c.nodeid.partition("::")[0]
        if file in project.failed_files:
            c.refuse(
                f"cannot tell whether {c.nodeid} exists: collecting {file} failed ({project.failed_files[file]}); "
                f"fix it (pytest --collect-only -q {shlex.quote(file)}), then accept again"
            )
        elif c.nodeid not in project.nodeids:
            where = "its file does not exist" if file not in present else f"{file} has no such test"
            c.refuse(
                f"the test {c.nodeid} no longer exists in this checkout ({where}; collected with pytest "
                "--collect-only); a renamed test needs its reference recorded again under the new name"
            )
        else:
            _place(c, project)
    _refuse_clashes(candidates)
    project.root_existed = project.reference_dir.exists()
    for c in candidates:
        if c.action != "refused":
            _stage(c, project)
    return candidates, project


def discard(candidates: Iterable[Candidate], project: Project) -> None:
    """Remove every staging folder left (and the empty folders staging created)."""
    from ..staging import discard_staged

    root = project.reference_dir
    for c in candidates:
        if c.staging is not None:
            discard_staged(c.staging, root)
            c.staging = None
    if not project.root_existed and root.is_dir() and not any(root.iterdir()):
        root.rmdir()
