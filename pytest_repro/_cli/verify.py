"""``pytest-repro verify BUNDLE``: check every hash in a bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import CliError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments (its one-line help is its row in ``cli.COMMANDS``)."""
    parser.add_argument("bundle")


def command(args: argparse.Namespace) -> int:
    """Print each file's check; return 1 when anything is inconsistent, else 0."""
    from .._publish.bundle import BundleError
    from .._publish.bundle.verify import verify

    try:
        result = verify(Path(args.bundle))
    except BundleError as exc:
        raise CliError(exc.problem, exc.fix) from None
    index = result.index
    if index:
        check = f" [{index['check']}]" if index.get("check") else ""
        print(
            f"bundle of {index.get('test')}{check} (environment {index.get('environment_key')}), "
            f"written {index.get('created')} by pytest-repro {index.get('plugin_version')}"
        )
    for line in result.checked:
        print(f"  ok   {line}")
    for line in result.problems:
        print(f"  BAD  {line}")
    if result.problems:
        files = ", ".join(result.bad_files)
        print(f"{args.bundle}: INCONSISTENT, {len(result.problems)} problem(s) in: {files}")
        return 1
    print(f"{args.bundle}: OK, {len(index.get('files') or {})} files + bundle.json, every hash matches")
    return 0
