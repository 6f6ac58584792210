"""``pytest-repro history NODEID``: a check's verdicts, environments and final losses across logged MLflow runs."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .common import CliError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments (its one-line help is its row in ``cli.COMMANDS``)."""
    parser.add_argument("nodeid", help="the test's node id, as pytest prints it")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else the local store in <rootdir>/mlruns")
    parser.add_argument("--experiment", help="default: MLFLOW_EXPERIMENT_NAME, else the project's name")
    parser.add_argument("--name", help="only the check with this name=")
    parser.add_argument("--rootdir", default=".", help="the project's rootdir (default: .)")
    parser.add_argument("--limit", type=int, default=50, help="the latest N runs (default: 50)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def command(args: argparse.Namespace) -> int:
    """Print the check's logged runs as a table or JSON; return 0."""
    from .._publish.extras import extra_install
    from .._publish.history import format_history, read_history
    from .._publish.mlflow import LOCAL_DB, LOCAL_STORE, local_uri
    from .._publish.trackers import experiment_name

    rootdir = Path(args.rootdir)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_uri(rootdir)
    if uri == local_uri(rootdir) and not (rootdir / LOCAL_STORE / LOCAL_DB).is_file():
        raise CliError(
            f"no MLflow store at {rootdir / LOCAL_STORE / LOCAL_DB}",
            "log some runs first with pytest --repro --repro-mlflow, or pass --tracking-uri URI (or --rootdir)",
        )
    experiment = args.experiment or experiment_name(rootdir)
    try:
        rows = read_history(uri, experiment, args.nodeid, args.name, args.limit)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("mlflow", "sqlalchemy", "alembic"):
            raise
        raise CliError(
            f"{exc.name} is not installed (history reads the MLflow store)", extra_install("mlflow")
        ) from None
    except LookupError:
        raise CliError(
            f"the MLflow store at {uri} has no experiment {experiment!r}",
            "pass --experiment NAME (default: the project's name), or log runs with pytest --repro --repro-mlflow",
        ) from None
    except Exception as exc:  # MLflow's client raises its own errors for unreachable or invalid stores
        raise CliError(
            f"cannot read the MLflow store at {uri} ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})",
            "check --tracking-uri and that the tracking server is reachable",
        ) from None
    if not rows:
        named = f" [{args.name}]" if args.name else ""
        raise CliError(
            f"no runs of {args.nodeid}{named} in experiment {experiment!r} at {uri}",
            "check the node id (as pytest prints it), or log runs with pytest --repro --repro-mlflow",
        )
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    for line in format_history(rows, args.nodeid, experiment, uri):
        print(line)
    return 0
