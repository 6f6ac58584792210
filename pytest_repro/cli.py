"""The ``pytest-repro`` command: print this machine's manifest, or diff two manifests."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml


def _load(path: str) -> dict[str, Any]:
    """Load a manifest from YAML/JSON, or the manifest.yaml inside a reference folder."""
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.yaml"
    data = yaml.safe_load(p.read_text(encoding="utf-8"))  # JSON is YAML too
    if not isinstance(data, dict):
        raise SystemExit(f"pytest-repro: {p} does not hold a manifest (a mapping)")
    return data


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (diff: 1 when numeric drift was found)."""
    parser = argparse.ArgumentParser(prog="pytest-repro", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("manifest", help="print this machine's environment manifest (YAML)")
    m.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    m.add_argument("--package", action="append", default=[], help="also record this package's version (repeatable)")
    m.add_argument(
        "--identity",
        choices=("hash", "omit", "plain"),
        default="hash",
        help="how hostname and user name appear (default: hashed)",
    )
    d = sub.add_parser("diff", help="classified drift between two manifests (files or reference folders)")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--json", action="store_true", help="print JSON instead of aligned lines")
    h = sub.add_parser("html", help="render the HTML report from a saved JSON report (--repro-report)")
    h.add_argument("report")
    h.add_argument("-o", "--output", default="repro-report.html")
    p = sub.add_parser("plot", help="plot a reference's loss trace to PNG")
    p.add_argument("reference", help="a reference folder (the one holding record.json)")
    p.add_argument("-o", "--output", default="loss.png")
    args = parser.parse_args(argv)

    if args.command == "html":
        from .report_html import write_html

        write_html(Path(args.output), json.loads(Path(args.report).read_text(encoding="utf-8")))
        print(f"wrote {args.output}")
        return 0

    if args.command == "plot":
        from .record import load_record
        from .report_html import loss_plot_png

        record = load_record(Path(args.reference))
        title = f"{args.reference} (seed {record.seed}, {record.device})"
        Path(args.output).write_bytes(loss_plot_png({"reference": record.losses}, None, title))
        print(f"wrote {args.output}")
        return 0

    if args.command == "manifest":
        from .manifest import collect_manifest

        manifest = collect_manifest(extra_packages=args.package, identity=args.identity)
        if args.json:
            print(json.dumps(manifest, sort_keys=True, indent=2))
        else:
            print(yaml.safe_dump(manifest, sort_keys=True), end="")
        return 0

    from .manifest import diff_manifests

    drifts = diff_manifests(_load(args.a), _load(args.b))
    numeric = any(x.category == "numeric" for x in drifts)
    if args.json:
        rows = [{"path": x.path, "old": x.old, "new": x.new, "category": x.category} for x in drifts]
        print(json.dumps({"numeric_drift": numeric, "changes": rows}, sort_keys=True, indent=2, default=str))
    elif not drifts:
        print("no drift: the manifests are identical")
    else:
        for x in drifts:
            print(x.describe())
        print(f"{len(drifts)} change(s); numeric drift: {'yes' if numeric else 'no'}")
    return 1 if numeric else 0


if __name__ == "__main__":
    sys.exit(main())
