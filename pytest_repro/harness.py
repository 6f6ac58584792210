"""The ``repro`` fixture's work: run a job N times, compare run-to-run and with the reference, regenerate."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from .compare import Comparison, compare_records
from .record import CorruptRecordError, Record, first_non_finite, load_record
from .runner import MANIFEST_FILE, JobRef, JobReferenceError, Runner, RunOutcome, RunSpec
from .seeding import derive_seed
from .settings import Settings
from .storage import (
    MissingReferenceError,
    Reference,
    environment_dirs,
    load_reference,
    reference_path,
    write_reference,
)
from .tolerances import Statistical, ToleranceSpec


@dataclass
class CheckOutcome:
    """What one ``repro.check`` concluded, for the terminal summary."""

    nodeid: str
    name: str | None
    verdict: str  # passed, diverged, differs, written, unchanged, missing, corrupt, error, timeout, non-finite
    path: Path | None = None
    detail: str = ""
    seconds: list[float] = field(default_factory=list)
    env_key: str | None = None
    compared_with: str | None = None  # env key of the reference used, when it is another environment's
    drift: list[str] = field(default_factory=list)  # numeric environment drift vs the reference
    details: list[str] = field(default_factory=list)  # e.g. the statistical verdict lines of a pass
    warnings: list[str] = field(default_factory=list)
    seed: int | None = None
    device: str | None = None
    # For the HTML report and -v: loss curves (per run and of the reference), the differences found,
    # and the largest absolute difference per section against the reference.
    curves: dict[str, list[float]] = field(default_factory=dict)
    differences: list[dict[str, Any]] = field(default_factory=list)
    max_abs: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form that travels in the test report (and so across xdist workers)."""
        data = asdict(self)
        data["path"] = str(self.path) if self.path is not None else None
        return data


@dataclass
class _Check:
    """The state of one ``repro.check`` call as it moves through runs, comparison and storage."""

    ref: JobRef
    cfg: dict[str, Any]
    config_source: str
    config_dir: str | None
    effective: dict[str, dict[str, Any]]
    outcome: CheckOutcome
    manifest: dict[str, Any] = field(default_factory=dict)


def worker_gpu(worker: str | None, visible: str | None, count: int) -> str | None:
    """Return CUDA_VISIBLE_DEVICES for an xdist worker's jobs: worker gwN gets the N-th GPU (round robin)."""
    if not worker or not worker.startswith("gw") or not worker[2:].isdigit():
        return None
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(count)]
    if not devices:
        return None
    return devices[int(worker[2:]) % len(devices)]


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def job_env(device: str, environ: Mapping[str, str], count: Callable[[], int] = _cuda_count) -> dict[str, str]:
    """Extra environment for job processes: under xdist, pin each worker's jobs to one GPU."""
    worker = environ.get("PYTEST_XDIST_WORKER")
    if device == "cpu" or not worker:
        return {}
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    gpu = worker_gpu(worker, visible, 0 if visible else count())
    return {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}


def thread_env(threads: int) -> dict[str, str]:
    """Pin the CPU thread pools of job processes: results then do not depend on the machine's core count,
    and parallel workers (xdist) do not oversubscribe the cores (OpenMP spin-waits make that very slow)."""
    if threads <= 0:
        return {}
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}


