"""A check's comparison strategy (how its runs are judged), its notes while it runs, and its outcome.

A strategy is one object behind one interface (``Strategy``): the seeds to run, how the runs are judged
against each other and against a reference. ``strategy_for`` picks it from the tolerance; a new way of
judging (e.g. against a measured noise floor) is one new class here, not branches in the fixture or policy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

from ._judge import messages, policy, statistical
from ._judge.noise import NoiseFloor
from ._judge.policy import Decision, Match
from ._judge.stored_floor import implausible, with_stored
from ._judge.tolerances import Noise, Statistical, ToleranceSpec
from ._judge.verdict import CheckOutcome, Verdict, reconcile
from .record import Record
from .seeding import derive_seed
from .staging import settle_staged


class Stop(Exception):
    """A decided failure that ends a check early (bad config, a run that failed, …)."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.detail)
        self.decision = decision


class Strategy(Protocol):
    """How a check judges its runs: which seeds, run against run, run against a stored reference."""

    @property
    def spec(self) -> ToleranceSpec:
        """The tolerance the check was given."""
        ...

    def seeds(self, seed: int, runs: int) -> list[int]:
        """One seed per run, given the test's seed and the configured number of runs."""
        ...

    def run_label(self, index: int, seed: int) -> str:
        """The name of run ``index`` (0-based) in the reports' loss curves."""
        ...

    def summarize(self, records: Sequence[Record]) -> dict[str, Any] | None:
        """What run 1's record must carry for later comparisons (stored in its meta); a copy for the reports."""
        ...

    def between_runs(
        self, records: Sequence[Record], nodeid: str, deterministic: bool, diagnose: Callable[[], str] | None
    ) -> Decision | None:
        """Judge the runs against each other; None when they agree."""
        ...

    def against(self, stored: Record, record: Record, label: str, nodeid: str) -> Match | Decision:
        """Judge run 1 against a stored reference (``label`` names it); a Decision when it cannot be judged."""
        ...

    def across_environments(self, cross_env: ToleranceSpec, record: Record) -> tuple[Strategy, str]:
        """The strategy for another environment's reference (given the cross-env tolerance), and its description."""
        ...

    @property
    def uses_spread(self) -> bool:
        """Whether the runs may differ and their spread is part of a noise floor (kept before they are closed)."""
        ...

    @property
    def judges_by_floor(self) -> bool:
        """Whether it judges against a noise floor (then a floor stored beside the reference is read, and checked)."""
        ...

    def with_stored_floor(self, floor: NoiseFloor) -> Strategy:
        """This strategy, judging with the noise floor stored beside the reference too (where it measures one)."""
        ...


# Measures the check's noise floor on demand (Runs.floor): so many perturbed runs, random streams too or not.
FloorSource = Callable[[int, bool], NoiseFloor]


@dataclass(frozen=True)
class ValueByValue:
    """The default: N runs with the test's seed, compared value by value under the tolerance spec."""

    spec: ToleranceSpec
    floor: FloorSource | None = None

    @property
    def uses_spread(self) -> bool:
        """Runs that agree within a non-bitwise tolerance may still differ."""
        return not self.spec.is_bitwise

    def with_stored_floor(self, floor: NoiseFloor) -> Strategy:
        """Unchanged: values are compared under the tolerance, not against a floor."""
        return self

    @property
    def judges_by_floor(self) -> bool:
        """No: values are compared under the tolerance."""
        return False

    def seeds(self, seed: int, runs: int) -> list[int]:
        """The test's seed, once per run."""
        return [seed] * runs

    def run_label(self, index: int, seed: int) -> str:
        """'run 1', 'run 2', …"""
        return f"run {index + 1}"

    def summarize(self, records: Sequence[Record]) -> dict[str, Any] | None:
        """Nothing beyond the records themselves."""
        return None

    def between_runs(
        self, records: Sequence[Record], nodeid: str, deterministic: bool, diagnose: Callable[[], str] | None
    ) -> Decision | None:
        """Every run must equal run 1 under the tolerance."""
        return policy.run_to_run(records, self.spec, nodeid, deterministic, diagnose)

    def against(self, stored: Record, record: Record, label: str, nodeid: str) -> Match | Decision:
        """Value by value under the tolerance."""
        return policy.match_values(stored, record, self.spec, label)

    def across_environments(self, cross_env: ToleranceSpec, record: Record) -> tuple[Strategy, str]:
        """The cross-environment tolerance: noise-aware, or close widened for half-precision models."""
        return _across(cross_env, record, self.floor)


def _device_type(record: Record) -> str:
    """'cpu', 'cuda', … of the device a record was made on."""
    return str(record.meta.get("device") or "cpu").partition(":")[0]


