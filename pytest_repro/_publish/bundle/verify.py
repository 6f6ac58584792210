"""Checking a bundle: every member's hash against the index, record.json's tensor hashes, the split file."""

from __future__ import annotations

import hashlib
import json
import stat
import tarfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from ...record import RECORD_FILE
from ...storage import PROVENANCE_FILE
from . import BUNDLE_FORMAT, BUNDLE_VERSION, INDEX_FILE, BundleError

_SMALL = 16 << 20  # members verify keeps in memory (index, record, provenance)


@dataclass
class Verification:
    """What ``verify`` found: the index, the lines it checked, and every inconsistency (file first)."""

    index: dict[str, Any] = field(default_factory=dict)
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def bad_files(self) -> list[str]:
        """The files the problems name, in order."""
        return list(dict.fromkeys(p.split(":", 1)[0] for p in self.problems))


@dataclass
class _Member:
    sha256: str
    size: int
    data: bytes | None


def _digest(fh: IO[bytes], keep: bool) -> _Member:
    digest, size, chunks = hashlib.sha256(), 0, []
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        digest.update(chunk)
        size += len(chunk)
        if keep and size <= _SMALL:
            chunks.append(chunk)
    return _Member(digest.hexdigest(), size, b"".join(chunks) if keep and size <= _SMALL else None)


def _keep(name: str) -> bool:
    return name.endswith((INDEX_FILE, RECORD_FILE, PROVENANCE_FILE))


def _member_name(name: str) -> tuple[str, str | None]:
    """Return a member's name without './' parts (``tar -C dir -czf x.tgz .``), and why extracting it is unsafe."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(parts[0]) == 2 and parts[0][1] == ":"):
        return name, "an absolute path: extracting the archive would write outside its folder"
    if ".." in parts:
        return name, "a path with '..': extracting the archive would write outside its folder"
    return "/".join(p for p in parts if p not in ("", ".")), None


def _read_members(archive: Path, damaged: list[str]) -> dict[str, _Member]:
    """Hash every regular member; note damage naming the member; raise BundleError if it is no archive."""
    import gzip
    import zlib

    fix = "pass an archive written by 'pytest-repro export' or --repro-bundle-dir"
    try:
        with open(archive, "rb") as fh:
            magic = fh.read(4)
    except FileNotFoundError:
        raise BundleError(f"{archive} does not exist", fix) from None
    except IsADirectoryError:
        raise BundleError(f"{archive} is a folder, not a bundle archive", fix) from None
    except OSError as exc:
        raise BundleError(f"cannot read {archive} ({exc.strerror or exc})", fix) from None
    members: dict[str, _Member] = {}
    errors = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, gzip.BadGzipFile, OSError, ValueError)
    if magic.startswith(b"PK"):
        try:
            zf = zipfile.ZipFile(archive)
        except errors as exc:
            raise BundleError(f"{archive} is not a readable zip archive ({exc})", fix) from None
        with zf:
            for info in zf.infolist():
                name, unsafe = _member_name(info.filename)
                if unsafe:
                    damaged.append(f"{name}: {unsafe}")
                    continue
                if info.is_dir() or not name:
                    continue
                if stat.S_ISLNK(info.external_attr >> 16):
                    damaged.append(f"{name}: not a regular file (a link) in the archive")
                    continue
                try:
                    with zf.open(info) as fh:
                        members[name] = _digest(fh, _keep(name))
                except errors as exc:
                    damaged.append(f"{name}: damaged in the archive ({type(exc).__name__}: {exc})")
        return members
    if not magic.startswith(b"\x1f\x8b") and not tarfile.is_tarfile(archive):
        raise BundleError(f"{archive} is neither a .tar.gz nor a .zip archive", fix)
    current = "(the archive header)"
    try:
        with tarfile.open(archive, "r:gz" if magic.startswith(b"\x1f\x8b") else "r:") as tar:
            for member in tar:
                current, unsafe = _member_name(member.name)
                if unsafe:
                    damaged.append(f"{current}: {unsafe}")
                    continue
                if member.isdir() or not current:
                    continue
                if not member.isfile():
                    damaged.append(f"{current}: not a regular file (a link or device) in the archive")
                    continue
                stream = tar.extractfile(member)
                assert stream is not None
                members[current] = _digest(stream, _keep(current))
    except errors as exc:
        if not members and current == "(the archive header)":
            detail = " ".join(str(exc).split())
            raise BundleError(f"{archive} is damaged or not a .tar.gz archive ({detail})", fix) from None
        damaged.append(f"{current}: damaged in the archive, reading stopped here ({type(exc).__name__}: {exc})")
    return members


def verify(archive: Path) -> Verification:
    """Check every hash in a bundle: the index, record.json's tensor hashes, the split file; raise BundleError."""
    result = Verification()
    damaged: list[str] = []
    raw = _read_members(archive, damaged)
    indexes = [n for n in raw if n == INDEX_FILE or (n.count("/") == 1 and n.endswith("/" + INDEX_FILE))]
    if not indexes:
        if damaged:  # name the files without the archive's top folder, as everywhere else
            result.problems += [p.split("/", 1)[1] if "/" in p.split(":", 1)[0] else p for p in damaged]
            result.problems.append(f"{INDEX_FILE}: not reached, the archive is damaged before it")
            return result
        raise BundleError(
            f"{archive} is not a pytest-repro bundle (no {INDEX_FILE} in it)",
            "pass an archive written by 'pytest-repro export' or --repro-bundle-dir",
        )
    prefix = indexes[0][: -len(INDEX_FILE)]
    members = {n[len(prefix) :]: m for n, m in raw.items() if n.startswith(prefix)}
    result.problems += [p[len(prefix) :] if p.startswith(prefix) else p for p in damaged]
    result.problems += [f"{n}: outside the bundle's folder {prefix or '/'}" for n in raw if not n.startswith(prefix)]
    entry = members.pop(INDEX_FILE)
    try:
        index = json.loads((entry.data or b"").decode("utf-8"))
        if not isinstance(index, dict) or index.get("format") != BUNDLE_FORMAT:
            raise ValueError("not a pytest-repro bundle index")
    except (UnicodeDecodeError, ValueError) as exc:
        result.problems.append(f"{INDEX_FILE}: unreadable ({exc}); nothing else can be checked")
        return result
    if not isinstance(index.get("format_version"), int) or index["format_version"] > BUNDLE_VERSION:
        raise BundleError(
            f"{archive} has bundle format_version {index.get('format_version')!r}; this pytest-repro reads up to "
            f"{BUNDLE_VERSION}",
            "upgrade pytest-repro",
        )
    result.index = index
    listed: dict[str, Any] = index.get("files") or {}
    for name, want in sorted(listed.items()):
        got = members.get(name)
        if got is None:
            if not any(p.startswith(f"{name}:") for p in result.problems):
                result.problems.append(f"{name}: missing from the archive ({INDEX_FILE} lists it)")
            continue
        if got.sha256 != want.get("sha256") or got.size != want.get("size"):
            result.problems.append(
                f"{name}: sha256 {got.sha256[:12]}… ({got.size} bytes) but {INDEX_FILE} lists "
                f"{str(want.get('sha256'))[:12]}… ({want.get('size')} bytes): the file changed after export"
            )
        else:
            result.checked.append(f"{name}  sha256 {got.sha256[:12]}…  {got.size} bytes")
    for name in sorted(set(members) - set(listed)):
        result.problems.append(f"{name}: in the archive but not listed in {INDEX_FILE}")
    _check_record(members, index, result)
    return result