class ReproSession:
    """Session-wide state: the runner (warm workers), the outcomes, and a scratch folder."""

    def __init__(self, settings: Settings, rootdir: Path, invocation: list[str]) -> None:
        self.settings = settings
        self.rootdir = rootdir
        self.invocation = invocation
        self.scratch = Path(tempfile.mkdtemp(prefix="pytest-repro-"))
        self.runner = Runner(
            settings.isolation, extra_env={**thread_env(settings.threads), **job_env(settings.device, os.environ)}
        )
        self.outcomes: list[dict[str, Any]] = []  # JSON form, gathered from test reports (all xdist workers)
        # For the unused-reference check: reproducible tests collected/deselected (merged from xdist workers).
        self.owned_nodeids: list[str] = []
        self.deselected_reproducible: list[str] = []
        self.unused: list[Path] = []
        self.unused_note = ""
        self._counter = 0

    def warm_up(self) -> None:
        """Start the default worker now so that its imports overlap with collection."""
        self.runner.warm_up(self.settings.deterministic, self.settings.base_seed)

    def next_workdir(self, label: str) -> Path:
        """Return a fresh scratch folder for one run."""
        self._counter += 1
        path = self.scratch / f"{self._counter:04d}-{label}"
        path.mkdir(parents=True)
        return path

    def close(self) -> None:
        """Remove scratch files (warm workers stay for the rest of the process; see runner)."""
        shutil.rmtree(self.scratch, ignore_errors=True)


class DeviceUnavailableError(RuntimeError):
    """CUDA was asked for explicitly but this machine cannot provide it."""


def resolve_device(requested: str) -> str:
    """Turn 'auto' into cuda or cpu; raise DeviceUnavailableError when an explicit CUDA device is missing."""
    if requested == "cpu":
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if requested == "auto":
        return "cuda" if available else "cpu"
    count = torch.cuda.device_count() if available else 0
    index = int(requested.partition(":")[2] or 0)
    if index >= count:
        raise DeviceUnavailableError(
            f"device {requested!r} was requested but this machine has {count} usable CUDA device(s) "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). A GPU gate must not pass "
            "without a GPU: fix the runner's driver/container setup, or run with --repro-device=cpu."
        )
    return requested


def _regen_command(nodeid: str, mode: str = "") -> str:
    flag = "--repro-regen" + (f"={mode}" if mode else "")
    return f"pytest --repro {flag} {shlex.quote(nodeid)}"


def _fail(message: str) -> None:
    pytest.fail(message, pytrace=False)


