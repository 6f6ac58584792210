"""``pytest-repro accept``, the bundle side: find the bundles given, verify them, read what each claims, extract it.

Nothing here knows the project: placing a bundle in this checkout and comparing it is ``accept_stage``.
"""

from __future__ import annotations

import hashlib
import shlex
import tarfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .._publish.bundle import INDEX_FILE, OUTCOME_FILE, SUFFIXES, BundleError
from .._publish.bundle.verify import verify
from ..errors import FixableError
from ..record import RECORD_FILE
from ..storage import PLUGIN_FILES, safe_name

REFERENCE = "reference/"  # the bundle's folder of reference files


class AcceptError(FixableError):
    """A usage error of ``pytest-repro accept`` (no bundle given, a path that does not exist): problem and fix."""


@dataclass
class Candidate:
    """One bundle on its way in: where it would go, what it changes, or why it is refused."""

    bundle: Path
    index: dict[str, Any] = field(default_factory=dict)
    nodeid: str = ""
    name: str | None = None
    env_key: str = ""
    target: Path | None = None
    staging: Path | None = None
    action: str = "pending"  # then "add", "replace", "unchanged" or "refused"
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def refuse(self, problem: str) -> None:
        """Record why this bundle cannot be installed."""
        self.problems.append(problem)
        self.action = "refused"


def find_bundles(paths: Iterable[str]) -> list[Path]:
    """Expand the command line: bundle files as given, folders into the bundles under them; raise AcceptError."""
    fix = "pass bundle files (*.tar.gz, *.zip) written by --repro-bundle-dir or 'pytest-repro export', or a folder"
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(SUFFIXES))
            if not inside:
                raise AcceptError(f"{path} holds no bundle (*.tar.gz, *.tgz, *.zip)", fix)
            found += inside
        elif path.exists():
            found.append(path)
        else:
            raise AcceptError(f"{path} does not exist", fix)
    return list(dict.fromkeys(found))


def read_bundle(bundle: Path) -> Candidate:
    """Verify a bundle's hashes and read what it claims to be (test, check name, environment key)."""
    c = Candidate(bundle)
    try:
        checked = verify(bundle)
    except BundleError as exc:
        c.refuse(f"{exc.problem}; {exc.fix}")
        return c
    c.index = checked.index
    if checked.problems:
        c.refuse(
            "pytest-repro verify finds it inconsistent (tampered, damaged or unsafe): "
            + "; ".join(checked.problems[:4])
            + ("; …" if len(checked.problems) > 4 else "")
            + f"; check it with: pytest-repro verify {shlex.quote(str(bundle))}, and download the artifact again"
        )
        return c
    files = c.index.get("files") or {}
    c.nodeid, c.env_key = str(c.index.get("test") or ""), str(c.index.get("environment_key") or "")
    if OUTCOME_FILE in files or f"{REFERENCE}{RECORD_FILE}" not in files:
        c.refuse(
            "it is the bundle of a failing check (that run's outcome, with the reference it was compared with if "
            "there was one), not a recorded reference; record the references on that runner with "
            "pytest --repro --repro-regen --repro-bundle-dir=DIR (add --repro-regen-force where CI is set)"
        )
        return c
    strange = [n for n in files if n.startswith(REFERENCE) and n[len(REFERENCE) :] not in PLUGIN_FILES]
    if strange:
        c.refuse(
            f"it holds {', '.join(sorted(strange))} under reference/, which is not a reference file "
            f"({', '.join(sorted(PLUGIN_FILES))}): it would be written outside the reference folder or is not "
            "pytest-repro's; install only bundles written by pytest-repro"
        )
        return c
    if not c.nodeid or "::" not in c.nodeid:
        c.refuse(f"its {INDEX_FILE} names no test node id (test: {c.nodeid!r}); export it again")
        return c
    if not c.env_key or safe_name(c.env_key) != c.env_key or c.env_key.startswith("."):
        c.refuse(f"its environment key {c.env_key!r} is not a plain folder name; export it again")
        return c
    return c


def _members(archive: Path) -> Iterable[tuple[str, Callable[[], IO[bytes]]]]:
    """Yield (name without a leading ./, opener) for every regular member of a .tar.gz or .zip."""
    with open(archive, "rb") as fh:
        zipped = fh.read(2) == b"PK"
    if zipped:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():

                    def unzip(info: zipfile.ZipInfo = info) -> IO[bytes]:
                        return zf.open(info)

                    yield _plain(info.filename), unzip
        return
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            if member.isfile():

                def opener(member: tarfile.TarInfo = member) -> IO[bytes]:
                    stream = tar.extractfile(member)
                    assert stream is not None
                    return stream

                yield _plain(member.name), opener


def _plain(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def extract(c: Candidate, staging: Path) -> None:
    """Write the bundle's reference files into ``staging``, each checked against the index as it is written."""
    listed: dict[str, Any] = c.index.get("files") or {}
    wanted = {n: e for n, e in listed.items() if n.startswith(REFERENCE)}
    names = [n for n, _ in _members(c.bundle)]
    # the index's folder, found as verify finds it: bundle.json at the top or one folder down
    indexes = [n for n in names if n == INDEX_FILE or (n.count("/") == 1 and n.endswith("/" + INDEX_FILE))]
    top = indexes[0][: -len(INDEX_FILE)] if indexes else ""
    staging.mkdir(parents=True)
    seen = set()
    for name, opener in _members(c.bundle):
        rel = name[len(top) :] if name.startswith(top) else None
        if rel not in wanted or rel in seen:
            continue
        seen.add(rel)
        digest, size = hashlib.sha256(), 0
        with opener() as src, open(staging / rel[len(REFERENCE) :], "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
                dst.write(chunk)
        entry = wanted[rel]
        if digest.hexdigest() != entry.get("sha256") or size != entry.get("size"):
            raise BundleError(
                f"{rel} changed in {c.bundle} since it was verified (sha256 {digest.hexdigest()[:12]}…)",
                "download the artifact again",
            )
    if seen != set(wanted):
        raise BundleError(f"{', '.join(sorted(set(wanted) - seen))} missing from {c.bundle}", "export it again")
