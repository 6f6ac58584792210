"""--repro-bundle-dir: a bundle of every failing check and of every reference the run wrote, at session end."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...record import RECORD_FILE
from ...storage import safe_name
from ..base import failed
from . import BundleError

if TYPE_CHECKING:
    import pytest

    from ...session import ReproSession
    from ...settings import Settings
    from ..base import Publication

_PASSING = ("passed", "passed-cross-env", "unchanged", "written")


def bundle_written(
    outcomes: list[dict[str, Any]], folder: Path, rootdir: Path
) -> tuple[dict[tuple[str, str | None], Path], list[str]]:
    """Write one bundle per reference this session wrote (verdict written) into ``folder``; return paths, problems."""
    from .build import export

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


def bundle_failing(
    outcomes: list[dict[str, Any]], folder: Path, rootdir: Path
) -> tuple[dict[tuple[str, str | None], Path], list[str]]:
    """Write one bundle per failing check into ``folder``; return the paths by (nodeid, name), and problems."""
    from .build import export

    written: dict[tuple[str, str | None], Path] = {}
    problems: list[str] = []
    for o in outcomes:
        if o.get("verdict") in _PASSING:
            continue
        nodeid, name = str(o["nodeid"]), o.get("name")
        path = Path(o["path"]) if o.get("path") else None
        reference = path if path is not None and (path / RECORD_FILE).is_file() else None
        out = folder / (safe_name(nodeid + (f"[{name}]" if name else "")) + ".tar.gz")
        try:
            export(reference, rootdir, out, o)
        except BundleError as exc:
            try:  # a corrupt reference: bundle the outcome alone, which says why
                export(None, rootdir, out, {**o, "details": [*o.get("details", []), exc.problem]})
            except (BundleError, OSError) as again:
                problems.append(f"could not write the bundle {out}: {again}; give a writable --repro-bundle-dir")
                continue
        except OSError as exc:
            problems.append(f"could not write the bundle {out}: {exc}; give a writable --repro-bundle-dir")
            continue
        written[(nodeid, name)] = out
    return written, problems


def bundle_dir_problem(value: str) -> str | None:
    """Say what is wrong with a --repro-bundle-dir value (a file, an unwritable place), or None."""
    path = Path(value)
    current = path
    while not current.exists():
        if current.parent == current:
            break
        current = current.parent
    if current.exists() and not current.is_dir():
        return (
            f"--repro-bundle-dir={value}: {current} is a file, not a folder; "
            "give a folder, e.g. --repro-bundle-dir=repro-bundles"
        )
    if current.exists() and not os.access(current, os.W_OK | os.X_OK):
        return (
            f"--repro-bundle-dir={value}: {current} is not writable; "
            "give a writable folder, e.g. --repro-bundle-dir=/tmp/repro-bundles"
        )
    return None


# ---------------------------------------------------------------------------------------------- verify


class Bundles:
    """--repro-bundle-dir: the folder checked at start-up; at the end, failing checks and written references bundled."""

    def problems(self, settings: Settings, config: pytest.Config) -> list[str]:
        """Whether --repro-bundle-dir names a folder that can be created and written."""
        bundle_dir = settings.bundle_dir
        problem = bundle_dir_problem(bundle_dir) if bundle_dir else None
        return [problem] if problem else []

    def publish(self, run: Publication, exitstatus: int) -> int | None:
        """Write the bundles (kept in ``run.bundles`` for the trackers' artifacts); a failure fails a passing run."""
        bundle_dir = run.session.settings.bundle_dir
        if not bundle_dir:
            return None
        run.bundles, ok = _write_bundles(run.session, bundle_dir)
        return None if ok else failed(exitstatus)


def _write_bundles(session: ReproSession, bundle_dir: str) -> tuple[dict[tuple[str, str | None], Path], bool]:
    """Bundle failing checks and written references into ``bundle_dir`` and say so in the summary; (bundles, ok)."""
    bundles, problems = bundle_failing(session.outcomes, Path(bundle_dir), session.rootdir)
    written, more = bundle_written(session.outcomes, Path(bundle_dir), session.rootdir)
    session.notes += problems + more
    if bundles:
        session.notes.append(f"{len(bundles)} bundle(s) of failing checks written to {bundle_dir}:")
        session.notes += [f"  {path}" for path in bundles.values()]
    if written:
        session.notes.append(
            f"{len(written)} bundle(s) of the references this run wrote (install them elsewhere with "
            f"pytest-repro accept) written to {bundle_dir}:"
        )
        session.notes += [f"  {path}" for path in written.values()]
    if not bundles and not written:
        session.notes.append(f"no failing checks: no bundles written to {bundle_dir}")
    return bundles, not (problems or more)
