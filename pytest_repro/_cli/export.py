"""``pytest-repro export``: write one self-describing bundle (.tar.gz or .zip) of a reference."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from .common import CliError, environment_folder_error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments (its one-line help is its row in ``cli.COMMANDS``)."""
    parser.add_argument("target", help="a reference environment folder, or a test node id (path::test)")
    parser.add_argument("-o", "--output", default="bundle.tar.gz", help="*.tar.gz or *.zip (default: bundle.tar.gz)")
    parser.add_argument("--env", help="the environment key, when the test has references for several")
    parser.add_argument("--name", help="the check's name=, for a test that calls repro.check more than once")
    parser.add_argument("--rootdir", default=".", help="the project's rootdir (config and data paths; default: .)")
    parser.add_argument("--reference-dir", help="default: <rootdir>/reference_outputs")


def command(args: argparse.Namespace) -> int:
    """Write the bundle and say what it holds; return 0."""
    from .._publish.bundle import INDEX_FILE, BundleError
    from .._publish.bundle.build import export

    out = Path(args.output)
    try:
        folder = _export_source(args)
        bundle = export(folder, Path(args.rootdir), out)
    except BundleError as exc:
        raise CliError(exc.problem, exc.fix) from None
    except OSError as exc:
        raise CliError(f"cannot write {out} ({exc.strerror or exc})", "choose a writable path with -o") from None
    index = bundle.index
    size = out.stat().st_size
    print(
        f"wrote {out}: {index['test']} ({index['environment_key']}), {len(index['files'])} files + {INDEX_FILE}, "
        f"{size / 1024:.0f} KiB"
    )
    for note in bundle.notes:
        print(f"note: {note}")
    return 0


def _export_source(args: argparse.Namespace) -> Path:
    """Return the reference environment folder named by a folder path or a test node id."""
    from ..record import RECORD_FILE
    from ..storage import environment_dirs, reference_path

    target = Path(args.target)
    fix = "pass a reference environment folder (reference_outputs/<test module>/<test>/<environment>) or a node id"
    if target.is_dir():
        if not (target / RECORD_FILE).is_file():
            raise environment_folder_error(target, RECORD_FILE, "export", fix)
        return target
    if target.exists():
        raise CliError(f"{target} is a file, not a reference folder", fix)
    if "::" not in args.target:
        raise CliError(f"{args.target} is neither a reference folder nor a test node id (path::test)", fix)
    root = Path(args.reference_dir) if args.reference_dir else Path(args.rootdir) / "reference_outputs"
    test_dir = reference_path(root, args.target, args.name)
    envs = {k: v for k, v in environment_dirs(test_dir).items() if (v / RECORD_FILE).is_file()}
    regen = f"pytest --repro --repro-regen {shlex.quote(args.target)}"
    if not envs:
        raise CliError(
            f"no reference for {args.target} under {root} (looked in {test_dir})",
            f"record one with {regen}, or pass --rootdir/--reference-dir (and --name for a named check)",
        )
    if args.env:
        if args.env not in envs:
            raise CliError(
                f"{args.target} has no reference for environment {args.env!r} (it has: {', '.join(envs)})",
                f"pass one of them with --env, e.g. --env {next(iter(envs))}",
            )
        return envs[args.env]
    if len(envs) > 1:
        raise CliError(
            f"{args.target} has references for several environments: {', '.join(envs)}",
            f"pick one with --env, e.g. --env {next(iter(envs))}",
        )
    return next(iter(envs.values()))
