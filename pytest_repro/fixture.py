"""The ``repro`` fixture's object: build a check, run it, decide once, publish the outcome at teardown."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from ._judge import messages, policy, runfail
from ._judge.audit import audit_findings
from ._judge.policy import Decision
from ._judge.verdict import CheckOutcome, Verdict
from .check import Notes, Stop, finish, junit_properties, outcome_of, strategy_for
from .context import JobRef, JobReferenceError
from .jobconfig import ConfigError, config_source, load_config, validate_config
from .record import Record, RecordError, close_record, release_record, user_view
from .runs import Runs
from .seeding import derive_seed
from .session import DeviceUnavailableError, ReproSession, resolve_device
from .settings import Settings
from .staging import stage_reference
from .storage import find_references, provenance, reference_path

_RESERVED = re.compile(r"^(cpu|cuda|rank)", re.IGNORECASE)


def _stop(verdict: Verdict, detail: str, message: str) -> Stop:
    return Stop(Decision(verdict, detail, message))


class Repro:
    """The ``repro`` fixture: run a job reproducibly and check it against its reference."""

    def __init__(self, session: ReproSession, settings: Settings, item: pytest.Item) -> None:
        self._session = session
        self._settings = settings
        self._item = item
        self._nodeid = item.nodeid
        self._test_dir = Path(item.path).parent
        self._device: str | None = None
        self.outcomes: list[CheckOutcome] = []

    @property
    def seed(self) -> int:
        """The seed this test's runs use: the marker's seed, or one derived from the base seed and node id."""
        s = self._settings
        return s.seed if s.seed is not None else derive_seed(s.base_seed, self._nodeid)

    @property
    def device(self) -> str:
        """The device the runs use (cuda when available and not overridden, else cpu)."""
        if self._device is None:
            self._device = resolve_device(self._settings.device)
        return self._device

    @property
    def settings(self) -> Settings:
        """The effective settings for this test."""
        return self._settings

    def reference_dir(self, name: str | None = None) -> Path:
        """Return where this test's reference (for the check called ``name``) lives."""
        return reference_path(self._settings.reference_dir, self._nodeid, name)

    # ------------------------------------------------------------------ the check

    def check(
        self,
        job: Callable[..., Any] | str,
        config: str | Path | Mapping[str, Any] | None = None,
        name: str | None = None,
        nproc: int = 1,
    ) -> Record:
        """Run ``job`` N times in fresh seeded processes, compare the runs and the reference; return run 1's record.

        ``nproc=N`` runs each run as N ranks with torch.distributed initialised (gloo on CPU, nccl on CUDA);
        every rank's record is compared and stored, and rank 0's is returned (with the others in ``.ranks``).
        """
        return user_view(self._checked(job, config, name, nproc))

    def _checked(self, job: Callable[..., Any] | str, config: Any, name: str | None, nproc: int = 1) -> Record:
        """check(), returning run 1's record as loaded (its tensors read from its files on demand)."""
        notes = Notes(path=str(self.reference_dir(name)))
        taken, first = any(o.name == name for o in self.outcomes), not self.outcomes

        def body() -> tuple[Record, Decision]:
            bad = _bad_call(self._nodeid, name, nproc, taken)
            if bad is None and first:  # the test's first check: refuse now what its later checks would clash on
                bad = _clashing(self._item, self._nodeid)
            if bad is not None:
                raise Stop(bad)
            return self._check(job, config, name, nproc, notes)

        record, decision = self._decided(name, notes, body, internal=True)
        if record is None or not decision.verdict.ok:
            pytest.fail(decision.message or decision.detail, pytrace=False)
        return record

    def _decided(
        self, label: str | None, notes: Notes, body: Callable[[], tuple[Record, Decision]], internal: bool
    ) -> tuple[Record | None, Decision]:
        """Run a check and decide it; its outcome is built (and kept for teardown) whatever happens."""
        seed = self.seed
        decision: Decision | None = None  # none: the check did not finish (an ERROR)
        try:
            record, decision = body()
            return record, decision
        except Stop as stop:
            decision = stop.decision
        except RecordError as exc:  # a record file changed or broke while the check read it
            decision = runfail.record_unreadable(self._nodeid, exc)
        except BaseException as exc:  # unforeseen (or an interrupt): ERROR, never a pass
            message = messages.internal_error(self._nodeid, exc) if internal else ""
            decision = Decision(Verdict.ERROR, f"{type(exc).__name__}: {exc}", message)
            raise
        finally:
            self.outcomes.append(outcome_of(self._nodeid, label, seed, notes, decision))
        return None, decision

    def check_resume(
        self,
        job: Callable[..., Any] | str,
        config: str | Path | Mapping[str, Any] | None = None,
        name: str | None = None,
        at: int | None = None,
    ) -> Record:
        """Check the job like check(), then stop it after ``at`` steps and resume it in a fresh process: same run."""
        full = self._checked(job, config, name)
        try:
            label = f"{name}:resume@{at}" if name else f"resume@{at}"
            notes = Notes(device=self.device)
            _, decision = self._decided(label, notes, lambda: (full, self._resume(job, config, at, full, notes)), False)
            if not decision.verdict.ok:
                pytest.fail(decision.message or decision.detail, pytrace=False)
            return user_view(full)
        finally:
            release_record(full)  # the resume compare read it again

    def _resume(self, job: Callable[..., Any] | str, config: Any, at: Any, full: Record, notes: Notes) -> Decision:
        bad = _bad_at(self._nodeid, at, len(full.losses))
        if bad is not None:
            raise Stop(bad)
        ref = JobRef.from_callable(job)
        return self._runs(ref, *self._config(config)).resume(self.seed, full, at, notes)

    def _check(
        self, job: Callable[..., Any] | str, config: Any, name: str | None, nproc: int, notes: Notes
    ) -> tuple[Record, Decision]:
        try:
            ref = JobRef.from_callable(job)
        except JobReferenceError as exc:
            raise _stop(
                Verdict.ERROR, "the job cannot run in a fresh process", messages.usage(self._nodeid, str(exc))
            ) from None
        cfg, config_dir = self._config(config)
        source = config_source(config)
        try:
            effective = validate_config(job, cfg, source)
        except ConfigError as exc:
            raise _stop(Verdict.ERROR, exc.detail, messages.config_invalid(self._nodeid, exc.problem)) from None
        notes.effective_config = effective
        try:
            notes.device = self.device
        except DeviceUnavailableError as exc:
            raise _stop(
                Verdict.ERROR, "the requested GPU is not available", messages.usage(self._nodeid, str(exc))
            ) from None
        s, nodeid = self._settings, self._nodeid
        runs = self._runs(ref, cfg, config_dir, nproc)
        strategy = strategy_for(s.tolerance, runs.floor)
        records, manifest = runs.run_all(self.seed, strategy, notes)
        found = policy.invalid_results(records, s.tolerance, nodeid)
        if found is None and s.cross_env is not self._session.settings.cross_env:  # the marker's
            found = policy.tolerance_keys(records, s.cross_env, nodeid, "cross_env")
        if found is not None:
            raise Stop(found)
        notes.statistical = strategy.summarize(records)
        diverged = strategy.between_runs(records, nodeid, s.deterministic, runs.diagnosis(self.seed))
        if diverged is not None:
            raise Stop(diverged)
        notes.warnings += policy.replicas_disagree(records[0])
        if strategy.uses_spread:  # runs may differ: how far is part of a noise floor
            runs.keep_spread()
        for other in records[1:]:  # compared: close their files, keep the scalars for the reports
            close_record(other)
        audit = audit_findings(records[0]) if s.config_audit != "off" else []
        if audit and s.config_audit == "fail":
            raise _stop(Verdict.ERROR, "config audit failed", messages.audit_failed(nodeid, audit))
        notes.warnings += [f"config audit: {a}" for a in audit]
        digests = runs.digests() if s.regen else None
        facts = policy.Facts(
            nodeid,
            s.regen,
            strategy,
            s.cross_env,
            cfg,
            effective,
            manifest,
            audit,
            self._session.relative,
            digests=digests is not None,
        )
        from .manifest import environment_key

        env_key = environment_key(manifest, self.device, s.env_key_fields)
        found_refs, cleaned = find_references(self.reference_dir(name), env_key, s.reference_dir)
        notes.warnings += cleaned
        notes.env_key = env_key
        decision = policy.against_reference(found_refs, records[0], facts)
        if decision.verdict is Verdict.DIFFERS and decision.compared_with is None and found_refs.here is not None:
            decision = runs.located(decision, found_refs.here, self.seed)
        for stored in [found_refs.here, *(r for _, r in found_refs.others)]:
            if stored is not None:  # decided: the reference's files are not read again
                close_record(stored.record)
        if decision.write:
            assert decision.reference is not None
            used, wall_s = (cfg, source, effective), records[0].meta.get("wall_s")
            prov = provenance(
                nodeid, ref.name, self.seed, self.device, env_key, s, used, self._session.invocation, wall_s
            )
            staged = (records[0], manifest, prov, digests)
            notes.staged = _stage(self._session, nodeid, decision.reference, staged)
        if s.calibrate is not None:
            from .calibration import calibrate

            here = found_refs.here.path if found_refs.here is not None else None
            floor = runs.floor(s.calibrate, True)
            notes.calibration = calibrate(floor, decision, here, notes.staged, s.calibrate_store)
        release_record(records[0])  # the test may keep it: no open file per kept record
        return records[0], decision

    def _runs(self, ref: JobRef, cfg: dict[str, Any], config_dir: str | None, nproc: int = 1) -> Runs:
        return Runs(
            self._session, self._settings, self._nodeid, self._test_dir, self.device, (ref, cfg, config_dir), nproc
        )

    def _config(self, config: str | Path | Mapping[str, Any] | None) -> tuple[dict[str, Any], str | None]:
        try:
            return load_config(config, self._session.rootdir, self._test_dir)
        except ConfigError as exc:
            raise _stop(Verdict.ERROR, exc.detail, messages.config_invalid(self._nodeid, exc.problem)) from None

    # ------------------------------------------------------------------ teardown

    def finish(self, pytest_outcome: str, why: str) -> str | None:
        """The test has ended: commit staged references if it passed, reconcile verdicts; return a failure text."""
        root, shown = self._settings.reference_dir, self._session.relative
        self.outcomes, failure = finish(self.outcomes, self._nodeid, pytest_outcome, why, root, shown)
        return failure

    def properties(self) -> list[tuple[str, str]]:
        """The short JUnit properties of every check."""
        return junit_properties(self.outcomes)


