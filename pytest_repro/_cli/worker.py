"""``pytest-repro worker status|stop``: the warm worker daemons of a project (see ``_exec/daemon``)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from .common import CliError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments (its one-line help is its row in ``cli.COMMANDS``)."""
    parser.add_argument("action", choices=("status", "stop"), help="status: what runs and for whom; stop: end them")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="pytest's cache folder (default: the nearest .pytest_cache in this folder or above)",
    )
    parser.add_argument("--pid", type=int, help="stop: only the daemon with this pid")


def _folder(cache_dir: Path | None) -> Path | None:
    from .._exec.daemon import DIR_NAME

    if cache_dir is not None:
        if not cache_dir.is_dir():
            raise CliError(f"{cache_dir} is not a folder", "pass pytest's cache folder, e.g. --cache-dir .pytest_cache")
        return cache_dir / "d" / DIR_NAME
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / ".pytest_cache").is_dir():
            return folder / ".pytest_cache" / "d" / DIR_NAME
    return None


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _freshness(state: dict[str, Any]) -> str:
    """Whether a daemon still matches this interpreter's packages and pytest-repro ('' for another venv)."""
    from .._exec.daemon_key import own_digest, packages_digest

    if state.get("python") != os.path.realpath(sys.executable) or state.get("prefix") != sys.prefix:
        return f"for {state.get('python')}"
    now = {"packages": packages_digest(), "own": own_digest()}
    names = {"packages": "installed packages", "own": "pytest-repro"}
    stale = [names[field] for field in names if state.get(field) != now[field]]
    return f"out of date ({' and '.join(stale)} changed; the next session retires it)" if stale else "up to date"


def command(args: argparse.Namespace) -> int:
    """Print the daemons' status, or stop them; return 0."""
    from .._exec.daemon import daemons, stop

    folder = _folder(args.cache_dir)
    if folder is None:
        print(f"no worker daemon: no .pytest_cache in {Path.cwd()} or above (pass --cache-dir if it lives elsewhere)")
        return 0
    found = daemons(folder)
    if args.pid is not None:
        found = [d for d in found if d[1]["pid"] == args.pid]
        if not found:
            raise CliError(f"no worker daemon with pid {args.pid} under {folder}", "see pytest-repro worker status")
    if not found:
        print(f"no worker daemon under {folder}")
        return 0
    for place, state, status in found:
        pid = state["pid"]
        if args.action == "stop":
            was = stop(place, state)
            gone = f"removed the files of worker daemon pid {pid} (not running)"
            print(f"stopped worker daemon pid {pid}" if was else gone)
            continue
        if status is None:
            print(f"worker daemon pid {pid}: not running (stale files; the next session replaces them)")
            continue
        now = time.time()
        idle = f", idle {_ago(status['idle_for_s'])} of {_ago(status['idle_s'])}" if status["idle_for_s"] else ""
        print(
            f"worker daemon pid {pid}: {'retired, ' if status['retired'] else ''}up {_ago(now - status['started'])}, "
            f"{status['sessions']} session(s) now, {status['running']} run(s) in progress, {status['served']} run(s) "
            f"for {status['sessions_served']} session(s){idle}; {status['modules']} modules imported; "
            f"{_freshness(state)}"
        )
        print(f"  key {state['key']}, log {place.log}, socket {place.socket}")
    return 0
