"""``pytest-repro html REPORT``: render the HTML report from a saved JSON report (``--repro-report``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import CliError, missing_matplotlib, read_text, where


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments (its one-line help is its row in ``cli.COMMANDS``)."""
    parser.add_argument("report")
    parser.add_argument("-o", "--output", default="repro-report.html")


def load_report(path: str) -> dict[str, Any]:
    """Load a JSON report written by ``pytest --repro-report=PATH.json``; CliError when it is not one."""
    from .._publish.report import REPORT_SCHEMA_VERSION

    fix = "pass the file written by 'pytest --repro --repro-report=PATH.json'"
    p = Path(path)
    text = read_text(p, "a JSON report", fix)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{p} is not valid JSON{where(exc)}", fix) from None
    if not isinstance(data, dict) or "schema_version" not in data or not isinstance(data.get("tests"), list):
        raise CliError(f"{p} is not a pytest-repro report (no schema_version and tests list)", fix)
    version = data["schema_version"]
    if not isinstance(version, int) or version > REPORT_SCHEMA_VERSION:
        raise CliError(
            f"{p} has report schema_version {version!r}; this pytest-repro reads up to {REPORT_SCHEMA_VERSION}",
            "upgrade pytest-repro, or render the report with the version that wrote it",
        )
    return data


def command(args: argparse.Namespace) -> int:
    """Write the HTML page of the report; return 0."""
    from .._publish.report_html import write_html

    report = load_report(args.report)
    out = Path(args.output)
    try:
        write_html(out, report)
    except ModuleNotFoundError as exc:
        raise missing_matplotlib(exc) from None
    except OSError as exc:
        raise CliError(f"cannot write {out} ({exc.strerror or exc})", "choose a writable path with -o") from None
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise CliError(
            f"{args.report} is a malformed pytest-repro report ({type(exc).__name__}: {exc})",
            "write it again with 'pytest --repro --repro-report=PATH.json'",
        ) from None
    print(f"wrote {out}")
    return 0