def _stage(
    session: ReproSession,
    nodeid: str,
    target: Path,
    what: tuple[Record, dict[str, Any], dict[str, Any], list[dict[str, Any]] | None],
) -> str:
    """Stage the reference to write (committed at teardown if the test passes); return the staging folder."""
    try:
        return str(stage_reference(target, *what))
    except OSError as exc:
        shown = session.relative(target)
        raise _stop(Verdict.ERROR, f"cannot write {shown}: {exc}", messages.write_failed(nodeid, shown, exc)) from None


def _bad_call(nodeid: str, name: Any, nproc: Any, taken: bool) -> Decision | None:
    """Refuse a repro.check call with a bad nproc= or name=, or a name an earlier check of the test used."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        problem = f"repro.check(nproc=...) takes a number of ranks >= 1, got {nproc!r}"
        return Decision(Verdict.ERROR, "bad nproc=", messages.usage(nodeid, problem))
    if name is not None and (not isinstance(name, str) or not name.strip() or _RESERVED.match(name)):
        problem = (
            f"repro.check(name={name!r}): a name must be a non-empty string that does not start with "
            "cpu, cuda or rank (those are the folders of environments and ranks)"
        )
        return Decision(Verdict.ERROR, "bad name=", messages.usage(nodeid, problem))
    if taken:
        detail = f"repro.check called twice with name={name!r}"
        return Decision(Verdict.ERROR, detail, messages.same_name(nodeid, name, "a second time"))
    return None


def _bad_at(nodeid: str, at: Any, steps: int) -> Decision | None:
    """Refuse a repro.check_resume call whose at= is not a step inside the run."""
    if isinstance(at, bool) or not isinstance(at, int) or not 1 <= at < steps:
        problem = f"repro.check_resume(at=...) needs a step between 1 and {steps - 1} (the job ran {steps}), got {at!r}"
        return Decision(Verdict.ERROR, "bad at=", messages.usage(nodeid, problem))
    return None


def _clashing(item: pytest.Item, nodeid: str) -> Decision | None:
    """Read the test's source: checks that can run with one name fail now, not after a regen round trip."""
    from .callsites import clashing_checks

    test = getattr(item, "obj", None)
    found = clashing_checks(test) if callable(test) else None
    if found is None:
        return None
    name, lines = found
    file = Path(item.path).name
    if len(lines) == 1:
        where = f"in a loop (line {lines[0]} of {file})"
    else:
        where = f"at lines {', '.join(map(str, lines[:-1]))} and {lines[-1]} of {file}"
    return Decision(Verdict.ERROR, f"repro.check {where} share one name", messages.same_name(nodeid, name, where))
