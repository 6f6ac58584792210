"""The ``repro`` fixture's object: build a check, run it, decide once, publish the outcome at teardown."""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from ._exec.child import RECORD_DIR, RUN_MANIFEST_FILE
from ._exec.distributed import rank_dir
from ._exec.runner import RunOutcome
from ._judge import messages, policy
from ._judge.policy import Decision
from ._judge.tolerances import Statistical
from ._judge.verdict import Outcome, Verdict, reconcile
from .context import JobRef, JobReferenceError, RunSpec
from .record import CorruptRecordError, Record, RecordError, close_record, load_record, release_record, user_view
from .seeding import derive_seed
from .session import DeviceUnavailableError, ReproSession, resolve_device
from .settings import Settings
from .storage import (
    MissingReferenceError,
    ReferenceBlockedError,
    clean_stale,
    commit_reference,
    discard_staged,
    environment_dirs,
    load_reference,
    reference_path,
    stage_reference,
)

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
        self.outcomes: list[Outcome] = []

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
        outcome = Outcome(self._nodeid, name, seed=self.seed, path=str(self.reference_dir(name)))
        duplicate = any(o.name == name for o in self.outcomes)
        bad_name = name is not None and (not isinstance(name, str) or not name.strip() or _RESERVED.match(name))
        self.outcomes.append(outcome)  # published at teardown whatever happens; starts as ERROR
        self._nproc = 1
        try:
            if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
                problem = f"repro.check(nproc=...) takes a number of ranks >= 1, got {nproc!r}"
                raise _stop(Verdict.ERROR, "bad nproc=", messages.usage(self._nodeid, problem))
            self._nproc = nproc
            if bad_name:
                problem = (
                    f"repro.check(name={name!r}): a name must be a non-empty string that does not start with "
                    "cpu, cuda or rank (those are the folders of environments and ranks)"
                )
                raise _stop(Verdict.ERROR, "bad name=", messages.usage(self._nodeid, problem))
            if duplicate:
                raise _stop(
                    Verdict.ERROR,
                    f"repro.check called twice with name={name!r}",
                    messages.same_name(self._nodeid, name, "a second time"),
                )
            if len(self.outcomes) == 1:  # the test's first check: refuse now what its later checks would clash on
                self._refuse_clashing_checks()
            record, decision = self._check(job, config, name, outcome)
        except _Stop as stop:
            record, decision = None, stop.decision
        except RecordError as exc:  # a record file changed or broke while the check read it
            record, decision = None, _unreadable(self._nodeid, exc)
        except BaseException as exc:  # unforeseen (or an interrupt): ERROR, never a pass
            self._apply(outcome, Decision(Verdict.ERROR, f"{type(exc).__name__}: {exc}", ""))
            outcome.message = messages.internal_error(self._nodeid, exc)
            raise
        finally:
            self._nproc = 1
        self._apply(outcome, decision)
        if record is None or not decision.verdict.ok:
            pytest.fail(decision.message or outcome.detail, pytrace=False)
        return record

    def _refuse_clashing_checks(self) -> None:
        """Read the test's source: checks that can run with one name fail now, not after a regen round trip."""
        from .callsites import clashing_checks

        test = getattr(self._item, "obj", None)
        found = clashing_checks(test) if callable(test) else None
        if found is None:
            return
        name, lines = found
        file = Path(self._item.path).name
        if len(lines) == 1:
            where = f"in a loop (line {lines[0]} of {file})"
        else:
            where = f"at lines {', '.join(map(str, lines[:-1]))} and {lines[-1]} of {file}"
        raise _stop(Verdict.ERROR, f"repro.check {where} share one name", messages.same_name(self._nodeid, name, where))

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
        outcome = Outcome(self._nodeid, label, seed=self.seed, device=self.device)
        self.outcomes.append(outcome)
        try:
            decision = self._resume(job, config, at, full, outcome)
        except _Stop as stop:
            decision = stop.decision
        except RecordError as exc:  # a record file changed or broke while the check read it
            decision = _unreadable(self._nodeid, exc)
        except BaseException as exc:  # unforeseen: ERROR, never a pass
            self._apply(outcome, Decision(Verdict.ERROR, f"{type(exc).__name__}: {exc}", ""))
            raise
        self._apply(outcome, decision)
        if not decision.verdict.ok:
            pytest.fail(decision.message or outcome.detail, pytrace=False)
        return user_view(full)

    def _resume(self, job: Callable[..., Any] | str, config: Any, at: Any, full: Record, outcome: Outcome) -> Decision:
        from dataclasses import replace

        from .checkpoint import STATE_FILE, given
        from .jobs.lightning import CHECKPOINT_NAME as LIGHTNING_CHECKPOINT

        steps = len(full.losses)
        if isinstance(at, bool) or not isinstance(at, int) or not 1 <= at < steps:
            problem = (
                f"repro.check_resume(at=...) needs a step between 1 and {steps - 1} (the job ran {steps}), got {at!r}"
            )
            raise _stop(Verdict.ERROR, "bad at=", messages.usage(self._nodeid, problem))
        ref = JobRef.from_callable(job)
        cfg, config_dir = self._load_config(config)
        base = self._spec(ref, cfg, config_dir, self.seed, 0)
        stop_spec = replace(base, stop_at=at, manifest=False)
        stopped = self._run_one(stop_spec, 1, outcome)
        ckpt = Path(stop_spec.workdir) / "checkpoint"
        if not any(ckpt.iterdir()):
            raise _stop(Verdict.ERROR, "no checkpoint written", messages.resume_no_checkpoint(self._nodeid, at))
        workdir = str(self._session.next_workdir("resume"))
        resume_spec = replace(base, workdir=workdir, resume_from=str(ckpt), manifest=False, run_index=1)
        resumed = self._run_one(resume_spec, 2, outcome)
        bad = policy.check_results([stopped, resumed], self._settings.tolerance, self._nodeid)
        if bad is not None:
            raise _Stop(bad)
        outcome.curves = {"uninterrupted": full.losses, f"stopped at {at} + resumed": stopped.losses + resumed.losses}
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
        self, job: Callable[..., Any] | str, config: Any, name: str | None, outcome: Outcome
    ) -> tuple[Record, Decision]:
        try:
            ref = JobRef.from_callable(job)
        except JobReferenceError as exc:
            raise _stop(
                Verdict.ERROR, "the job cannot run in a fresh process", messages.usage(self._nodeid, str(exc))
            ) from None
        cfg, config_dir = self._load_config(config)
        source = str(config) if isinstance(config, (str, Path)) else "dict"
        effective = self._validate_config(job, cfg, source)
        outcome.effective_config = effective
        try:
            outcome.device = self.device
        except DeviceUnavailableError as exc:
            raise _stop(
                Verdict.ERROR, "the requested GPU is not available", messages.usage(self._nodeid, str(exc))
            ) from None
        spec = self._settings.tolerance
        records, manifest = self._run_all(ref, cfg, config_dir, self._seeds(spec.statistical), outcome)
        found = policy.check_results(records, spec, self._nodeid)
        if found is None and self._settings.cross_env is not self._session.settings.cross_env:  # the marker's
            found = policy.tolerance_keys(records, self._settings.cross_env, self._nodeid, "cross_env")
        if found is not None:
            raise _Stop(found)
        if spec.statistical is None:
            diverged = policy.run_to_run(
                records, spec, self._nodeid, self._settings.deterministic, self._diagnosis(ref, cfg, config_dir)
            )
        else:
            records[0].meta["statistical"] = policy.per_seed(records)
            outcome.statistical = dict(records[0].meta["statistical"])
            diverged = (
                policy.same_seed_spread(records, spec.statistical, self._nodeid) if spec.statistical.same_seed else None
            )
        if diverged is not None:
            raise _Stop(diverged)
        outcome.warnings += policy.replicas_disagree(records[0])
        for other in records[1:]:  # compared: close their files, keep the scalars for the reports
            close_record(other)
        audit = policy.audit_findings(records[0])
        if audit and self._settings.config_audit == "fail":
            raise _stop(Verdict.ERROR, "config audit failed", messages.audit_failed(self._nodeid, audit))
        if self._settings.config_audit != "off":
            outcome.warnings += [f"config audit: {a}" for a in audit]
        facts = policy.Facts(
            self._nodeid,
            self._settings.regen,
            spec,
            self._settings.cross_env,
            cfg,
            effective,
            manifest,
            audit if self._settings.config_audit != "off" else [],
            self._session.relative,
        )
        found_refs = self._find_references(self.reference_dir(name), manifest, outcome)
        outcome.env_key = found_refs.env_key
        decision = policy.against_reference(found_refs, records[0], facts)
        for stored in [found_refs.here, *(r for _, r in found_refs.others)]:
            if stored is not None:  # decided: the reference's files are not read again
                close_record(stored.record)
        if decision.write:
            assert decision.reference is not None
            provenance = self._provenance(ref, cfg, source, effective, found_refs.env_key, records[0])
            try:
                outcome.staged = str(stage_reference(decision.reference, records[0], manifest, provenance))
            except OSError as exc:
                shown = self._session.relative(decision.reference)
                raise _stop(
                    Verdict.ERROR, f"cannot write {shown}: {exc}", messages.write_failed(self._nodeid, shown, exc)
                ) from None
        release_record(records[0])  # the test may keep it: no open file per kept record
        return records[0], decision

    def _apply(self, outcome: Outcome, d: Decision) -> None:
        """Copy a decision onto the outcome: the one place a check's verdict is set."""
        outcome.verdict, outcome.detail, outcome.message = d.verdict, d.detail, d.message
        outcome.details, outcome.differences, outcome.context = d.details, d.differences, d.context
        outcome.drift, outcome.compared_with, outcome.max_abs = d.drift, d.compared_with, d.max_abs
        if d.reference is not None:
            outcome.path = str(d.reference)
        if d.reference_losses is not None:
            outcome.curves["reference"] = d.reference_losses
        if outcome.statistical is not None:
            outcome.statistical["reference"] = d.reference_statistical

    # ------------------------------------------------------------------ teardown

    def finish(self, test_outcome: str, why: str) -> str | None:
        """The test has ended: commit staged references if it passed, reconcile verdicts; return a failure text."""
        failure = None
        if not self.outcomes and test_outcome == "passed":
            nothing = Outcome(self._nodeid, None, detail="the test never called repro.check: it checks nothing")
            self.outcomes.append(nothing)
            failure = messages.no_check(self._nodeid)
            test_outcome, why = "error", "it never called repro.check"
        swallowed = [o.verdict.label for o in self.outcomes if not o.verdict.ok and o.message]
        if swallowed and test_outcome == "passed":
            failure = messages.swallowed(self._nodeid, swallowed)
            test_outcome, why = "error", "it caught the check's failure"
        for o in self.outcomes:
            if o.staged is None:
                continue
            staged, o.staged = Path(o.staged), None
            if test_outcome != "passed" or not o.verdict.ok:
                discard_staged(staged, self._settings.reference_dir)
                continue
            assert o.path is not None
            try:
                kept = commit_reference(staged, Path(o.path), o.warnings)
            except OSError as exc:
                discard_staged(staged, self._settings.reference_dir)
                shown = self._session.relative(Path(o.path))
                o.verdict, o.detail = Verdict.ERROR, f"the reference could not be written: {exc}"
                failure = messages.write_failed(self._nodeid, shown, exc)
                test_outcome, why = "error", "its reference could not be written"
                continue
            if kept:
                o.warnings.append(f"kept files you added to the reference folder: {', '.join(kept)}")
        for o in self.outcomes:
            reconcile(o, test_outcome, why)
        return failure

    def properties(self) -> list[tuple[str, str]]:
        """The short JUnit properties of every check."""
        props: list[tuple[str, str]] = []
        for o in self.outcomes:
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

    # ------------------------------------------------------------------ config

    def _load_config(self, config: str | Path | Mapping[str, Any] | None) -> tuple[dict[str, Any], str | None]:
        def bad(problem: str) -> _Stop:
            return _stop(Verdict.ERROR, problem, messages.config_invalid(self._nodeid, problem))

        if config is None:
            return {}, None
        if isinstance(config, Mapping):
            data = dict(config)
            try:
                json.dumps(data)
            except (TypeError, ValueError) as exc:
                raise bad(f"config must be JSON-serializable ({exc})") from None
            return data, None
        if not isinstance(config, (str, Path)):
            raise bad(f"config must be a dict or a YAML file path, got {type(config).__name__}")
        path = Path(config)
        candidates = [path] if path.is_absolute() else [self._session.rootdir / path, self._test_dir / path]
        found = next((p for p in candidates if p.is_file()), None)
        folder = next((p for p in candidates if p.is_dir()), None)
        if found is None and folder is not None:
            raise bad(f"config {str(config)!r} is a folder ({folder}), not a YAML file")
        candidates = list(dict.fromkeys(candidates))
        if found is None:
            raise bad(f"config file {str(config)!r} not found (looked in: {', '.join(str(p) for p in candidates)})")
        try:
            data = yaml.safe_load(found.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise bad(f"config file {found} is not valid YAML: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise bad(f"config file {found} must hold a YAML mapping, got {type(data).__name__}")
        return data, str(found.parent)

    def _validate_config(
        self, job: Callable[..., Any] | str, cfg: dict[str, Any], source: str
    ) -> dict[str, dict[str, Any]]:
        """Check the config against the job's schema here, before any process starts; return the effective config."""
        from .schema import effective_config

        validate = getattr(job, "__repro_validate__", None)
        schema = getattr(job, "__repro_schema__", None)
        try:
            if schema is not None and not isinstance(schema, type):
                schema = schema()
            if validate is not None:
                validate(cfg)
            return effective_config(schema, cfg, source)
        except (ValueError, TypeError) as exc:
            raise _stop(Verdict.ERROR, "invalid config", messages.config_invalid(self._nodeid, str(exc))) from None

    # ------------------------------------------------------------------ runs

    def _seeds(self, stat: Statistical | None) -> list[int]:
        """One seed per run: the test's seed N times, or N different seeds for statistical mode."""
        if stat is None:
            return [self.seed] * self._settings.runs
        if stat.same_seed:
            return [self.seed] * stat.seeds
        return [self.seed] + [derive_seed(self.seed, f"statistical-{k}") for k in range(1, stat.seeds)]

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
        self, ref: JobRef, cfg: dict[str, Any], config_dir: str | None, seeds: list[int], outcome: Outcome
    ) -> tuple[list[Record], dict[str, Any]]:
        records: list[Record] = []
        manifest: dict[str, Any] = {}
        statistical = self._settings.tolerance.statistical is not None
        specs = [self._spec(ref, cfg, config_dir, seed, i) for i, seed in enumerate(seeds)]
        results = self._run_specs(ref, specs)
        outcome.warnings += self._session.runner.take_warnings()
        for i, (seed, result) in enumerate(zip(seeds, results, strict=False)):
            outcome.seconds.append(result.wall_s)
            if result.orphans:
                outcome.warnings.append(messages.orphans(i + 1, result.orphans))
            records.append(self._record_of(result, i + 1))
            outcome.curves[f"seed {seed}" if statistical else f"run {i + 1}"] = records[-1].losses
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

    def _run_one(self, spec: RunSpec, run: int, outcome: Outcome) -> Record:
        """Run one extra run (outside the check's N runs) and return its record."""
        result = self._session.runner.run(spec, self._settings.timeout, self._settings.base_seed)
        outcome.seconds.append(result.wall_s)
        return self._record_of(result, run)

    def _record_of(self, result: RunOutcome, run: int) -> Record:
        nodeid = self._nodeid
        if result.status == "timeout":
            raise _stop(
                Verdict.TIMEOUT, f"run {run} timed out", messages.timeout(nodeid, run, result.detail, result.log_tail)
            )
        if result.status == "error" and result.stage == "record":
            raise _stop(
                Verdict.ERROR,
                f"run {run}: the result cannot be recorded",
                messages.unrecordable(nodeid, run, result.detail),
            )
        if result.status != "ok":
            op = _nondeterministic_op(result.detail)
            if op is not None:
                last = result.detail.strip().splitlines()[-1]
                raise _stop(
                    Verdict.ERROR,
                    f"run {run}: {op} has no deterministic implementation",
                    messages.nondeterministic_op(nodeid, run, op, self.device, last),
                )
            if result.status != "error":  # ended without writing a traceback
                raise _stop(
                    Verdict.ERROR,
                    f"run {run} crashed: {result.detail}",
                    messages.job_crashed(nodeid, run, result.detail, result.log_tail),
                )
            crashed = "RankFailed" in result.detail
            what = "crashed" if crashed else "raised an exception"
            raise _stop(
                Verdict.ERROR,
                f"run {run} {what}",
                messages.job_failed(
                    nodeid, run, what, result.detail, result.log_tail, policy.near_misses(result.config_audit)
                ),
            )
        try:
            record = load_record(result.record_dir)
            for rank in range(1, self._nproc):
                record.ranks[rank] = load_record(rank_dir(result.workdir, rank) / RECORD_DIR)
            return record
        except (CorruptRecordError, FileNotFoundError) as exc:  # written and checked by the child: broken since
            raise _stop(
                Verdict.ERROR, f"run {run} wrote an unreadable record", messages.unreadable(nodeid, exc)
            ) from None

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

    # ------------------------------------------------------------------ references

    def _find_references(self, test_dir: Path, manifest: dict[str, Any], outcome: Outcome) -> policy.Found:
        from .manifest import environment_key

        env_key = environment_key(manifest, self.device, self._settings.env_key_fields)
        found = policy.Found(env_key, test_dir / env_key)
        root = self._settings.reference_dir
        try:
            outcome.warnings += clean_stale(test_dir)
            found.here = load_reference(found.target, root)
        except MissingReferenceError:
            pass
        except CorruptRecordError as exc:
            found.problem = ("corrupt", str(exc))
            return found
        except ReferenceBlockedError as exc:
            found.problem = ("blocked", str(exc))
            return found
        except OSError as exc:  # e.g. unreadable folder
            found.problem = ("unreadable", f"{test_dir}: {type(exc).__name__}: {exc}")
            return found
        if found.here is None:
            for other_key, folder in environment_dirs(test_dir).items():
                if other_key == env_key:
                    continue
                try:
                    found.others.append((other_key, load_reference(folder, root)))
                except (MissingReferenceError, CorruptRecordError, OSError) as exc:
                    found.unusable.append(f"{other_key} ({exc})")
        return found

    def _provenance(
        self,
        ref: JobRef,
        cfg: dict[str, Any],
        source: str,
        effective: dict[str, dict[str, Any]],
        env_key: str,
        record: Record,
    ) -> dict[str, Any]:
        from . import __version__

        return {
            "recorded_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
            "plugin_version": __version__,
            "test": self._nodeid,
            "job": ref.name,
            "seed": self.seed,
            "base_seed": self._settings.base_seed,
            "device": self.device,
            "environment_key": env_key,
            "deterministic": self._settings.deterministic,
            "runs": self._settings.runs,
            "config": cfg,
            "config_source": source,
            "effective_config": effective,
            "command": " ".join(shlex.quote(a) for a in self._session.invocation),
            "wall_s": record.meta.get("wall_s"),
        }


def _unreadable(nodeid: str, exc: RecordError) -> Decision:
    return Decision(Verdict.ERROR, f"a record became unreadable: {exc}", messages.unreadable(nodeid, exc))


def _read_manifest(workdir: Path) -> dict[str, Any]:
    try:
        data = json.loads((workdir / RUN_MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _nondeterministic_op(traceback_text: str) -> str | None:
    """Return the op torch named in a 'does not have a deterministic implementation' error, if that is the error."""
    m = re.search(r"(\S+) does not have a deterministic implementation, but you set", traceback_text)
    return m.group(1) if m else None
