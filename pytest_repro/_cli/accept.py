"""References recorded on another runner: bundle what a regeneration wrote there, install it here after review.

``bundle_written`` runs in the session that regenerated references with ``--repro-bundle-dir`` (e.g. the GPU
runner); ``accept`` is ``pytest-repro accept``: it verifies every hash, refuses what cannot be installed safely,
shows what each bundle adds or replaces (a replacement with the check's own difference summary), and changes
nothing without confirmation. Installing stages the bundle's files beside the reference and swaps them into place,
as ``--repro-regen`` does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .._publish.bundle import INDEX_FILE, OUTCOME_FILE, SUFFIXES, BundleError, export, read_yaml, verify
from ..record import RECORD_FILE
from ..storage import MANIFEST_FILE, PLUGIN_FILES, PROVENANCE_FILE, safe_name
from .common import CliError

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_NOT_CONFIRMED = 0, 1, 2, 3
_REFERENCE = "reference/"


class AcceptError(Exception):
    """A usage error of ``pytest-repro accept`` (no bundle given, a path that does not exist): problem and fix."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}")


# ---------------------------------------------------------------------------------------------- producer


def bundle_written(
    outcomes: Iterable[Mapping[str, Any]], folder: Path, rootdir: Path
) -> tuple[dict[tuple[str, str | None], Path], list[str]]:
    """Write one bundle per reference this session wrote (verdict written) into ``folder``; return paths, problems."""
    written: dict[tuple[str, str | None], Path] = {}
    problems: list[str] = []
    for o in outcomes:
        if o.get("verdict") != "written" or not o.get("path"):
            continue
        nodeid, name = str(o["nodeid"]), o.get("name")
        out = folder / (safe_name(nodeid + (f"[{name}]" if name else "")) + ".tar.gz")
        try:
            export(Path(str(o["path"])), rootdir, out)
        except (BundleError, OSError) as exc:
            problems.append(
                f"could not write the bundle {out} of the reference written for {nodeid}: {exc}; "
                "give a writable --repro-bundle-dir"
            )
            continue
        written[(nodeid, name)] = out
    return written, problems


# ---------------------------------------------------------------------------------------------- consumer


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


@dataclass
class Project:
    """What the collection of this checkout says: the tests that exist, where references live, the key fields."""

    rootdir: Path
    reference_dir: Path
    env_key_fields: tuple[str, ...]
    nodeids: set[str]
    failed_files: dict[str, str]  # test file -> why collecting it failed
    root_existed: bool = True  # whether the reference folder existed before staging (else discard removes it)


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


def _inspect(bundle: Path) -> Candidate:
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
    if OUTCOME_FILE in files or f"{_REFERENCE}{RECORD_FILE}" not in files:
        c.refuse(
            "it is the bundle of a failing check (that run's outcome, with the reference it was compared with if "
            "there was one), not a recorded reference; record the references on that runner with "
            "pytest --repro --repro-regen --repro-bundle-dir=DIR (add --repro-regen-force where CI is set)"
        )
        return c
    strange = [n for n in files if n.startswith(_REFERENCE) and n[len(_REFERENCE) :] not in PLUGIN_FILES]
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


def _extract(c: Candidate, staging: Path) -> None:
    """Write the bundle's reference files into ``staging``, each checked against the index as it is written."""
    listed: dict[str, Any] = c.index.get("files") or {}
    wanted = {n: e for n, e in listed.items() if n.startswith(_REFERENCE)}
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
        with opener() as src, open(staging / rel[len(_REFERENCE) :], "wb") as dst:
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
        _extract(c, c.staging)
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
    candidates = [_inspect(b) for b in bundles]
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
    from ..storage import discard_staged

    root = project.reference_dir
    for c in candidates:
        if c.staging is not None:
            discard_staged(c.staging, root)
            c.staging = None
    if not project.root_existed and root.is_dir() and not any(root.iterdir()):
        root.rmdir()


