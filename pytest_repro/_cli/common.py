"""What the command modules share: the one-line user error, and reading or writing the files a user points at."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import FixableError


class CliError(FixableError):
    """A user error: printed as one line ``pytest-repro <command>: <problem>; <fix>``, exit code 2."""


def where(exc: Exception) -> str:
    """Return ' (line L, column C: problem)' for a YAML/JSON parse error, on one line."""
    if isinstance(exc, json.JSONDecodeError):
        return f" (line {exc.lineno}, column {exc.colno}: {exc.msg})"
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or type(exc).__name__
    if mark is not None:
        return f" (line {mark.line + 1}, column {mark.column + 1}: {problem})"
    return f" ({' '.join(str(exc).split())})"


def read_text(path: Path, what: str, fix: str) -> str:
    """Read a text file, turning every way it can be unreadable into a CliError."""
    if not path.exists():
        raise CliError(f"{path} does not exist", fix)
    if path.is_dir():
        raise CliError(f"{path} is a folder, not {what}", fix)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CliError(f"{path} is not a text file (not UTF-8)", fix) from None
    except OSError as exc:
        raise CliError(f"cannot read {path} ({exc.strerror or exc})", fix) from None


def _children_with(folder: Path, filename: str) -> list[str]:
    """Return the names of ``folder``'s sub-folders that hold ``filename``."""
    try:
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / filename).is_file())
    except OSError:
        return []


def environment_folder_error(folder: Path, filename: str, command: str, generic_fix: str) -> CliError:
    """Explain a folder that lacks ``filename``: name its environment folders when it is a test folder."""
    envs = _children_with(folder, filename)
    if envs:
        return CliError(
            f"{folder} is a test folder holding the environment folder(s) {', '.join(envs)}, not a reference",
            f"pass one of them, e.g. pytest-repro {command} {folder / envs[0]}",
        )
    return CliError(f"{folder} holds no {filename}", generic_fix)


def write_bytes(path: Path, data: bytes) -> None:
    """Write a file the user named with -o (its folders too); CliError when it cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as exc:
        raise CliError(f"cannot write {path} ({exc.strerror or exc})", "choose a writable path with -o") from None


def missing_matplotlib(exc: ModuleNotFoundError) -> CliError:
    """The CliError for a missing matplotlib (the install command); re-raise any other missing module."""
    if (exc.name or "").split(".")[0] != "matplotlib":
        raise exc
    from .._publish.extras import extra_install

    return CliError("matplotlib is not installed (it draws the loss plots)", extra_install("report"))
