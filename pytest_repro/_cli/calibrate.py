"""``pytest-repro calibrate NODEID``: a test's noise floor per value, from N perturbed runs; ``--store`` writes it
beside this environment's reference, so that later cross-environment checks use the recording machine's floor too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import CliError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments (its one-line help is its row in ``cli.COMMANDS``)."""
    parser.description = (
        "Run the test's checks (pytest --repro) and measure each one's noise floor with --runs perturbed runs "
        "(rounding and random streams): a table per value, what 6 x the floor resolves, and explicit tolerances."
    )
    parser.add_argument("nodeid", nargs="+", help="the test(s), as pytest names them (path::test)")
    parser.add_argument("--runs", type=int, default=5, help="perturbed runs per check (default 5, at least 2)")
    parser.add_argument(
        "--store",
        action="store_true",
        help="write the floor beside this environment's reference (noise_floor.json; commit it with the reference)",
    )


def command(args: argparse.Namespace) -> int:
    """Run pytest with --repro-calibrate; its exit code, or 1 when nothing was calibrated or stored."""
    if args.runs < 2:
        raise CliError(f"--runs {args.runs}: a noise floor needs at least 2 perturbed runs", "use --runs 2 or more")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pytest", "--repro", f"--repro-calibrate={args.runs}", "-p", "no:cacheprovider"]
        cmd.append(f"--repro-report={report}")
        if args.store:
            cmd.append("--repro-calibrate-store")
        code = subprocess.call([*cmd, *args.nodeid])
        try:
            checks = json.loads(report.read_text(encoding="utf-8"))["tests"]
        except (OSError, ValueError, KeyError):
            return code or 1  # pytest said why (a usage error, nothing collected)
    calibrated = [t for t in checks if t.get("calibration")]
    if not calibrated:
        print(
            "pytest-repro calibrate: no reproducible check ran, so nothing was calibrated; give tests marked "
            "@pytest.mark.reproducible",
            file=sys.stderr,
        )
        return code or 1
    unstored = [t for t in calibrated if args.store and not t["calibration"]["stored"]]
    for t in unstored:
        print(f"pytest-repro calibrate: {t['nodeid']}: not stored: {t['calibration']['not_stored']}", file=sys.stderr)
    return code or (1 if unstored else 0)
