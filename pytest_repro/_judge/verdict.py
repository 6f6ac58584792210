"""The verdict of a reproducibility check, and the outcome value the reports are built from.

A check's outcome starts as ERROR and becomes anything else only when a decision is made; the
final verdict is reconciled with pytest's own outcome of the test, so no report can show a pass
for a test that failed.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, replace
from typing import Any


class Verdict(str, enum.Enum):
    """How a check ended (the value is what reports and the JSON schema carry)."""

    PASSED = "passed"
    PASSED_CROSS_ENV = "passed-cross-env"
    UNCHANGED = "unchanged"
    WRITTEN = "written"
    DIVERGED = "diverged"
    DIFFERS = "differs"
    MISSING = "missing"
    CORRUPT = "corrupt"
    ERROR = "error"
    TIMEOUT = "timeout"
    NON_FINITE = "non-finite"
    TEST_FAILED = "test-failed"  # the check agreed, but the test failed afterwards (nothing was written)

    @property
    def ok(self) -> bool:
        """Whether this verdict lets the test pass."""
        return self in PASSING

    @property
    def label(self) -> str:
        """The word the terminal summary shows."""
        return LABELS[self]


PASSING = frozenset({Verdict.PASSED, Verdict.PASSED_CROSS_ENV, Verdict.UNCHANGED, Verdict.WRITTEN})
LABELS = {
    Verdict.PASSED: "PASSED",
    Verdict.PASSED_CROSS_ENV: "CROSS-ENV",
    Verdict.UNCHANGED: "UNCHANGED",
    Verdict.WRITTEN: "WRITTEN",
    Verdict.DIVERGED: "DIVERGED",
    Verdict.DIFFERS: "DIFFERS",
    Verdict.MISSING: "MISSING",
    Verdict.CORRUPT: "CORRUPT",
    Verdict.ERROR: "ERROR",
    Verdict.TIMEOUT: "TIMEOUT",
    Verdict.NON_FINITE: "NON-FINITE",
    Verdict.TEST_FAILED: "TEST-FAILED",
}
# pytest's outcome of a whole test (setup, call and teardown together).
TEST_OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def parse_verdict(value: Any) -> Verdict:
    """Return the Verdict for a report's string; anything unknown is ERROR."""
    try:
        return Verdict(value)
    except ValueError:
        return Verdict.ERROR


@dataclass(frozen=True)
class CheckOutcome:
    """What one ``repro.check`` concluded: the verdict and everything the reports show about it.

    Built once, from the check's decision (check.outcome_of); later steps make changed copies.
    """

    nodeid: str
    name: str | None
    verdict: Verdict = Verdict.ERROR
    detail: str = "the check did not finish"
    path: str | None = None
    seconds: list[float] = field(default_factory=list)
    env_key: str | None = None
    compared_with: str | None = None  # env key of the reference used, when it is another environment's
    drift: list[str] = field(default_factory=list)  # numeric environment drift vs the reference
    details: list[str] = field(default_factory=list)  # e.g. the statistical verdict lines
    context: list[str] = field(default_factory=list)  # what changed since the reference (failures)
    warnings: list[str] = field(default_factory=list)
    seed: int | None = None
    device: str | None = None
    curves: dict[str, list[float]] = field(default_factory=dict)
    differences: list[dict[str, Any]] = field(default_factory=list)
    max_abs: dict[str, float] = field(default_factory=dict)
    statistical: dict[str, Any] | None = None
    noise: dict[str, Any] | None = None  # noise-aware comparisons: k, the measured floor, ratios, resolution
    calibration: dict[str, Any] | None = None  # --repro-calibrate: the floor per value, resolution, where stored
    origin: str = ""  # where the difference starts (module, op, backward, piece of state), when it was traced
    effective_config: dict[str, dict[str, Any]] = field(default_factory=dict)  # this run's, with provenance
    test_outcome: str = "failed"  # pytest's outcome of the test, filled in when the test has ended
    message: str = ""  # the full failure text (not in reports: pytest shows it)
    staged: str | None = None  # a reference written to a staging folder, committed only if the test passes

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form that travels in test reports (and so across xdist workers)."""
        data = asdict(self)
        data["verdict"] = self.verdict.value
        for private in ("message", "staged"):
            data.pop(private)
        return data


def reconcile(outcome: CheckOutcome, pytest_outcome: str, why: str = "") -> CheckOutcome:
    """Make the verdict agree with pytest's outcome of the test: a pass only for a test that passed."""
    if outcome.verdict.ok and pytest_outcome not in ("passed", "xpassed"):
        was = outcome.verdict
        reason = f": {why}" if why else ""
        nothing = " (the reference was not written)" if was is Verdict.WRITTEN else ""
        detail = f"the check agreed ({was.label}), but the test {pytest_outcome}{reason}{nothing}"
        return replace(outcome, test_outcome=pytest_outcome, verdict=Verdict.TEST_FAILED, detail=detail)
    return replace(outcome, test_outcome=pytest_outcome)
