"""Writing a bundle: the reference's files, the inputs its config names, the job's source hash, the index."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ...record import RECORD_FILE
from ...storage import MANIFEST_FILE, PLUGIN_FILES, PROVENANCE_FILE, safe_name
from ...tensorfile import sha256_file
from . import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    INDEX_FILE,
    OUTCOME_FILE,
    README_FILE,
    Bundle,
    BundleError,
    archive_kind,
    read_yaml,
    top_folder,
)
from .readme import install_lines, render_readme

MAX_INPUT_BYTES = 64 << 20  # data files larger than this are hashed and listed, not bundled


def tensor_problems(folder: Path) -> list[str]:
    """Return what is inconsistent between record.json and the tensor files beside it (no torch needed)."""
    try:
        body = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [f"{RECORD_FILE}: unreadable ({type(exc).__name__}: {exc})"]
    problems = []
    for section, entry in (body.get("tensors") or {}).items():
        if not isinstance(entry, dict):
            problems.append(f"{RECORD_FILE}: tensors.{section} is not a mapping")
            continue
        name = str(entry.get("file", f"{section}.safetensors"))
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing (record.json lists it)")
        elif sha256_file(path) != entry.get("sha256"):
            problems.append(f"{name}: does not match the sha256 record.json holds for it")
    return problems


def _job_source(job: str | None, rootdir: Path) -> dict[str, Any] | None:
    """Hash the job's module source as found now (a package: every .py file in it)."""
    if not job or ":" not in job:
        return None
    import importlib.util
    import sys

    module = job.partition(":")[0]
    added = str(rootdir) not in sys.path
    if added:
        sys.path.insert(0, str(rootdir))
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError, AttributeError):
        spec = None
    finally:
        if added:
            sys.path.remove(str(rootdir))
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        return {"job": job, "module": module, "found": False}
    origin = Path(spec.origin)
    depth = len(module.split("."))
    if origin.name == "__init__.py":
        base = origin.parents[depth]
        files = sorted(p for p in origin.parent.rglob("*.py") if "__pycache__" not in p.parts)
    else:
        base = origin.parents[depth - 1]
        files = [origin]
    hashes = {p.relative_to(base).as_posix(): sha256_file(p) for p in files}
    combined = hashlib.sha256("".join(f"{name}\0{digest}\n" for name, digest in hashes.items()).encode()).hexdigest()
    return {"job": job, "module": module, "found": True, "sha256": combined, "files": hashes, "hashed": "at export"}


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _input_name(path: Path, rootdir: Path) -> str:
    try:
        return "inputs/" + path.resolve().relative_to(rootdir.resolve()).as_posix()
    except ValueError:
        return f"inputs/_outside_rootdir/{safe_name(path.name)}"


def _packaged_inputs(provenance: Mapping[str, Any], data: dict[str, Any]) -> dict[str, str]:
    """List the shipped data files (``package:NAME``) the effective config names; return them by sha256."""
    from ... import __version__
    from ...jobs import PACKAGED, packaged_file

    effective = provenance.get("effective_config")
    values = effective.values() if isinstance(effective, dict) else ()
    by_hash: dict[str, str] = {}
    for text in sorted(
        {str(e.get("value")) for e in values if isinstance(e, dict) and isinstance(e.get("value"), str)}
    ):
        if not text.startswith(PACKAGED) or text in data:
            continue
        try:
            digest = sha256_file(packaged_file(text))
        except OSError:
            data[text] = {"packaged": f"pytest-repro {__version__}", "found": False}
            continue
        data[text] = {"packaged": f"pytest-repro {__version__}", "sha256": digest}
        by_hash[digest] = text
    return by_hash


def _add_inputs(bundle: Bundle, provenance: Mapping[str, Any], meta: Mapping[str, Any], rootdir: Path) -> None:
    """Bundle the config file the job used and the data files its config names; find the split file."""
    source = str(provenance.get("config_source") or "")
    test_file = str(provenance.get("test") or "").partition("::")[0]
    config_dir = rootdir
    config_entry: dict[str, Any] = {"source": source or None}
    if source and source != "dict":
        given = Path(source)
        candidates = [given] if given.is_absolute() else [rootdir / given, rootdir / Path(test_file).parent / given]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            bundle.notes.append(
                f"the config file {source} was not found (looked in: {', '.join(map(str, candidates))}); "
                "not bundled (its content is in provenance.yaml); export from the project's rootdir (--rootdir)"
            )
        else:
            name = _input_name(found, rootdir)
            bundle.add(name, found, "config")
            config_entry["bundled_as"] = name
            config_dir = found.parent
    bundle.index["config_file"] = config_entry
    split_sha = (meta.get("job_meta") or {}).get("split_sha256") if isinstance(meta.get("job_meta"), dict) else None
    data: dict[str, Any] = {}
    for text in sorted(set(_strings(provenance.get("config") or {}))):
        if not text or "\n" in text or len(text) > 1024:
            continue
        path = Path(text) if Path(text).is_absolute() else config_dir / text
        try:
            if not path.is_file():
                continue
            size = path.stat().st_size
        except OSError:
            continue
        name = _input_name(path, rootdir)
        if name in bundle.members:
            continue
        if size > MAX_INPUT_BYTES or name.startswith("inputs/_outside_rootdir/"):
            why = "over 64 MiB" if size > MAX_INPUT_BYTES else "outside the rootdir"
            data[text] = {"path": str(path), "size": size, "bundled": False}
            bundle.notes.append(f"the data file {path} ({size} bytes) is {why}: listed, not bundled")
            continue
        digest = sha256_file(path)
        role = "split" if split_sha and digest == split_sha else "data"
        bundle.add(name, path, role)
        data[text] = {"bundled_as": name, "sha256": digest}
    packaged = _packaged_inputs(provenance, data)
    bundle.index["data_files"] = data
    if split_sha:
        split_file = next((n for n, e in bundle.index.get("files", {}).items() if e["role"] == "split"), None)
        bundle.index["split"] = {"record_sha256": split_sha, "file": split_file}
        if split_file is None and split_sha in packaged:
            bundle.index["split"]["packaged"] = packaged[split_sha]
        elif split_file is None:
            bundle.notes.append(
                f"the record names a split file with sha256 {split_sha[:12]}…, but no file the config names "
                "has that hash now: the split file changed since the reference was recorded, or it lives elsewhere"
            )