class Repro:
    """The ``repro`` fixture: run a job reproducibly and check it against its reference."""

    def __init__(self, session: ReproSession, settings: Settings, item: pytest.Item) -> None:
        self._session = session
        self._settings = settings
        self._item = item
        self._nodeid = item.nodeid
        self._test_dir = Path(item.path).parent
        self._names: set[str | None] = set()
        self._device: str | None = None
        self.records: list[Record] = []

    @property
    def seed(self) -> int:
        """The seed this test's runs use: the marker's seed, or one derived from the base seed and node id."""
        s = self._settings
        return s.seed if s.seed is not None else derive_seed(s.base_seed, self._nodeid)

    @property
    def device(self) -> str:
        """The device the runs use (cuda when available and not overridden, else cpu)."""
        if self._device is None:
            try:
                self._device = resolve_device(self._settings.device)
            except DeviceUnavailableError as exc:
                _fail(f"{self._nodeid}: {exc}")
                raise
        return self._device

    @property
    def settings(self) -> Settings:
        """The effective settings for this test."""
        return self._settings

    def reference_dir(self, name: str | None = None) -> Path:
        """Return where this test's reference (for the check called ``name``) lives."""
        return reference_path(self._settings.reference_dir, self._nodeid, name)

    def _load_config(self, config: str | Path | Mapping[str, Any] | None) -> tuple[dict[str, Any], str | None]:
        if config is None:
            return {}, None
        if isinstance(config, Mapping):
            data = dict(config)
            try:
                json.dumps(data)
            except (TypeError, ValueError) as exc:
                raise pytest.UsageError(f"{self._nodeid}: config must be JSON-serializable ({exc})") from None
            return data, None
        path = Path(config)
        candidates = [path] if path.is_absolute() else [self._session.rootdir / path, self._test_dir / path]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            tried = ", ".join(str(p) for p in candidates)
            _fail(f"config file {str(config)!r} not found (looked in: {tried})")
            raise AssertionError  # unreachable: pytest.fail raises
        try:
            data = yaml.safe_load(found.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            _fail(f"config file {found} is not valid YAML: {exc}")
        if data is None:
            data = {}
        if not isinstance(data, dict):
            _fail(f"config file {found} must hold a YAML mapping, got {type(data).__name__}")
        return data, str(found.parent)

    def check(
        self,
        job: Callable[..., Any] | str,
        config: str | Path | Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> Record:
        """Run ``job`` N times in fresh seeded processes, compare the runs and the reference; return run 1's record."""
        if name in self._names:
            raise pytest.UsageError(
                f"{self._nodeid}: repro.check called twice with name={name!r}; give each check its own name="
            )
        self._names.add(name)
        try:
            ref = JobRef.from_callable(job)
        except JobReferenceError as exc:
            raise pytest.UsageError(f"{self._nodeid}: {exc}") from None
        cfg, config_dir = self._load_config(config)
        source = str(config) if isinstance(config, (str, Path)) else "dict"
        effective = self._validate_config(job, cfg, source)
        outcome = CheckOutcome(self._nodeid, name, "passed", self.reference_dir(name), seed=self.seed)
        try:
            return self._check(_Check(ref, cfg, source, config_dir, effective, outcome))
        finally:
            self._publish(outcome)

    def _publish(self, outcome: CheckOutcome) -> None:
        """Attach the outcome to the test report: the summary, JSON report and JUnit XML read it from there."""
        props = self._item.user_properties
        props.append(("repro_outcome", json.dumps(outcome.to_dict(), sort_keys=True)))
        suffix = f"[{outcome.name}]" if outcome.name else ""
        props += [
            (f"repro_verdict{suffix}", outcome.verdict),
            (f"repro_environment{suffix}", outcome.env_key or ""),
            (f"repro_seed{suffix}", str(outcome.seed)),
            (f"repro_device{suffix}", outcome.device or ""),
            (f"repro_run_seconds{suffix}", " ".join(f"{x:.3f}" for x in outcome.seconds)),
        ]
        if outcome.detail:
            props.append((f"repro_detail{suffix}", outcome.detail))

    def _check(self, c: _Check) -> Record:
        outcome = c.outcome
        outcome.device = self.device
        stat = self._settings.tolerance.statistical
        records = self._run_all(c, self._seeds(stat))
        self.records = records
        if stat is None:
            self._check_run_to_run(records, c)
        else:
            self._summarize_seeds(records, stat, outcome)
        self._audit_config(records[0], c)
        self._check_reference(records[0], c)
        return records[0]

    def _seeds(self, stat: Statistical | None) -> list[int]:
        """One seed per run: the test's seed N times, or N different seeds for statistical mode."""
        if stat is None:
            return [self.seed] * self._settings.runs
        if stat.same_seed:
            return [self.seed] * stat.seeds
        return [self.seed] + [derive_seed(self.seed, f"statistical-{k}") for k in range(1, stat.seeds)]

    def _summarize_seeds(self, records: list[Record], stat: Statistical, outcome: CheckOutcome) -> None:
        """Attach the per-seed values to run 1's record; with same_seed, check the runs' spread."""
        from .stats import spread

        metrics = {name: [r.metrics.get(name, math.nan) for r in records] for name in records[0].metrics}
        records[0].meta["statistical"] = {
            "seeds": [r.seed for r in records],
            "metrics": metrics,
            "losses": [r.losses for r in records],
        }
        if not stat.same_seed:
            return
        problems = []
        for name, values in metrics.items():
            allowed = stat.margin_for(statistics.fmean(values))
            if spread(values) > allowed:
                problems.append(
                    f"metrics[{name!r}]: spread {spread(values):.3g} across {len(values)} runs (allowed {allowed:.3g})"
                )
        steps = min(len(r.losses) for r in records)
        for step in range(steps):
            values = [r.losses[step] for r in records]
            allowed = stat.margin_for(statistics.fmean(values))
            if spread(values) > allowed:
                problems.append(
                    f"losses: spread {spread(values):.3g} at step {step} (allowed {allowed:.3g}); "
                    "first step over the limit"
                )
                break
        if problems:
            outcome.verdict = "diverged"
            outcome.detail = f"runs with the same seed spread beyond the margin ({problems[0].split(':')[0]})"
            _fail(
                f"{self._nodeid}: {len(records)} runs with seed {self.seed} on {self.device} spread more than "
                f"the margin:\n" + "\n".join(f"  {p}" for p in problems) + "\n"
                "Fix: turn determinism on (ini repro_deterministic = true), or widen the margin in "
                "pytest_repro.statistical(margin=..., same_seed=True)."
            )

    def _validate_config(
        self, job: Callable[..., Any] | str, cfg: dict[str, Any], source: str
    ) -> dict[str, dict[str, Any]]:
        """Check the config against the job's schema here, before any process starts; return the effective config."""
        from .schema import effective_config

        validate = getattr(job, "__repro_validate__", None)
        schema = getattr(job, "__repro_schema__", None)
        if schema is not None and not isinstance(schema, type):
            schema = schema()
        try:
            if validate is not None:
                validate(cfg)
            return effective_config(schema, cfg, source)
        except ValueError as exc:
            problem = str(exc)
        _fail(f"{self._nodeid}: {problem}\nNothing was run. Fix the config passed to repro.check (see the job's docs).")
        raise AssertionError  # unreachable: pytest.fail raises

    def _spec(self, c: _Check, seed: int, index: int, diagnose: bool = False) -> RunSpec:
        s = self._settings
        return RunSpec(
            job=c.ref,
            config=c.cfg,
            seed=seed,
            device=self.device,
            deterministic=s.deterministic,
            run_index=index,
            workdir=str(self._session.next_workdir(f"{'trace' if diagnose else 'run'}{index + 1}")),
            cwd=str(self._session.rootdir),
            sys_path=tuple(sys.path),
            manifest=(index == 0 and not diagnose),
            config_dir=c.config_dir,
            manifest_packages=s.manifest_packages,
            identity=s.identity,
            diagnose=diagnose,
        )

    def _run_all(self, c: _Check, seeds: list[int]) -> list[Record]:
        records: list[Record] = []
        for i, seed in enumerate(seeds):
            result = self._session.runner.run(self._spec(c, seed, i), self._settings.timeout, self._settings.base_seed)
            c.outcome.seconds.append(result.wall_s)
            records.append(self._record_of(result, i + 1, c.outcome))
            c.outcome.curves[f"run {i + 1}"] = records[-1].losses
            if i == 0:
                c.manifest = self._read_manifest(result.workdir)
        return records

    def _record_of(self, result: RunOutcome, run: int, outcome: CheckOutcome) -> Record:
        if result.status != "ok":
            outcome.verdict = "timeout" if result.status == "timeout" else "error"
            log = f"\n--- output of run {run} (last lines) ---\n{result.log_tail}" if result.log_tail.strip() else ""
            if result.status == "timeout":
                outcome.detail = f"run {run} timed out"
                _fail(
                    f"run {run} of {self._nodeid} was {result.detail} and was killed.{log}\n"
                    "Fix: find why the job hangs, or raise the limit with "
                    "@pytest.mark.reproducible(timeout=SECONDS), ini repro_timeout or --repro-timeout."
                )
            op = _nondeterministic_op(result.detail)
            if op is not None:
                outcome.detail = f"run {run}: {op} has no deterministic implementation"
                _fail(
                    f"run {run} of {self._nodeid}: the job used `{op}`, which has no deterministic implementation "
                    f"on {self.device}, and determinism is on (torch.use_deterministic_algorithms(True)).\n"
                    f"{result.detail.strip().splitlines()[-1]}\n"
                    "Options: use a deterministic alternative for this op (e.g. another reduction or interpolation "
                    "mode); or keep determinism on but let this op through with "
                    "torch.use_deterministic_algorithms(True, warn_only=True) inside the job; or run "
                    "nondeterministically (@pytest.mark.reproducible(deterministic=False)) with a statistical "
                    "tolerance (pytest_repro.statistical(...))."
                )
            what = "raised an exception" if result.status == "error" else "crashed"
            outcome.detail = f"run {run} {what}"
            _fail(
                f"run {run} of {self._nodeid}: the job {what} in its process:\n{result.detail}{log}\n"
                "Fix the job (the traceback above is from the job's own process), then rerun: "
                f"pytest --repro {shlex.quote(self._nodeid)}"
            )
        try:
            record = load_record(result.record_dir)
        except (CorruptRecordError, FileNotFoundError) as exc:
            outcome.verdict = "error"
            _fail(f"run {run} of {self._nodeid} wrote an unreadable record: {exc}")
            raise AssertionError from exc  # unreachable
        bad = first_non_finite(record.losses)
        if bad is not None:
            outcome.verdict = "non-finite"
            outcome.detail = f"run {run}: loss {record.losses[bad]} at step {bad}"
            shown = ", ".join(f"{v:.6g}" for v in record.losses[max(0, bad - 3) : bad + 1])
            _fail(
                f"run {run} of {self._nodeid}: the loss is {record.losses[bad]} at step {bad} "
                f"(first non-finite step; steps {max(0, bad - 3)}..{bad}: {shown}). "
                "No reference was compared or written.\n"
                "Fix: lower the learning rate, check the data and loss for division by zero or log(0), "
                "or use a higher-precision dtype; then rerun: "
                f"pytest --repro {shlex.quote(self._nodeid)}"
            )
        return record

    def _check_run_to_run(self, records: list[Record], c: _Check) -> None:
        outcome = c.outcome
        first = records[0]
        for k, other in enumerate(records[1:], start=2):
            cmp = compare_records(first, other, self._settings.tolerance)
            if cmp.ok:
                continue
            outcome.verdict = "diverged"
            outcome.detail = _headline(cmp, f"runs 1 and {k} diverge")
            outcome.differences = [asdict(d) for d in cmp.differences]
            if self._settings.diagnose:
                diagnosis = f"Diagnosis (two more runs, tracing every parameter and gradient): {self._diagnose(c)}\n"
            else:
                diagnosis = "Rerun with --repro-diagnose to find the first step and tensor that diverge.\n"
            _fail(
                f"{self._nodeid} is not reproducible run-to-run: {outcome.detail}\n"
                f"{cmp.describe('run 1', f'run {k}')}\n"
                f"Both runs used seed {self.seed} on {self.device} "
                f"(deterministic={self._settings.deterministic}); nothing was compared with the reference.\n"
                f"{diagnosis}"
                "Fix: draw every random number from the seeded sources (ctx.seed, ctx.rng, ctx.generator()), "
                "keep determinism on (ini repro_deterministic = true), or loosen the tolerance with "
                "@pytest.mark.reproducible(tolerance=...) or pytest_repro.statistical(same_seed=True, margin=...)."
            )

    def _diagnose(self, c: _Check) -> str:
        """Run the job twice more with step tracing and name the first parameter/gradient that differs."""
        from .diagnose import first_divergence

        folders = []
        for i in range(2):
            spec = self._spec(c, self.seed, i, diagnose=True)
            result = self._session.runner.run(spec, self._settings.timeout, self._settings.base_seed)
            if result.status != "ok":
                return f"the traced run {i + 1} did not finish ({result.status}: {result.detail.splitlines()[-1:]})"
            folders.append(result.workdir)
        found = first_divergence(folders[0], folders[1])
        if found is None:
            return "the two traced runs agreed at every optimizer step (the divergence is outside the optimizer steps)"
        return found.describe()

    def _audit_config(self, record: Record, c: _Check) -> None:
        audit = record.meta.get("config_audit") or {}
        problems = [
            f"the job read config key {k!r}, which the config does not declare (it used a default)"
            for k in audit.get("undeclared_reads", [])
        ]
        problems += [f"config key {k!r} was never read by the job" for k in audit.get("unused_keys", [])]
        if not problems or self._settings.config_audit == "off":
            return
        if self._settings.config_audit == "fail":
            c.outcome.verdict = "error"
            c.outcome.detail = "config audit failed"
            _fail(
                f"{self._nodeid}: the recorded config does not match what the job used:\n"
                + "\n".join(f"  {p}" for p in problems)
                + "\nFix: declare every key the job reads (and drop unused ones) in the config, "
                "or set ini repro_config_audit = warn."
            )
        c.outcome.warnings += [f"config audit: {p}" for p in problems]

    def _provenance(self, c: _Check, record: Record) -> dict[str, Any]:
        from . import __version__

        return {
            "recorded_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
            "plugin_version": __version__,
            "test": self._nodeid,
            "job": c.ref.name,
            "seed": self.seed,
            "base_seed": self._settings.base_seed,
            "device": self.device,
            "environment_key": c.outcome.env_key,
            "deterministic": self._settings.deterministic,
            "runs": self._settings.runs,
            "config": c.cfg,
            "config_source": c.config_source,
            "effective_config": c.effective,
            "command": " ".join(shlex.quote(a) for a in self._session.invocation),
            "wall_s": record.meta.get("wall_s"),
        }

    @staticmethod
    def _read_manifest(workdir: Path) -> dict[str, Any]:
        path = workdir / MANIFEST_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, record: Record, c: _Check, target: Path, detail: str) -> None:
        write_reference(target, record, c.manifest, self._provenance(c, record))
        c.outcome.path = target
        c.outcome.verdict = "written"
        c.outcome.detail = detail

    def _check_reference(self, record: Record, c: _Check) -> None:
        from .manifest import environment_key, numeric_drift

        outcome = c.outcome
        test_dir = outcome.path
        assert test_dir is not None
        env_key = environment_key(c.manifest, self.device, self._settings.env_key_fields)
        outcome.env_key = env_key
        target = test_dir / env_key
        outcome.path = target
        regen = self._settings.regen
        try:
            stored: Reference | None = load_reference(target)
        except MissingReferenceError:
            stored = None
        except CorruptRecordError as exc:
            if regen == "all":  # only an explicit full regeneration may replace a broken reference
                self._write(record, c, target, f"replaced a corrupt reference ({exc.detail})")
                return
            outcome.verdict = "corrupt"
            outcome.detail = str(exc)
            _fail(
                f"the reference for {self._nodeid} is corrupt and was not used: {exc}\n"
                "It was left untouched. Inspect it (git diff / git checkout), or rewrite it with: "
                f"{_regen_command(self._nodeid)}"
            )
            return
        if stored is None:
            if regen in ("all", "missing"):
                self._write(record, c, target, f"environment {env_key}")
            else:
                self._compare_other_environments(record, c, test_dir, env_key)
            return
        verdict = _verdict(stored.record, record, self._settings.tolerance, "reference", self._nodeid)
        self._note_reference(stored, record, verdict, c.outcome)
        if regen == "all" and not verdict.ok:
            self._write(record, c, target, f"reference updated ({verdict.where})")
        elif regen == "all" and stored.provenance.get("config") != c.cfg:
            self._write(record, c, target, "same values; provenance updated for the changed config")
        elif verdict.ok:
            outcome.verdict = "unchanged" if regen == "all" else "passed"
            outcome.details = verdict.lines
            if stored.manifest and c.manifest:
                outcome.drift = [d.describe() for d in numeric_drift(stored.manifest, c.manifest)]
        else:
            outcome.verdict = "differs"
            outcome.detail = f"differs from the reference {verdict.where}"
            _fail(
                f"{self._nodeid} differs from its reference {self._relative(target)}.\n"
                f"{_context(stored, record, c)}"
                f"What differs:\n{verdict.describe()}\n"
                "If the change is intended, regenerate the reference with: "
                f"{_regen_command(self._nodeid)}"
            )

    def _compare_other_environments(self, record: Record, c: _Check, test_dir: Path, env_key: str) -> None:
        """No reference for this environment: compare with the closest other one, under the cross-env tolerance."""
        from .manifest import numeric_drift

        outcome = c.outcome
        candidates: list[tuple[int, str, Reference]] = []
        unusable: list[str] = []
        for other_key, folder in environment_dirs(test_dir).items():
            try:
                other = load_reference(folder)
            except (MissingReferenceError, CorruptRecordError) as exc:
                unusable.append(f"{other_key} ({exc})")
                continue
            distance = len(numeric_drift(other.manifest, c.manifest)) if other.manifest and c.manifest else 999
            candidates.append((distance, other_key, other))
        record_cmd = _regen_command(self._nodeid, "missing")
        if not candidates:
            outcome.verdict = "missing"
            also = f" (unusable: {'; '.join(unusable)})" if unusable else ""
            _fail(
                f"no reference for {self._nodeid} in environment {env_key!r}: expected one at "
                f"{self._relative(test_dir / env_key)}{also}\n"
                f"Record it for this environment (after checking that the job is right) with: {record_cmd}"
            )
            return
        _, other_key, stored = min(candidates, key=lambda t: (t[0], t[1]))
        spec = self._settings.cross_env
        if self._settings.tolerance.statistical is not None:
            spec = self._settings.tolerance  # statistical mode is already a cross-hardware bar
        outcome.compared_with = other_key
        outcome.path = stored.path
        verdict = _verdict(stored.record, record, spec, f"reference ({other_key})", self._nodeid)
        self._note_reference(stored, record, verdict, c.outcome)
        drift = [d.describe() for d in numeric_drift(stored.manifest, c.manifest)] if stored.manifest else []
        outcome.drift = drift
        described = spec.statistical.describe() if spec.statistical else spec.default.describe()
        note = (
            f"no reference for environment {env_key!r}; compared with the one recorded in {other_key!r} "
            f"under the cross-environment tolerance ({described}), not bitwise"
        )
        if verdict.ok:
            outcome.verdict = "passed-cross-env"
            outcome.detail = note
            outcome.details = verdict.lines
            return
        outcome.verdict = "differs"
        outcome.detail = f"differs from the {other_key} reference {verdict.where}"
        _fail(
            f"{self._nodeid}: {note}, and it differs.\n"
            f"{_context(stored, record, c)}"
            f"What differs:\n{verdict.describe()}\n"
            f"Fix: record a reference for this environment with: {record_cmd}\n"
            "or loosen the cross-environment tolerance (@pytest.mark.reproducible(cross_env=...), "
            "ini repro_cross_env_tolerance)."
        )

    @staticmethod
    def _note_reference(stored: Reference, record: Record, verdict: _Verdict, outcome: CheckOutcome) -> None:
        from .compare import section_max_abs

        outcome.curves["reference"] = stored.record.losses
        outcome.differences = verdict.differences
        outcome.max_abs = section_max_abs(stored.record, record)

    def _relative(self, path: Path) -> str:
        try:
            return str(path.relative_to(self._session.rootdir))
        except ValueError:
            return str(path)


@dataclass
class _Verdict:
    """A comparison with the reference, value-by-value or statistical, as the check reports it."""

    ok: bool
    where: str  # e.g. "at step 3", "in metrics['x']"
    lines: list[str]
    differences: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> str:
        return "\n".join(self.lines)


def _verdict(stored: Record, record: Record, spec: ToleranceSpec, ref_label: str, nodeid: str) -> _Verdict:
    """Compare a run with a stored reference under the spec: value by value, or statistically over seeds."""
    if spec.statistical is None:
        cmp = compare_records(stored, record, spec)
        if cmp.ok:
            return _Verdict(True, "", [])
        return _Verdict(
            False,
            _headline(cmp, "").strip(),
            [cmp.describe(ref_label, "this run")],
            [asdict(d) for d in cmp.differences],
        )
    from .stats import TooFewSeedsError, compare_statistical

    ref_stats, new_stats = stored.meta.get("statistical"), record.meta.get("statistical")
    if not isinstance(ref_stats, dict) or not isinstance(new_stats, dict):
        _fail(
            f"{nodeid}: the {ref_label} holds no per-seed values, so it cannot be compared statistically. "
            f"Record one in statistical mode with: {_regen_command(nodeid)}"
        )
        raise AssertionError  # unreachable
    try:
        results, band = compare_statistical(ref_stats, new_stats, spec.statistical)
    except (TooFewSeedsError, KeyError) as exc:
        problem = str(exc)
    else:
        lines = [f"  {r.describe()}" for r in results]
        if band is not None:
            lines.append(f"  {band.describe()}")
        failed = [r for r in results if not r.equivalent]
        where = f"in metrics[{failed[0].name!r}]" if failed else (f"at step {band.step}" if band else "")
        return _Verdict(not failed and band is None, where, lines)
    _fail(
        f"{nodeid}: {problem}\nFix: run more seeds (pytest_repro.statistical(seeds=...)), then {_regen_command(nodeid)}"
    )
    raise AssertionError  # unreachable


def _nondeterministic_op(traceback_text: str) -> str | None:
    """Return the op torch named in a 'does not have a deterministic implementation' error, if that is the error."""
    import re

    m = re.search(r"(\S+) does not have a deterministic implementation, but you set", traceback_text)
    return m.group(1) if m else None


def _headline(cmp: Comparison, prefix: str) -> str:
    d = cmp.differences[0]
    if d.section == "losses" and d.kind == "value":
        return f"{prefix} at step {d.step}"
    where = d.section if d.key is None else f"{d.section}[{d.key!r}]"
    return f"{prefix} in {where}"


def _context(stored: Reference, record: Record, c: _Check) -> str:
    """Explain what else differs between the reference's run and this one: config, settings, environment."""
    from .manifest import diff_manifests

    lines: list[str] = []
    old_eff = stored.provenance.get("effective_config")
    if isinstance(old_eff, dict):
        old_values = {path: entry.get("value") for path, entry in old_eff.items() if isinstance(entry, dict)}
        new_values = {path: entry["value"] for path, entry in c.effective.items()}
        for d in diff_manifests(old_values, new_values)[:12]:
            top = d.path.split(".", 1)[0] if d.path not in new_values else d.path
            source = c.effective.get(d.path, c.effective.get(top, {})).get("source")
            tag = f" ({source})" if source else ""
            lines.append("  config {}: reference {}, this run {}".format(d.path, *d.values()) + tag)
    for key in ("seed", "device", "deterministic", "dtype"):
        old, new = stored.record.meta.get(key), record.meta.get(key)
        if old != new:
            lines.append(f"  {key}: reference {old!r}, this run {new!r}")
    if stored.manifest and c.manifest:
        drift = [d for d in diff_manifests(stored.manifest, c.manifest) if d.category != "cosmetic"]
        lines += ["  " + d.describe() for d in drift[:12]]
        if len(drift) > 12:
            lines.append(f"  … and {len(drift) - 12} more environment changes")
    if not lines:
        return "Same config, seed, device, determinism and environment as the reference: the code or data changed.\n"
    return "Changed since the reference was recorded:\n" + "\n".join(lines) + "\n"