def _check_record(members: Mapping[str, _Member], index: Mapping[str, Any], result: Verification) -> None:
    """Cross-check record.json's tensor hashes, the split file and the provenance against the index."""
    record_member = members.get(f"reference/{RECORD_FILE}")
    if record_member is None or record_member.data is None:
        return
    try:
        record = json.loads(record_member.data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        result.problems.append(f"reference/{RECORD_FILE}: not valid JSON ({exc})")
        return
    for section, entry in (record.get("tensors") or {}).items():
        name = f"reference/{entry.get('file', section + '.safetensors')}"
        got = members.get(name)
        if got is None:
            if not any(p.startswith(f"{name}:") for p in result.problems):
                result.problems.append(f"{name}: missing ({RECORD_FILE} lists it)")
        elif got.sha256 != entry.get("sha256"):
            result.problems.append(
                f"{name}: sha256 {got.sha256[:12]}… but {RECORD_FILE} holds {str(entry.get('sha256'))[:12]}… for it"
            )
        else:
            result.checked.append(f"{name} matches the sha256 {RECORD_FILE} holds for it")
    split = index.get("split") or {}
    job_meta = (record.get("meta") or {}).get("job_meta") or {}
    if job_meta.get("split_sha256") and split.get("record_sha256") != job_meta.get("split_sha256"):
        result.problems.append(f"reference/{RECORD_FILE}: its split_sha256 differs from the one {INDEX_FILE} lists")
    if split.get("file"):
        got = members.get(split["file"])
        if got is not None and got.sha256 != job_meta.get("split_sha256"):
            result.problems.append(
                f"{split['file']}: sha256 {got.sha256[:12]}… but the record's split_sha256 is "
                f"{str(job_meta.get('split_sha256'))[:12]}…: not the split the reference was trained on"
            )
        elif got is not None:
            result.checked.append(f"{split['file']} is the split file the record names (split_sha256)")
    prov_member = members.get(f"reference/{PROVENANCE_FILE}")
    if prov_member is not None and prov_member.data is not None:
        try:
            provenance = yaml.safe_load(prov_member.data.decode("utf-8")) or {}
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            result.problems.append(f"reference/{PROVENANCE_FILE}: not valid YAML ({exc})")
            return
        for key, field_name in (("environment_key", "environment_key"), ("test", "test")):
            if isinstance(provenance, dict) and provenance.get(key) and provenance.get(key) != index.get(field_name):
                result.problems.append(
                    f"reference/{PROVENANCE_FILE}: {key} {provenance.get(key)!r} but {INDEX_FILE} says "
                    f"{index.get(field_name)!r}"
                )
