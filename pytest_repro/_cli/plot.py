"""``pytest-repro plot REFERENCE``: plot a reference's loss trace to PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import CliError, environment_folder_error, missing_matplotlib, write_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments (its one-line help is its row in ``cli.COMMANDS``)."""
    parser.add_argument("reference", help="a reference environment folder (the one holding record.json)")
    parser.add_argument("-o", "--output", default="loss.png")


def command(args: argparse.Namespace) -> int:
    """Write the PNG of the reference's losses; return 0."""
    from .._publish.report_plots import loss_plot_png
    from ..record import RECORD_FILE, CorruptRecordError, load_record

    folder = Path(args.reference)
    fix = "pass a reference environment folder (reference_outputs/<test module>/<test>/<environment>)"
    if not folder.exists():
        raise CliError(f"{folder} does not exist", fix)
    if not folder.is_dir():
        raise CliError(f"{folder} is a file, not a reference folder", fix)
    if not (folder / RECORD_FILE).is_file():
        raise environment_folder_error(folder, RECORD_FILE, "plot", fix + ", the one holding record.json")
    try:
        record = load_record(folder)
    except CorruptRecordError as exc:
        raise CliError(
            f"the reference {folder} is corrupt ({exc.detail})", "regenerate it with pytest --repro --repro-regen"
        ) from None
    title = f"{folder} (seed {record.seed}, {record.device})"
    try:
        png = loss_plot_png({"reference": record.losses}, None, title)
    except ModuleNotFoundError as exc:
        raise missing_matplotlib(exc) from None
    write_bytes(Path(args.output), png)
    print(f"wrote {args.output}")
    return 0
