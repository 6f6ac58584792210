"""``pytest-repro diff A B``: classified drift between two manifests (files or reference folders)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .common import CliError, environment_folder_error, read_text, where

if TYPE_CHECKING:
    from .._judge.drift import Drift

_MANIFEST_KEYS = frozenset({"schema", "python", "cpu", "torch", "packages", "env"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments (its one-line help is its row in ``cli.COMMANDS``)."""
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--json", action="store_true", help="print JSON instead of aligned lines")


def load_manifest(path: str) -> dict[str, Any]:
    """Load a manifest from a YAML/JSON file, or the manifest.yaml inside a reference folder."""
    from ..storage import MANIFEST_FILE, parse_yaml

    fix = (
        "pass a file written by 'pytest-repro manifest' or a reference environment folder "
        "(reference_outputs/<test module>/<test>/<environment>, the one holding manifest.yaml)"
    )
    p = Path(path)
    if p.is_dir():
        if not (p / MANIFEST_FILE).is_file():
            raise environment_folder_error(p, MANIFEST_FILE, "diff", fix)
        p = p / MANIFEST_FILE
    text = read_text(p, "a manifest file", fix)
    try:
        data = json.loads(text) if p.suffix == ".json" else parse_yaml(text)  # JSON is YAML too; no aliases (bombs)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if p.suffix == ".json" else "YAML or JSON"
        raise CliError(f"{p} is not valid {kind}{where(exc)}", "fix the file, or write it again: " + fix) from None
    if not isinstance(data, dict) or len(_MANIFEST_KEYS & set(data)) < 3 or "tensors" in data:
        raise CliError(f"{p} does not hold a pytest-repro manifest (a mapping with schema, python, torch, ...)", fix)
    return data


def _change(drift: Drift) -> dict[str, Any]:
    """One change as JSON: a side where the field is absent has no old/new key (null is an explicit null).

    A list of plain values also says the items ``added`` and ``removed``.
    """
    out: dict[str, Any] = {"path": drift.path, "category": drift.category, "change": drift.change}
    if drift.change != "added":
        out["old"] = drift.old
    if drift.change != "removed":
        out["new"] = drift.new
    items = drift.list_items()
    if items is not None:
        out["added"], out["removed"] = items
    return out


def command(args: argparse.Namespace) -> int:
    """Print the drift between the two manifests; return 1 on numeric drift, else 0."""
    from .._judge.drift import diff_manifests, run_only_fields, run_only_note

    old, new = load_manifest(args.a), load_manifest(args.b)
    drifts = diff_manifests(old, new)
    note = run_only_note(old, new)
    numeric = any(x.category == "numeric" for x in drifts)
    if args.json:
        body: dict[str, Any] = {
            "numeric_drift": numeric,
            "changes": [_change(x) for x in drifts],
        }
        if note:
            body["not_compared"] = {"fields": run_only_fields(old, new), "reason": note}
        print(json.dumps(body, sort_keys=True, indent=2, default=str))
        return 1 if numeric else 0
    for x in drifts:
        print(x.describe())
    if note:
        print(note)
    if not drifts:
        print("no drift: the compared fields are identical" if note else "no drift: the manifests are identical")
    else:
        print(f"{len(drifts)} change(s); numeric drift: {'yes' if numeric else 'no'}")
    return 1 if numeric else 0
