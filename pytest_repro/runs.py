"""A check's runs, seen from the pytest process: their specs, running them, and their records.

A run that failed stops the check (``check.Stop``) with what the failure means (``_judge.runfail``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ._exec.child import RECORD_DIR, RUN_MANIFEST_FILE
from ._exec.distributed import rank_dir
from ._exec.outcome import RunOutcome
from ._judge import messages, policy, runfail
from ._judge.noise import Floor, NoiseFloor
from ._judge.policy import Decision
from ._judge.resume import resume
from ._judge.verdict import Verdict
from .check import Notes, Stop, Strategy
from .context import JobRef, RunSpec
from .record import CorruptRecordError, Record, close_record, load_record
from .session import ReproSession
from .settings import Settings

DIGEST_STEPS = 2  # the first steps whose module digests a reference keeps
# The time limit of a noise-floor, diagnosis, op-tracing or resume-probe run, in units of repro_timeout: they run
# under hooks or a dispatch mode (noise-floor runs measured up to 13x slower than the job's own).
FLOOR_TIMEOUT_FACTOR = 5


class Runs:
    """The runs of one check: one job and config, on one device, each run on ``nproc`` ranks."""

    def __init__(
        self,
        session: ReproSession,
        settings: Settings,
        nodeid: str,
        test_dir: Path,
        device: str,
        job: tuple[JobRef, dict[str, Any], str | None],
        nproc: int = 1,
    ) -> None:
        self._session, self._settings, self._nodeid, self._test_dir = session, settings, nodeid, test_dir
        self._device, self._nproc = device, nproc
        self._ref, self._cfg, self._config_dir = job
        self._checked: tuple[int, list[Record]] | None = None  # the seed and records of run_all
        self._floors: dict[tuple[int, bool], NoiseFloor] = {}
        self._spread: Floor | None = None
        self._run1: Path | None = None

    def spec(self, seed: int, index: int, diagnose: bool = False) -> RunSpec:
        """The spec of run ``index`` (0-based; run 1 writes the manifest), or of a traced run with ``diagnose``."""
        s = self._settings
        return RunSpec(
            job=self._ref,
            config=self._cfg,
            seed=seed,
            device=self._device,
            deterministic=s.deterministic,
            run_index=index,
            workdir=str(self._session.next_workdir(f"{'trace' if diagnose else 'run'}{index + 1}")),
            cwd=str(self._session.rootdir),
            sys_path=tuple(sys.path),
            manifest=(index == 0 and not diagnose),
            config_dir=self._config_dir,
            manifest_packages=s.manifest_packages,
            identity=s.identity,
            diagnose=diagnose,
            nproc=self._nproc,
        )

    def run_all(self, seed: int, strategy: Strategy, notes: Notes) -> tuple[list[Record], dict[str, Any]]:
        """Run the check's runs (the seeds the strategy asks for); return their records and run 1's manifest."""
        records: list[Record] = []
        manifest: dict[str, Any] = {}
        seeds = strategy.seeds(seed, self._settings.runs)
        specs = [self.spec(run_seed, i) for i, run_seed in enumerate(seeds)]
        if self._settings.regen:  # a regeneration's run 1 records where the reference's first steps start
            specs[0] = replace(specs[0], digest_steps=DIGEST_STEPS)
        results = self._run_specs(specs)
        notes.warnings += self._session.runner.take_warnings()
        for i, (run_seed, result) in enumerate(zip(seeds, results, strict=False)):
            notes.seconds.append(result.wall_s)
            if result.orphans:
                notes.warnings.append(messages.orphans(i + 1, result.orphans))
            records.append(self.record_of(result, i + 1))
            notes.curves[strategy.run_label(i, run_seed)] = records[-1].losses
            if i == 0:
                manifest = _read_manifest(result.workdir)
                self._run1 = result.workdir
        if len(records) < len(seeds):  # run_many stops early only after a failed run, which raised above
            raise RuntimeError(f"only {len(records)} of {len(seeds)} runs came back")
        self._checked = (seed, records)
        return records, manifest

    @property
    def _traced_timeout(self) -> float:
        return self._settings.timeout * FLOOR_TIMEOUT_FACTOR

    def digests(self) -> list[dict[str, Any]] | None:
        """Run 1's module digests (recorded when regenerating), compacted for the reference; None if not recorded."""
        from ._exec.trace import DIGESTS_FILE
        from ._judge.locate import compact

        if self._run1 is None or not (self._run1 / DIGESTS_FILE).is_file():
            return None
        try:
            return compact(json.loads((self._run1 / DIGESTS_FILE).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return None

    def locate(self, seed: int, stored: Any) -> str:
        """Trace one more run's first steps and say where it starts to differ from the reference's digests."""
        from ._exec.trace import DIGESTS_FILE
        from ._judge.locate import where_it_starts

        workdir = str(self._session.next_workdir("locate"))
        spec = replace(self.spec(seed, 0), digest_steps=DIGEST_STEPS, manifest=False, workdir=workdir)
        result = self._session.runner.run(spec, self._traced_timeout, self._settings.base_seed)
        try:
            traced = json.loads((result.workdir / DIGESTS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return f"where it starts is unknown: the traced run did not finish ({result.status})"
        return where_it_starts(stored, traced)

    def located(self, decision: Decision, stored: Any, seed: int) -> Decision:
        """A DIFFERS against this environment's reference, with where it starts (when the reference has digests)."""
        if not self._settings.tolerance.is_bitwise:  # noise would be named as the cause: bitwise checks only
            return decision
        if stored.digests_problem is not None:
            finding = f"where it starts is unknown: the reference's {stored.digests_problem}"
        elif not stored.digests:
            return decision
        else:
            finding = self.locate(seed, stored.digests)
        line = f"Where it starts (this run's first {DIGEST_STEPS} steps against the reference's module digests): "
        before, sep, after = decision.message.partition("\nIf the change is intended")
        return replace(
            decision,
            message=f"{before}\n{line}{finding}{sep}{after}",
            details=[*decision.details, finding],
            origin=finding,
        )

    def keep_spread(self) -> None:
        """Keep how far the check's own runs moved from run 1 (before their files are closed), for the floor."""
        from ._judge.noise import spread

        if self._checked is not None:
            self._spread = spread(self._checked[1])

    def floor(self, count: int, streams: bool) -> NoiseFloor:
        """The noise floor of run 1: ``count`` perturbed runs of the job, and the spread of the check's own runs.

        ``streams``: perturb the random streams too (the reference comes from another kind of device, whose
        generators draw other dropout masks from the same seed); else rounding only.
        """
        key = (count, streams)
        if key in self._floors:
            return self._floors[key]
        if self._checked is None:
            raise RuntimeError("the noise floor is measured after the check's runs")
        from ._judge.noise import floor_run_problem, measure
        from .seeding import derive_seed

        seed, records = self._checked
        specs = [
            replace(
                self.spec(seed, 0),
                perturb=derive_seed(seed, f"perturb-{i}"),
                perturb_parts=("rounding", "streams") if streams else ("rounding",),
                manifest=False,
                workdir=str(self._session.next_workdir(f"noise{i + 1}")),
            )
            for i in range(count)
        ]
        started = time.perf_counter()
        # under the dispatch mode and the ulp hook a run trains several times slower than the job's own runs
        results = self._run_specs(specs, timeout=self._traced_timeout)
        try:
            perturbed = [self.record_of(result, len(records) + i + 1) for i, result in enumerate(results)]
        except Stop as stop:  # the job's own runs passed: say that this one ran perturbed, and the way out
            d = stop.decision
            text = messages.floor_run_failed(self._nodeid, d.message or d.detail, streams, d.verdict is Verdict.TIMEOUT)
            raise Stop(replace(d, detail=f"a noise-floor run: {d.detail}", message=text)) from None
        seconds = time.perf_counter() - started
        if len(perturbed) < count:
            raise RuntimeError(f"only {len(perturbed)} of {count} perturbed runs came back")
        counts = [r.meta.get("perturbation") or {} for r in perturbed]
        parts = [
            name
            for name, part in (("rounding", "rounding"), ("random streams", "streams"))
            if any(c.get(part, 0) for c in counts)
        ]
        measured = measure(records[0], perturbed, self._spread, parts, seconds)
        problem = floor_run_problem(records[0], perturbed, measured.floor)
        for record in perturbed:
            close_record(record)
        if problem is not None:
            text = messages.floor_run_failed(self._nodeid, problem, streams)
            raise Stop(Decision(Verdict.ERROR, f"a noise-floor run: {problem}", text))
        self._floors[key] = measured
        return measured

    def _run_specs(self, specs: list[RunSpec], timeout: float | None = None) -> list[RunOutcome]:
        """Preload what the job imports, then run the specs, side by side where repro_parallel_runs allows.

        Stops after the first run that fails (the list is then shorter, ending with that run).
        """
        from ._exec.runner import parallel_runs

        s = self._settings
        self._session.preload_job(self._ref, self._test_dir)
        parallel = parallel_runs(s.parallel_runs, len(specs), self._device, s.threads)
        if s.parallel_runs == 0 and self._device != "cpu":
            parallel = self._session.gpu_parallel(specs)
        if any(getattr(spec, "nproc", 1) > 1 for spec in specs):
            parallel = 1  # each run already uses several processes
        outcomes = self._session.runner.run_many(specs, timeout or s.timeout, s.base_seed, parallel)
        if self._device != "cpu":
            self._session.note_peaks(specs, [o.workdir for o in outcomes if o.status == "ok"])
        return outcomes

    def run_one(self, spec: RunSpec, run: int, notes: Notes) -> Record:
        """Run one extra run (outside the check's N runs) and return its record."""
        result = self._session.runner.run(spec, self._settings.timeout, self._settings.base_seed)
        notes.seconds.append(result.wall_s)
        return self.record_of(result, run)

    def record_of(self, result: RunOutcome, run: int) -> Record:
        """Run ``run``'s record (every rank's), or stop the check with what its failure means."""
        failed = runfail.run_failed(
            self._nodeid,
            run,
            self._device,
            result.status,
            result.detail,
            result.log_tail,
            result.stage,
            result.config_audit,
        )
        if failed is not None:
            raise Stop(failed)
        try:
            record = load_record(result.record_dir)
            for rank in range(1, self._nproc):
                record.ranks[rank] = load_record(rank_dir(result.workdir, rank) / RECORD_DIR)
            return record
        except (CorruptRecordError, FileNotFoundError) as exc:  # written and checked by the child: broken since
            raise Stop(runfail.unreadable_run_record(self._nodeid, run, exc)) from None

    def diagnosis(self, seed: int) -> Callable[[], str] | None:
        """With --repro-diagnose: what finds where two runs diverge (two more runs, traced)."""
        if not self._settings.diagnose:
            return None

        def diagnose() -> str:
            from ._judge.diagnose import first_divergence

            folders = self._traced([self.spec(seed, i, diagnose=True) for i in range(2)])
            if isinstance(folders, str):
                return folders
            found = first_divergence(folders[0], folders[1])
            if found is None:
                return (
                    "the two traced runs agreed at every forward, loss and optimizer step (the divergence is "
                    "outside the training steps, e.g. in evaluation or in what the job returns)"
                )
            if found.kind == "input":
                return found.describe()
            return found.describe() + self._first_op(seed, found.step)

        return diagnose

    def _first_op(self, seed: int, step: int) -> str:
        """Two more traced runs that hash every aten op of ``step``: '; the first op whose output differs ...'."""
        from ._judge.diagnose import first_op

        folders = self._traced([replace(self.spec(seed, i, diagnose=True), ops_step=step) for i in range(2)])
        if isinstance(folders, str):
            return f"; the op-level runs did not finish: {folders}"
        found = first_op(folders[0], folders[1])
        return "" if found is None else f"; {found.describe()}"

    def resume(self, seed: int, full: Record, at: int, notes: Notes) -> Decision:
        """Stop a run after ``at`` steps, resume it in a fresh process, and decide whether it is the ``full`` run."""
        from .checkpoint import STATE_FILE, given
        from .jobs.lightning import CHECKPOINT_NAME as LIGHTNING_CHECKPOINT

        base = self.spec(seed, 0)
        stop_spec = replace(base, stop_at=at, manifest=False)
        stopped = self.run_one(stop_spec, 1, notes)
        ckpt = Path(stop_spec.workdir) / "checkpoint"
        if not any(ckpt.iterdir()):
            raise Stop(
                Decision(Verdict.ERROR, "no checkpoint written", messages.resume_no_checkpoint(self._nodeid, at))
            )
        workdir = str(self._session.next_workdir("resume"))
        resume_spec = replace(base, workdir=workdir, resume_from=str(ckpt), manifest=False, run_index=1)
        resumed = self.run_one(resume_spec, 2, notes)
        bad = policy.invalid_results([stopped, resumed], self._settings.tolerance, self._nodeid)
        if bad is not None:
            raise Stop(bad)
        notes.curves = {"uninterrupted": full.losses, f"stopped at {at} + resumed": stopped.losses + resumed.losses}
        decided = resume(
            full,
            stopped,
            resumed,
            at,
            self._settings.tolerance,
            self._nodeid,
            given(ckpt) if (ckpt / STATE_FILE).is_file() else None,
            lightning=(ckpt / LIGHTNING_CHECKPOINT).is_file(),
        )
        if decided.verdict is not Verdict.DIFFERS or stopped.losses != full.losses[:at]:
            return decided  # a difference before the checkpoint is not the resume's: nothing to probe
        finding = self._probe_resume(seed, at, ckpt)
        head, _, rest = decided.message.partition("\n")
        return replace(decided, message=f"{head}\n{finding}\n{rest}", details=[finding], origin=finding)

    def _probe_resume(self, seed: int, at: int, ckpt: Path) -> str:
        """Trace the uninterrupted run and a resume from ``ckpt`` again; say what differs at the boundary."""
        from ._judge.resume_probe import boundary

        full = replace(self.spec(seed, 0, diagnose=True), probe_resume_at=at)
        again = replace(
            self.spec(seed, 1, diagnose=True), probe_resume_at=at, resume_from=str(ckpt), run_index=1, manifest=False
        )
        folders = self._traced([full, again])
        if isinstance(folders, str):
            return f"The resume boundary could not be probed: {folders}."
        return boundary(folders[0], folders[1], at)

    def _traced(self, specs: list[RunSpec]) -> list[Path] | str:
        """Run traced specs one after the other; their folders, or which one did not finish and why."""
        folders = []
        for i, spec in enumerate(specs, start=1):
            result = self._session.runner.run(spec, self._traced_timeout, self._settings.base_seed)
            if result.status != "ok":
                return f"the traced run {i} did not finish ({result.status}: {result.detail.splitlines()[-1:]})"
            folders.append(result.workdir)
        return folders


def _read_manifest(workdir: Path) -> dict[str, Any]:
    try:
        data = json.loads((workdir / RUN_MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
