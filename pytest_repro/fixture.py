"""The ``repro`` fixture's object: build a check, run it, decide once, publish the outcome at teardown."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ._exec.child import MANIFEST_FILE, RECORD_DIR
from ._exec.distributed import rank_dir
from ._exec.runner import RunOutcome
from ._judge import messages, policy, runfail
from ._judge.policy import Decision
from ._judge.verdict import CheckOutcome, Verdict, reconcile
from .check import Notes, Strategy, junit_properties, outcome_of, strategy_for
from .context import JobRef, JobReferenceError, RunSpec
from .jobconfig import ConfigError, config_source, load_config, validate_config
from .record import CorruptRecordError, Record, RecordError, close_record, load_record, release_record, user_view
from .seeding import derive_seed
from .session import DeviceUnavailableError, ReproSession, resolve_device
from .settings import Settings
from .staging import settle_staged, stage_reference
from .storage import find_references, provenance, reference_path

_RESERVED = re.compile(r"^(cpu|cuda|rank)", re.IGNORECASE)


class _Stop(Exception):
    """A decided failure that ends a check early (bad config, a run that failed, …)."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.detail)
        self.decision = decision


def _stop(verdict: Verdict, detail: str, message: str) -> _Stop:
    return _Stop(Decision(verdict, detail, message))