def _across(cross_env: ToleranceSpec, record: Record, floor: FloorSource | None) -> tuple[Strategy, str]:
    """The strategy for another environment's reference: noise-aware by default, else the given tolerance."""
    if cross_env.noise is not None:
        return NoiseAware(cross_env, floor), cross_env.noise.describe()
    spec, described = policy.cross_env_spec(cross_env, record)
    return strategy_for(spec, floor), described


@dataclass(frozen=True)
class NoiseAware(ValueByValue):
    """A noise tolerance: runs may differ by their own noise; a reference must lie within k x the measured floor.

    The floor (``_judge/noise.py``) is measured only when a reference is compared: extra runs of the job
    under perturbed rounding and random streams, plus the spread of the check's own runs. Seeds and run
    labels are the value-by-value ones.
    """

    stored: NoiseFloor | None = None  # the recording machine's floor, stored beside the reference

    @property
    def noise(self) -> Noise:
        """The noise tolerance."""
        assert self.spec.noise is not None
        return self.spec.noise

    @property
    def uses_spread(self) -> bool:
        """Always: the runs' own nondeterminism is part of the floor."""
        return True

    def with_stored_floor(self, floor: NoiseFloor) -> Strategy:
        """Judge with the larger of the floor measured here and the recording machine's, value by value."""
        return replace(self, stored=floor)

    @property
    def judges_by_floor(self) -> bool:
        """Yes: every value within k x its floor."""
        return True

    def between_runs(
        self, records: Sequence[Record], nodeid: str, deterministic: bool, diagnose: Callable[[], str] | None
    ) -> Decision | None:
        """Runs may differ (nondeterminism): their spread becomes part of the floor, judged with the reference."""
        return None

    def against(self, stored: Record, record: Record, label: str, nodeid: str) -> Match | Decision:
        """Each value within k x its measured noise floor (structure exactly the same)."""
        from ._judge.noise_verdict import match_noise

        if self.floor is None:
            raise RuntimeError("a noise-aware comparison was asked for without a way to measure the floor")
        streams = _device_type(stored) != _device_type(record)  # another device's generators: other masks
        if self.stored is not None and "random streams" in self.stored.parts:
            streams = True  # measured like the stored floor, so that the two are compared like for like
        floor = self.floor(self.noise.runs, streams)
        if self.stored is not None:
            problem = implausible(self.stored, floor)
            if problem is not None:  # never silently trusted: a floor that large hides every change
                return Decision(
                    Verdict.ERROR,
                    f"the stored noise floor is implausible: {problem}",
                    messages.stored_floor_unusable(nodeid, f"noise_floor.json beside the {label}", problem),
                )
            floor = with_stored(floor, self.stored)
        return match_noise(stored, record, self.noise, floor, label)


@dataclass(frozen=True)
class StatisticalCheck:
    """``statistical(...)``: runs over several seeds, equivalence (TOST) with the reference's per-seed values.

    Without ``margin=``, each value's margin is k x its noise floor, measured when a reference is compared
    (with ``same_seed``, the runs' own spread joins it: natural nondeterminism).
    """

    spec: ToleranceSpec
    floor: FloorSource | None = None

    @property
    def stat(self) -> Statistical:
        """The statistical tolerance."""
        assert self.spec.statistical is not None
        return self.spec.statistical

    @property
    def uses_spread(self) -> bool:
        """Same-seed runs without a given margin: their spread is the natural noise floor."""
        return self.stat.same_seed and self.stat.margin is None

    def with_stored_floor(self, floor: NoiseFloor) -> Strategy:
        """Unchanged (its measured margins come from this environment's floor)."""
        return self

    @property
    def judges_by_floor(self) -> bool:
        """No: its measured margins come from this environment's floor only."""
        return False

    def seeds(self, seed: int, runs: int) -> list[int]:
        """``seeds`` different seeds (the test's first), or the test's seed that often with ``same_seed``."""
        stat = self.stat
        if stat.same_seed:
            return [seed] * stat.seeds
        return [seed] + [derive_seed(seed, f"statistical-{k}") for k in range(1, stat.seeds)]

    def run_label(self, index: int, seed: int) -> str:
        """'seed 1234', …"""
        return f"seed {seed}"

    def summarize(self, records: Sequence[Record]) -> dict[str, Any] | None:
        """The per-seed values, which the reference stores and later runs are compared with."""
        records[0].meta["statistical"] = statistical.per_seed(records)
        return dict(records[0].meta["statistical"])

    def between_runs(
        self, records: Sequence[Record], nodeid: str, deterministic: bool, diagnose: Callable[[], str] | None
    ) -> Decision | None:
        """Different seeds may differ; with ``same_seed`` their spread must stay within the margin."""
        return statistical.same_seed_spread(records, self.stat, nodeid) if self.stat.same_seed else None

    def against(self, stored: Record, record: Record, label: str, nodeid: str) -> Match | Decision:
        """Equivalence of each metric (and the loss band) with the reference's seeds."""
        floor = None
        if self.stat.margin is None:
            if self.floor is None:
                raise RuntimeError("a measured margin was asked for without a way to measure the floor")
            floor = self.floor(2, _device_type(stored) != _device_type(record))
        return statistical.match_statistical(stored, record, self.stat, label, nodeid, floor)

    def across_environments(self, cross_env: ToleranceSpec, record: Record) -> tuple[Strategy, str]:
        """The same statistical test: it already allows for run-to-run noise."""
        return self, self.stat.describe()