def build_bundle(
    reference: Path | None,
    rootdir: Path,
    outcome: Mapping[str, Any] | None = None,
    created: str | None = None,
    archive: Path | None = None,
) -> Bundle:
    """Assemble a bundle of a reference folder (and, for a failing check, its outcome); raise BundleError."""
    from ... import __version__

    bundle = Bundle()
    stamp = created or datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    provenance: dict[str, Any] = {}
    manifest: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    record: dict[str, Any] = {}
    if reference is not None:
        if not (reference / RECORD_FILE).is_file():
            raise BundleError(f"{reference} holds no {RECORD_FILE}", "pass a reference environment folder")
        problems = tensor_problems(reference)
        if problems:
            raise BundleError(
                f"the reference {reference} is corrupt ({'; '.join(problems)})",
                "regenerate it with pytest --repro --repro-regen, then export again",
            )
        for name in sorted(PLUGIN_FILES):
            if (reference / name).is_file():
                role = {RECORD_FILE: "record", MANIFEST_FILE: "manifest", PROVENANCE_FILE: "provenance"}
                bundle.add(f"reference/{name}", reference / name, role.get(name, name.split(".")[0]))
        record = json.loads((reference / RECORD_FILE).read_text(encoding="utf-8"))
        meta = record.get("meta") or {}
        provenance = read_yaml(reference / PROVENANCE_FILE)
        manifest = read_yaml(reference / MANIFEST_FILE)
        if not provenance:
            bundle.notes.append(f"{reference} holds no readable {PROVENANCE_FILE}: config and command are unknown")
    nodeid = str((outcome or {}).get("nodeid") or provenance.get("test") or "")
    env_key = str(provenance.get("environment_key") or (reference.name if reference else "") or "")
    try:
        shown = str(reference.resolve().relative_to(rootdir.resolve())) if reference else None
    except ValueError:
        shown = str(reference)
    bundle.index.update(
        {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_VERSION,
            "created": stamp,
            "plugin_version": __version__,
            "test": nodeid,
            "check": (outcome or {}).get("name"),
            "environment_key": env_key,
            "reference": shown,
            "files": bundle.index.get("files", {}),
        }
    )
    if reference is not None:
        _add_inputs(bundle, provenance, meta, rootdir)
        bundle.index["job_source"] = _job_source(str(meta.get("job") or provenance.get("job") or ""), rootdir)
    if outcome is not None:
        bundle.add(
            OUTCOME_FILE, (json.dumps(dict(outcome), indent=2, sort_keys=True, default=str) + "\n").encode(), "outcome"
        )
        bundle.index["contents"] = "the reference used and this run's outcome" if reference else "this run's outcome"
        bundle.notes.append(
            "this run's own record (its tensors) is not included: it lives in a scratch folder removed at "
            "session end; outcome.json holds its verdict, loss curves, differences and drift"
        )
    else:
        bundle.index["contents"] = "the reference"
    bundle.index["notes"] = list(bundle.notes)
    installs = install_lines(str(meta.get("job") or provenance.get("job") or ""))
    readme = render_readme(bundle.index, provenance, manifest, record, outcome, archive, installs).encode()
    bundle.add(README_FILE, readme, "readme")
    return bundle


def write_bundle(bundle: Bundle, out: Path) -> None:
    """Write the archive atomically (temp file, then rename); raise BundleError or OSError."""
    kind = archive_kind(out)
    top = top_folder(out)
    index = (json.dumps(bundle.index, indent=2, sort_keys=True, default=str) + "\n").encode()
    members = [*sorted(bundle.members.items()), (INDEX_FILE, index)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    mtime = time.time()
    try:
        if kind == "tar":
            with tarfile.open(tmp, "w:gz", format=tarfile.PAX_FORMAT) as tar:
                for name, content in members:
                    info = tarfile.TarInfo(f"{top}/{name}")
                    info.mode, info.mtime = 0o644, mtime
                    if isinstance(content, bytes):
                        info.size = len(content)
                        tar.addfile(info, io.BytesIO(content))
                    else:
                        info.size = content.stat().st_size
                        with open(content, "rb") as fh:
                            tar.addfile(info, fh)
        else:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
                for name, content in members:
                    if isinstance(content, bytes):
                        zf.writestr(f"{top}/{name}", content)
                    else:
                        zf.write(content, f"{top}/{name}")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export(reference: Path | None, rootdir: Path, out: Path, outcome: Mapping[str, Any] | None = None) -> Bundle:
    """Build and write one bundle; return it (its notes say what could not be bundled)."""
    archive_kind(out)
    bundle = build_bundle(reference, rootdir, outcome, archive=out)
    write_bundle(bundle, out)
    return bundle