class Repro:
    """The ``repro`` fixture: run a job reproducibly and check it against its reference."""

    def __init__(self, session: ReproSession, settings: Settings, item: pytest.Item) -> None:
        self._session = session
        self._settings = settings
        self._item = item
        self._nodeid = item.nodeid
        self._test_dir = Path(item.path).parent
        self._device: str | None = None
        self._nproc = 1  # ranks of the check being run
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
        seed, notes = self.seed, Notes(path=str(self.reference_dir(name)))
        record: Record | None = None
        decision: Decision | None = None  # none: the check did not finish (an ERROR)
        try:
            bad = _bad_call(self._nodeid, name, nproc, taken=any(o.name == name for o in self.outcomes))
            if bad is not None:
                raise _Stop(bad)
            self._nproc = nproc
            clash = _clashing(self._item, self._nodeid) if not self.outcomes else None
            if clash is not None:  # the test's first check: refuse now what its later checks would clash on
                raise _Stop(clash)
            record, decision = self._check(job, config, name, notes)
        except _Stop as stop:
            decision = stop.decision
        except RecordError as exc:  # a record file changed or broke while the check read it
            decision = runfail.record_unreadable(self._nodeid, exc)
        except BaseException as exc:  # unforeseen (or an interrupt): ERROR, never a pass
            problem = f"{type(exc).__name__}: {exc}"
            decision = Decision(Verdict.ERROR, problem, messages.internal_error(self._nodeid, exc))
            raise
        finally:
            self._nproc = 1
            self.outcomes.append(outcome_of(self._nodeid, name, seed, notes, decision))  # published at teardown
        assert decision is not None
        if record is None or not decision.verdict.ok:
            pytest.fail(decision.message or decision.detail, pytrace=False)
        return record

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
            return self._checked_resume(job, config, name, at, full)
        finally:
            release_record(full)  # the resume compare read it again

    def _checked_resume(
        self, job: Callable[..., Any] | str, config: Any, name: str | None, at: Any, full: Record
    ) -> Record:
        label = f"{name}:resume@{at}" if name else f"resume@{at}"
        seed, notes = self.seed, Notes(device=self.device)
        decision: Decision | None = None
        try:
            decision = self._resume(job, config, at, full, notes)
        except _Stop as stop:
            decision = stop.decision
        except RecordError as exc:  # a record file changed or broke while the check read it
            decision = runfail.record_unreadable(self._nodeid, exc)
        except BaseException as exc:  # unforeseen: ERROR, never a pass
            decision = Decision(Verdict.ERROR, f"{type(exc).__name__}: {exc}", "")
            raise
        finally:
            self.outcomes.append(outcome_of(self._nodeid, label, seed, notes, decision))
        if not decision.verdict.ok:
            pytest.fail(decision.message or decision.detail, pytrace=False)
        return user_view(full)

    def _resume(self, job: Callable[..., Any] | str, config: Any, at: Any, full: Record, notes: Notes) -> Decision:
        from .checkpoint import STATE_FILE, given
        from .jobs.lightning import CHECKPOINT_NAME as LIGHTNING_CHECKPOINT

        steps = len(full.losses)
        if isinstance(at, bool) or not isinstance(at, int) or not 1 <= at < steps:
            problem = (
                f"repro.check_resume(at=...) needs a step between 1 and {steps - 1} (the job ran {steps}), got {at!r}"
            )
            raise _stop(Verdict.ERROR, "bad at=", messages.usage(self._nodeid, problem))
        ref = JobRef.from_callable(job)
        cfg, config_dir = self._config(config)
        base = self._spec(ref, cfg, config_dir, self.seed, 0)
        stop_spec = replace(base, stop_at=at, manifest=False)
        stopped = self._run_one(stop_spec, 1, notes)
        ckpt = Path(stop_spec.workdir) / "checkpoint"
        if not any(ckpt.iterdir()):
            raise _stop(Verdict.ERROR, "no checkpoint written", messages.resume_no_checkpoint(self._nodeid, at))
        workdir = str(self._session.next_workdir("resume"))
        resume_spec = replace(base, workdir=workdir, resume_from=str(ckpt), manifest=False, run_index=1)
        resumed = self._run_one(resume_spec, 2, notes)
        bad = policy.check_results([stopped, resumed], self._settings.tolerance, self._nodeid)
        if bad is not None:
            raise _Stop(bad)
        notes.curves = {"uninterrupted": full.losses, f"stopped at {at} + resumed": stopped.losses + resumed.losses}
        return policy.resume(
            full,
            stopped,
            resumed,
            at,
            self._settings.tolerance,
            self._nodeid,
            given(ckpt) if (ckpt / STATE_FILE).is_file() else None,
            lightning=(ckpt / LIGHTNING_CHECKPOINT).is_file(),
        )

    def _check(
        self, job: Callable[..., Any] | str, config: Any, name: str | None, notes: Notes
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
        strategy = strategy_for(s.tolerance)
        records, manifest = self._run_all(ref, cfg, config_dir, strategy, notes)
        found = policy.check_results(records, s.tolerance, nodeid)
        if found is None and s.cross_env is not self._session.settings.cross_env:  # the marker's
            found = policy.tolerance_keys(records, s.cross_env, nodeid, "cross_env")
        if found is not None:
            raise _Stop(found)
        notes.statistical = strategy.summarize(records)
        diverged = strategy.between_runs(records, nodeid, s.deterministic, self._diagnosis(ref, cfg, config_dir))
        if diverged is not None:
            raise _Stop(diverged)
        notes.warnings += policy.replicas_disagree(records[0])
        for other in records[1:]:  # compared: close their files, keep the scalars for the reports
            close_record(other)
        audit = policy.audit_findings(records[0])
        if audit and s.config_audit == "fail":
            raise _stop(Verdict.ERROR, "config audit failed", messages.audit_failed(nodeid, audit))
        if s.config_audit != "off":
            notes.warnings += [f"config audit: {a}" for a in audit]
        shown_audit = audit if s.config_audit != "off" else []
        facts = policy.Facts(
            nodeid, s.regen, strategy, s.cross_env, cfg, effective, manifest, shown_audit, self._session.relative
        )
        from .manifest import environment_key

        env_key = environment_key(manifest, self.device, s.env_key_fields)
        found_refs, cleaned = find_references(self.reference_dir(name), env_key, s.reference_dir)
        notes.warnings += cleaned
        notes.env_key = env_key
        decision = policy.against_reference(found_refs, records[0], facts)
        for stored in [found_refs.here, *(r for _, r in found_refs.others)]:
            if stored is not None:  # decided: the reference's files are not read again
                close_record(stored.record)
        if decision.write:
            assert decision.reference is not None
            prov = provenance(
                test=nodeid,
                job=ref.name,
                seed=self.seed,
                base_seed=s.base_seed,
                device=self.device,
                env_key=env_key,
                deterministic=s.deterministic,
                runs=s.runs,
                config=cfg,
                source=source,
                effective=effective,
                invocation=self._session.invocation,
                wall_s=records[0].meta.get("wall_s"),
            )
            notes.staged = self._stage(decision.reference, records[0], manifest, prov)
        release_record(records[0])  # the test may keep it: no open file per kept record
        return records[0], decision

    def _stage(self, target: Path, record: Record, manifest: dict[str, Any], prov: dict[str, Any]) -> str:
        """Stage the reference to write (committed at teardown if the test passes); return the staging folder."""
        try:
            return str(stage_reference(target, record, manifest, prov))
        except OSError as exc:
            shown = self._session.relative(target)
            raise _stop(
                Verdict.ERROR, f"cannot write {shown}: {exc}", messages.write_failed(self._nodeid, shown, exc)
            ) from None

    def _config(self, config: str | Path | Mapping[str, Any] | None) -> tuple[dict[str, Any], str | None]:
        try:
            return load_config(config, self._session.rootdir, self._test_dir)
        except ConfigError as exc:
            raise _stop(Verdict.ERROR, exc.detail, messages.config_invalid(self._nodeid, exc.problem)) from None

    # ------------------------------------------------------------------ teardown

    def finish(self, pytest_outcome: str, why: str) -> str | None:
        """The test has ended: commit staged references if it passed, reconcile verdicts; return a failure text."""
        failure = None
        if not self.outcomes and pytest_outcome == "passed":
            detail = "the test never called repro.check: it checks nothing"
            self.outcomes.append(CheckOutcome(self._nodeid, None, detail=detail))
            failure = messages.no_check(self._nodeid)
            pytest_outcome, why = "error", "it never called repro.check"
        swallowed = [o.verdict.label for o in self.outcomes if not o.verdict.ok and o.message]
        if swallowed and pytest_outcome == "passed":
            failure = messages.swallowed(self._nodeid, swallowed)
            pytest_outcome, why = "error", "it caught the check's failure"
        settled = []
        for o in self.outcomes:
            if o.staged is not None:  # in order: a reference that could not be written fails the test's later ones
                o, problem = self._settle(o, pytest_outcome == "passed" and o.verdict.ok)
                if problem is not None:
                    failure = problem
                    pytest_outcome, why = "error", "its reference could not be written"
            settled.append(o)
        self.outcomes = [reconcile(o, pytest_outcome, why) for o in settled]
        return failure

    def _settle(self, o: CheckOutcome, publish: bool) -> tuple[CheckOutcome, str | None]:
        """Commit (``publish``) or discard a check's staged reference; return its outcome and any failure text."""
        assert o.staged is not None
        target = Path(o.path) if o.path is not None else Path(o.staged)
        warnings, error = settle_staged(Path(o.staged), target, publish, self._settings.reference_dir)
        o = replace(o, staged=None, warnings=o.warnings + warnings)
        if error is None:
            return o, None
        o = replace(o, verdict=Verdict.ERROR, detail=f"the reference could not be written: {error}")
        return o, messages.write_failed(self._nodeid, self._session.relative(target), error)

    def properties(self) -> list[tuple[str, str]]:
        """The short JUnit properties of every check."""
        return junit_properties(self.outcomes)

    # ------------------------------------------------------------------ runs

    def _spec(
        self, ref: JobRef, cfg: dict[str, Any], config_dir: str | None, seed: int, index: int, diagnose: bool = False
    ) -> RunSpec:
        s = self._settings
        return RunSpec(
            job=ref,
            config=cfg,
            seed=seed,
            device=self.device,
            deterministic=s.deterministic,
            run_index=index,
            workdir=str(self._session.next_workdir(f"{'trace' if diagnose else 'run'}{index + 1}")),
            cwd=str(self._session.rootdir),
            sys_path=tuple(sys.path),
            manifest=(index == 0 and not diagnose),
            config_dir=config_dir,
            manifest_packages=s.manifest_packages,
            identity=s.identity,
            diagnose=diagnose,
            nproc=self._nproc,
        )

    def _run_all(
        self, ref: JobRef, cfg: dict[str, Any], config_dir: str | None, strategy: Strategy, notes: Notes
    ) -> tuple[list[Record], dict[str, Any]]:
        records: list[Record] = []
        manifest: dict[str, Any] = {}
        seeds = strategy.seeds(self.seed, self._settings.runs)
        specs = [self._spec(ref, cfg, config_dir, seed, i) for i, seed in enumerate(seeds)]
        results = self._run_specs(ref, specs)
        notes.warnings += self._session.runner.take_warnings()
        for i, (seed, result) in enumerate(zip(seeds, results, strict=False)):
            notes.seconds.append(result.wall_s)
            if result.orphans:
                notes.warnings.append(messages.orphans(i + 1, result.orphans))
            records.append(self._record_of(result, i + 1))
            notes.curves[strategy.run_label(i, seed)] = records[-1].losses
            if i == 0:
                manifest = _read_manifest(result.workdir)
        if len(records) < len(seeds):  # run_many stops early only after a failed run, which raised above
            raise RuntimeError(f"only {len(records)} of {len(seeds)} runs came back")
        return records, manifest

    def _run_specs(self, ref: JobRef, specs: list[RunSpec]) -> list[RunOutcome]:
        """Preload what the job imports, then run the specs, side by side where repro_parallel_runs allows.

        Stops after the first run that fails (the list is then shorter, ending with that run).
        """
        from ._exec.runner import parallel_runs

        s = self._settings
        self._session.preload_job(ref, self._test_dir)
        parallel = parallel_runs(s.parallel_runs, len(specs), self.device, s.threads)
        if any(getattr(spec, "nproc", 1) > 1 for spec in specs):
            parallel = 1  # each run already uses several processes
        return self._session.runner.run_many(specs, s.timeout, s.base_seed, parallel)

    def _run_one(self, spec: RunSpec, run: int, notes: Notes) -> Record:
        """Run one extra run (outside the check's N runs) and return its record."""
        result = self._session.runner.run(spec, self._settings.timeout, self._settings.base_seed)
        notes.seconds.append(result.wall_s)
        return self._record_of(result, run)

    def _record_of(self, result: RunOutcome, run: int) -> Record:
        """Run ``run``'s record (every rank's), or stop the check with what its failure means."""
        failed = runfail.run_failed(
            self._nodeid,
            run,
            self.device,
            result.status,
            result.detail,
            result.log_tail,
            result.stage,
            result.config_audit,
        )
        if failed is not None:
            raise _Stop(failed)
        try:
            record = load_record(result.record_dir)
            for rank in range(1, self._nproc):
                record.ranks[rank] = load_record(rank_dir(result.workdir, rank) / RECORD_DIR)
            return record
        except (CorruptRecordError, FileNotFoundError) as exc:  # written and checked by the child: broken since
            raise _Stop(runfail.unreadable_run_record(self._nodeid, run, exc)) from None

    def _diagnosis(self, ref: JobRef, cfg: dict[str, Any], config_dir: str | None) -> Callable[[], str] | None:
        if not self._settings.diagnose:
            return None

        def diagnose() -> str:
            from ._judge.diagnose import first_divergence

            folders = []
            for i in range(2):
                spec = self._spec(ref, cfg, config_dir, self.seed, i, diagnose=True)
                result = self._session.runner.run(spec, self._settings.timeout, self._settings.base_seed)
                if result.status != "ok":
                    return f"the traced run {i + 1} did not finish ({result.status}: {result.detail.splitlines()[-1:]})"
                folders.append(result.workdir)
            found = first_divergence(folders[0], folders[1])
            if found is None:
                return (
                    "the two traced runs agreed at every forward, loss and optimizer step (the divergence is "
                    "outside the training steps, e.g. in evaluation or in what the job returns)"
                )
            return found.describe()

        return diagnose


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


def _read_manifest(workdir: Path) -> dict[str, Any]:
    try:
        data = json.loads((workdir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
