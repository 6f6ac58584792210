"""The ``pytest-repro`` command: manifests, drift, reports, migrate, bundles, bisect, demo, worker daemons.

This module only dispatches. Each command is one row of ``COMMANDS`` (its name and its line in ``pytest-repro
--help``, in that order) and one module ``_cli/<name>.py`` with two functions: ``add_arguments(parser)`` adds its
arguments (and a longer description, if any) to its sub-parser, ``command(args)`` runs it and returns the exit
code, raising ``_cli.common.CliError`` for a user error (printed as one line, exit code 2). Adding a command is
one new ``_cli/<name>.py`` and one row. Only the module of the command given is imported, so that every command
starts fast; command modules import what is heavy inside ``command`` all the same.

The other modules in ``_cli/`` serve the commands: ``common`` (CliError, reading the files a user points at),
``git`` (git plumbing: revisions, temporary worktrees, ``git bisect``), ``bisect_step`` (one step of bisect),
``accept_read`` and ``accept_stage`` (reading a bundle; placing, staging and comparing it in this checkout).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from ._cli.common import CliError

COMMANDS = (
    ("demo", "the gate in ~20 s: record a reference, pass, change the job, fail (temp project)"),
    ("manifest", "print this machine's environment manifest (YAML)"),
    ("diff", "classified drift between two manifests (files or reference folders)"),
    ("html", "render the HTML report from a saved JSON report (--repro-report)"),
    ("plot", "plot a reference's loss trace to PNG"),
    ("migrate", "rename legacy 'cpu' reference folders to cpu-<vendor>-<capability>"),
    ("export", "write one self-describing bundle (.tar.gz or .zip) of a reference"),
    ("verify", "check every hash in a bundle; exit 1 when anything is inconsistent"),
    ("accept", "install references from bundles recorded on another runner, after showing what they change"),
    ("history", "a check's verdicts, environments and final losses across logged runs"),
    ("calibrate", "measure a test's noise floor per value (perturbed runs); --store keeps it beside the reference"),
    ("bisect", "the first commit whose results differ from --good's reference (exit 0 found, 1 not narrowed to one)"),
    ("worker", "status or stop the warm worker daemon that later sessions fork their runs from"),
)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line ending with the fix."""

    def error(self, message: str) -> NoReturn:
        """Print ``<prog>: <message>; see <prog> --help`` on stderr and exit with code 2."""
        self.exit(2, f"{self.prog}: {message}; see '{self.prog} --help'\n")


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser, with the arguments of the command that ``argv`` names (its module imported)."""
    # --help shows the docstring's first paragraph, the summary
    parser = _Parser(prog="pytest-repro", description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    # The only top-level option is --help, so the first word that is not an option is the command
    given = next((arg for arg in argv if not arg.startswith("-")), None)
    for name, line in COMMANDS:
        command = sub.add_parser(name, help=line)
        if name == given:
            module = importlib.import_module(f"._cli.{name}", __package__)
            module.add_arguments(command)
            command.set_defaults(func=module.command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (diff: 1 on numeric drift; 2 on a usage or input error)."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parser(argv).parse_args(argv)
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # a closed pipe (| head) surfaces here, inside the handler
    except CliError as exc:
        print(f"pytest-repro {args.command}: {exc.problem}; {exc.fix}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (e.g. `| head -1`): stop quietly, as Unix tools do. Point stdout at devnull
        # so that the interpreter's final flush does not raise again (Python docs, "Note on SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the closed pipe
    return code


if __name__ == "__main__":
    sys.exit(main())