DESCRIPTION = (
    "Verify every hash, refuse bundles of unknown tests, clashing environment keys or paths outside "
    "the reference folder, show what each adds or replaces (and how much it differs), then install them "
    "atomically. Exit codes: 0 installed (or nothing to change), 1 refused (nothing changed), 2 usage error, "
    "3 not confirmed (nothing changed; add --yes)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments (its one-line help is its row in ``cli.COMMANDS``)."""
    parser.description = DESCRIPTION
    parser.add_argument("bundles", nargs="+", metavar="BUNDLE|DIR", help="bundle files, or folders of them (artifacts)")
    parser.add_argument(
        "--yes", action="store_true", help="install without asking (otherwise: asks on a TTY, else exit 3)"
    )
    parser.add_argument("--rootdir", default=".", help="the project's rootdir (default: .)")
    parser.add_argument("--reference-dir", help="default: the ini's repro_reference_dir (reference_outputs)")


def command(args: argparse.Namespace) -> int:
    """Accept the bundles, asking on a terminal unless --yes; return the exit code."""

    def confirm(question: str) -> bool:
        if not sys.stdin.isatty():
            return False
        try:
            return input(question).strip().lower() in ("y", "yes")
        except EOFError:
            return False

    try:
        return accept(
            args.bundles, Path(args.rootdir), args.reference_dir and Path(args.reference_dir), args.yes, confirm
        )
    except AcceptError as exc:
        raise CliError(exc.problem, exc.fix) from None


def _shown(path: Path | None, rootdir: Path) -> str:
    if path is None:
        return "?"
    try:
        return str(path.relative_to(rootdir))
    except ValueError:
        return str(path)


def accept(
    paths: list[str],
    rootdir: Path,
    reference_dir: Path | None = None,
    yes: bool = False,
    confirm: Callable[[str], bool] | None = None,
    echo: Callable[[str], None] = print,
) -> int:
    """Install the references of bundles after showing what they change; return the exit code (see the README)."""
    from ..storage import commit_reference

    bundles = find_bundles(paths)
    if not bundles:
        raise AcceptError("no bundle given", "pass bundle files or a folder of them, e.g. pytest-repro accept bundles/")
    candidates, project = plan(bundles, rootdir.resolve(), reference_dir)
    root = project.reference_dir
    try:
        for c in candidates:
            what = f"{c.nodeid}{f' [{c.name}]' if c.name else ''} ({c.env_key or '?'})"
            if c.action == "refused":
                echo(f"REFUSED  {c.bundle}: {what}")
                echo("  " + "\n  ".join(c.problems))
                continue
            verb = {"add": "ADD     ", "replace": "REPLACE ", "unchanged": "SAME    "}[c.action]
            echo(f"{verb} {_shown(c.target, project.rootdir)}  <- {c.bundle}: {what}")
            echo("\n".join(f"  {line}" for line in c.lines))
        refused = [c for c in candidates if c.action == "refused"]
        todo = [c for c in candidates if c.action in ("add", "replace")]
        if refused:
            others = [c for c in candidates if c.action != "refused"]
            fix = (
                "pytest-repro accept " + " ".join(shlex.quote(str(c.bundle)) for c in others)
                if others
                else "nothing else to accept"
            )
            echo(
                f"refused {len(refused)} of {len(candidates)} bundle(s): nothing changed. "
                f"Fix or drop the refused ones; to accept only the others: {fix}"
            )
            return EXIT_REFUSED
        if not todo:
            echo(f"nothing to change: the {len(candidates)} bundle(s) match the current references")
            return EXIT_OK
        counts = f"{sum(c.action == 'add' for c in todo)} to add, {sum(c.action == 'replace' for c in todo)} to replace"
        question = f"Install these references ({counts}) under {root}? [y/N] "
        if not yes and (confirm is None or not confirm(question)):
            again = " ".join(shlex.quote(p) for p in paths)
            echo(f"nothing changed ({counts}); to install them: pytest-repro accept {again} --yes")
            return EXIT_NOT_CONFIRMED
        done: list[Candidate] = []
        for c in todo:
            assert c.staging is not None and c.target is not None
            try:
                commit_reference(c.staging, c.target)
            except OSError as exc:
                installed = ", ".join(_shown(d.target, project.rootdir) for d in done) or "none"
                echo(
                    f"could not install {_shown(c.target, project.rootdir)} ({exc}); installed before it: {installed}; "
                    "the others were not installed; fix the folder's permissions and accept again"
                )
                return EXIT_REFUSED
            c.staging = None
            done.append(c)
            echo(f"{'added' if c.action == 'add' else 'replaced'} {_shown(c.target, project.rootdir)}")
        echo(
            f"installed {len(done)} reference(s): {sum(c.action == 'add' for c in done)} added, "
            f"{sum(c.action == 'replace' for c in done)} replaced. Review them with "
            f"git diff -- {_shown(root, project.rootdir)} (git status for new ones), run pytest --repro, "
            "then commit them"
        )
        return EXIT_OK
    finally:
        discard(candidates, project)