def strategy_for(spec: ToleranceSpec, floor: FloorSource | None = None) -> Strategy:
    """The strategy a tolerance spec asks for (``floor`` measures a noise floor when one is needed)."""
    if spec.statistical is not None:
        return StatisticalCheck(spec, floor)
    return NoiseAware(spec, floor) if spec.noise is not None else ValueByValue(spec, floor)


@dataclass
class Notes:
    """What a check observed while it ran, before it was decided; its outcome is built from both, once."""

    path: str | None = None
    device: str | None = None
    seconds: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    curves: dict[str, list[float]] = field(default_factory=dict)
    env_key: str | None = None
    statistical: dict[str, Any] | None = None
    effective_config: dict[str, dict[str, Any]] = field(default_factory=dict)
    staged: str | None = None
    calibration: dict[str, Any] | None = None  # --repro-calibrate: the floor per value, what it resolves


def outcome_of(nodeid: str, name: str | None, seed: int, notes: Notes, decision: Decision | None) -> CheckOutcome:
    """The check's outcome: its notes and its decision (none: the check did not finish, an ERROR)."""
    observed: dict[str, Any] = {"seed": seed, **{f.name: getattr(notes, f.name) for f in fields(Notes)}}
    if decision is None:
        return CheckOutcome(nodeid, name, **observed)
    d = decision
    if d.reference is not None:
        observed["path"] = str(d.reference)
    if d.reference_losses is not None:
        observed["curves"] = {**notes.curves, "reference": d.reference_losses}
    if notes.statistical is not None:
        observed["statistical"] = {**notes.statistical, "reference": d.reference_statistical}
    decided = {f.name: getattr(d, f.name) for f in fields(Decision) if f.name in _OUTCOME_FIELDS}
    return CheckOutcome(nodeid, name, **decided, **observed)


_OUTCOME_FIELDS = frozenset(f.name for f in fields(CheckOutcome))


def finish(
    outcomes: Sequence[CheckOutcome],
    nodeid: str,
    pytest_outcome: str,
    why: str,
    root: Path,
    shown: Callable[[Path], str],
) -> tuple[list[CheckOutcome], str | None]:
    """A test's checks once it has ended: staged references committed (it passed) or discarded, verdicts
    reconciled with its outcome; return the outcomes and the text to fail the test with (None: none).
    """
    outcomes, failure = list(outcomes), None
    if not outcomes and pytest_outcome == "passed":
        outcomes.append(CheckOutcome(nodeid, None, detail="the test never called repro.check: it checks nothing"))
        failure = messages.no_check(nodeid)
        pytest_outcome, why = "error", "it never called repro.check"
    swallowed = [o.verdict.label for o in outcomes if not o.verdict.ok and o.message]
    if swallowed and pytest_outcome == "passed":
        failure = messages.swallowed(nodeid, swallowed)
        pytest_outcome, why = "error", "it caught the check's failure"
    settled = []
    for o in outcomes:
        if o.staged is not None:  # in order: a reference that could not be written fails the test's later ones
            assert o.path is not None
            target, publish = Path(o.path), pytest_outcome == "passed" and o.verdict.ok
            warnings, error = settle_staged(Path(o.staged), target, publish, root)
            o = replace(o, staged=None, warnings=o.warnings + warnings)
            if error is not None:
                o = replace(o, verdict=Verdict.ERROR, detail=f"the reference could not be written: {error}")
                failure = messages.write_failed(nodeid, shown(target), error)
                pytest_outcome, why = "error", "its reference could not be written"
        settled.append(o)
    return [reconcile(o, pytest_outcome, why) for o in settled], failure


def junit_properties(outcomes: Sequence[CheckOutcome]) -> list[tuple[str, str]]:
    """The short JUnit properties of every check."""
    props: list[tuple[str, str]] = []
    for o in outcomes:
        suffix = f"[{o.name}]" if o.name else ""
        props += [
            (f"repro_verdict{suffix}", o.verdict.value),
            (f"repro_environment{suffix}", o.env_key or ""),
            (f"repro_seed{suffix}", str(o.seed)),
            (f"repro_device{suffix}", o.device or ""),
            (f"repro_run_seconds{suffix}", " ".join(f"{x:.3f}" for x in o.seconds)),
        ]
        if o.detail:
            props.append((f"repro_detail{suffix}", o.detail))
    return props
