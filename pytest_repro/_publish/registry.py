"""The publishers of a session, in the order they run; and the two calls plugin.py makes.

A new tracker is one new module (a class with ``problems`` and ``publish``, see ``base.Publisher``) and one
row here. The order matters: trackers attach the bundles as artifacts, and the reports come last because
the JSON report states the run's final exit status.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Publication, Publisher
from .bundle.publish import Bundles
from .mlflow import MLflow
from .report import HtmlReport, JsonReport
from .unused import UnusedReferences
from .wandb import WandB

if TYPE_CHECKING:
    import pytest

    from ..session import ReproSession
    from ..settings import Settings

PUBLISHERS: tuple[Publisher, ...] = (
    UnusedReferences(),  # --repro-unused: report, fail on or delete references no test owns
    Bundles(),  # --repro-bundle-dir: failing checks and written references as archives
    MLflow(),  # --repro-mlflow
    WandB(),  # --repro-wandb
    JsonReport(),  # --repro-report
    HtmlReport(),  # --repro-html
)


def start_up_problems(settings: Settings, config: pytest.Config) -> list[str]:
    """Every publisher's problems with its options, in the registry's order (each a usage error)."""
    return [problem for publisher in PUBLISHERS for problem in publisher.problems(settings, config)]


def publish_all(session: ReproSession, config: pytest.Config, exitstatus: int) -> int:
    """Run every publisher in order; return the session's exit status after them."""
    run = Publication(session, config)
    for publisher in PUBLISHERS:
        status = publisher.publish(run, exitstatus)
        if status is not None:
            exitstatus = status
    return exitstatus
