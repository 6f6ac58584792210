"""``pytest-repro manifest``: print this machine's environment manifest."""

from __future__ import annotations

import argparse
import json

import yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments (its one-line help is its row in ``cli.COMMANDS``)."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    parser.add_argument(
        "--package", action="append", default=[], help="also record this package's version (repeatable)"
    )
    parser.add_argument(
        "--identity",
        choices=("hash", "omit", "plain"),
        default="hash",
        help="how hostname and user name appear (default: hashed)",
    )


def command(args: argparse.Namespace) -> int:
    """Print the manifest as YAML or JSON; return 0."""
    from ..manifest import collect_manifest

    manifest = collect_manifest(extra_packages=args.package, identity=args.identity, kind="cli")
    if args.json:
        print(json.dumps(manifest, sort_keys=True, indent=2))
    else:
        print(yaml.safe_dump(manifest, sort_keys=True), end="")
    return 0
