"""References recorded on another runner, installed here after review: ``pytest-repro accept``.

The session that regenerated references with ``--repro-bundle-dir`` (e.g. the GPU runner) bundles them
(``_publish.bundle.publish.bundle_written``). ``accept`` verifies every hash, refuses what cannot be installed
safely, shows what each bundle adds or replaces (a replacement with the check's own difference summary), and
changes nothing without confirmation. Installing stages the bundle's files beside the reference and swaps them
into place, as ``--repro-regen`` does.

This module is the command (what it shows, the confirmation, the install); reading a bundle is ``accept_read``,
placing, staging and comparing it in this checkout ``accept_stage`` (both imported when the command runs).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .common import CliError

if TYPE_CHECKING:
    from .accept_read import Candidate

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_NOT_CONFIRMED = 0, 1, 2, 3


# ---------------------------------------------------------------------------------------------- consumer


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
    from .accept_read import AcceptError

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
    from ..staging import commit_reference
    from .accept_read import AcceptError, find_bundles
    from .accept_stage import discard, plan

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
