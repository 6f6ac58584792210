"""Publishing a session's outcomes: the Publisher protocol and what one session's publishers share.

Every destination of a session's outcomes (the unused-reference check, bundles, MLflow, W&B, the JSON and
HTML reports) is one Publisher: ``problems`` checks its options at start-up (usage errors, before any test
runs) and ``publish`` runs once after the last test, in the order of ``registry.PUBLISHERS``. A new
tracker is one new module with a Publisher and one row in that registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import pytest

    from ..session import ReproSession
    from ..settings import Settings


@dataclass
class Publication:
    """One session's publishing: the session, its config, and what a publisher leaves for the later ones."""

    session: ReproSession
    config: pytest.Config
    bundles: dict[tuple[str, str | None], Path] = field(default_factory=dict)  # failing checks' bundles, by check
    tags: dict[str, str] | None = None  # the trackers' common tags (trackers.common_tags), computed once
    report: dict[str, Any] | None = None  # the JSON report, built once for both the JSON and the HTML file


class Publisher(Protocol):
    """One destination of a session's outcomes."""

    def problems(self, settings: Settings, config: pytest.Config) -> list[str]:
        """What is wrong with this publisher's options (in ``settings``), checked at start-up (each a usage error)."""
        ...

    def publish(self, run: Publication, exitstatus: int) -> int | None:
        """Publish the session's outcomes (notes: ``run.session.notes``); return the exit status to set, or None."""
        ...


def failed(exitstatus: int) -> int | None:
    """The exit status after a publisher failed: the run fails when its tests passed, else keeps their status."""
    import pytest

    return pytest.ExitCode.INTERNAL_ERROR if exitstatus == pytest.ExitCode.OK else None
