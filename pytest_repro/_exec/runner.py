"""Running a job in fresh, seeded processes: the parent API (``Runner``) that the fixture and session use.

Through a warm fork worker (``worker``, reached through ``pool``) that imports the heavy libraries once
(never touching CUDA) and forks one child per run, so every run starts from the same clean, just-imported
state; what it imports grows while it lives (the packages a job's source imports, and those a run's child
imported that the worker lacked), and it forks several children at a time when asked, for the runs of one
check to run side by side. Where fork is unsafe (not Linux, or CUDA got initialised in the worker) a fresh
interpreter is spawned per run instead. Results come back as files (safetensors + JSON), never pickle.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..context import RunSpec
from ..seeding import determinism_env
from .child import IMPORTS_FILE
from .daemon import IDLE_DEFAULT, DaemonUnavailable, read_state
from .daemon import stop as stop_daemon
from .outcome import RunOutcome, outcome
from .pool import (
    GRACE,
    WORKER_START_TIMEOUT,
    DaemonStale,
    Spawned,
    Worker,
    finish_spawned,
    forget,
    read_tail,
    start_spawned,
    stop_spawned,
    warm_worker,
    workers,
)
from .protocol import RunReply

# transformers is not preloaded: importing it for set_seed costs ~2 s, paid only by jobs that use it
# (the session finds it in the job's source, or learns it from a run, and asks the worker for it).
# torch._inductor: torch.use_deterministic_algorithms() imports it (~1-2 s) on first call.
# pytest_repro.record/manifest: every child imports them to write its record and manifest.
BASE_PRELOAD = (
    "pytest",
    "numpy",
    "torch",
    "torch._inductor",
    "safetensors.torch",
    "pytest_repro.record",
    "pytest_repro.manifest",
)
# Variables read while the worker starts and imports (not only later in the job): a worker is
# reused only by runs that agree on these. Every other variable is set in each child before the job.
STARTUP_ENV = (
    "PYTHONHASHSEED",
    "PYTHONPATH",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "CUBLAS_WORKSPACE_CONFIG",
    "TOKENIZERS_PARALLELISM",
)


def parallel_runs(
    setting: int, runs: int, device: str, threads: int, cores: int | None = None, workers: int | None = None
) -> int:
    """How many runs of one check run side by side: ``setting`` (>= 1), or for auto (0) what free cores allow.

    Auto: on the CPU with a fixed thread count, ``cores // (threads * xdist workers)`` (at most ``runs``);
    on a GPU (see ``session.gpu_parallel``), or with torch's default thread count (all cores), one at a time.
    """
    if setting >= 1:
        return max(1, min(setting, runs))
    if device != "cpu" or threads <= 0:
        return 1
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers is None:
        count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
        workers = int(count) if count.isdigit() and int(count) > 0 else 1
    return max(1, min(runs, cores // (threads * workers)))


def fork_supported() -> bool:
    """Whether the warm fork worker can be used on this platform."""
    return hasattr(os, "fork") and sys.platform.startswith("linux")


# Filters a child's report of what it imported down to what the worker may preload
# (module names reported by the child, the job's module) -> entries.
LearnFilter = Callable[[Sequence[str], str], list[str]]


class Runner:
    """Runs jobs in fresh processes, through a warm fork worker where possible."""

    def __init__(
        self,
        isolation: str,
        preload: tuple[str, ...] = BASE_PRELOAD,
        extra_env: dict[str, str] | None = None,
        learn: LearnFilter | None = None,
        daemon_folder: Path | None = None,
        idle: float = IDLE_DEFAULT,
    ) -> None:
        if isolation not in ("auto", "fork", "spawn"):
            raise ValueError(f"isolation must be auto, fork or spawn, got {isolation!r}")
        self.isolation = "fork" if isolation in ("auto", "fork") and fork_supported() else "spawn"
        self.preload = preload
        self.extra_env = dict(extra_env or {})
        self.learn = learn
        self.wanted: dict[str, None] = {}  # entries the worker should import beyond ``preload``, in order
        self.excluded: set[str] = set()  # entries that made forking unsafe: never preloaded again
        self._reported: set[str] = set()
        self._warnings: list[str] = []
        self._warm: Worker | None = None
        self._retired: list[Worker] = []  # workers this runner dropped (what they failed to import still counts)
        self.daemon_folder = daemon_folder if self.isolation == "fork" else None  # None: a worker of its own
        self.idle = idle
        self.lines: list[str] = []  # session-level lines: which worker served, what went wrong with the daemon
        self._announced: set[int] = set()

    def env(self, deterministic: bool, hash_seed: int) -> dict[str, str]:
        """The environment of job processes (and of the worker that forks them)."""
        env = determinism_env(deterministic, hash_seed)
        env.update(self.extra_env)
        return env

    # ------------------------------------------------------------ what the worker preloads

    def want(self, entries: Sequence[str]) -> None:
        """Have the worker import these too (sent before the next runs; see sync_warm to send them now)."""
        for entry in entries:
            self.wanted.setdefault(entry, None)

    def sync_warm(self) -> None:
        """Send what is wanted to the worker started by warm_up, so that it imports while pytest collects."""
        if self._warm is not None and self._warm.alive():
            with contextlib.suppress(EOFError, OSError):
                self._sync(self._warm)

    def _sync(self, worker: Worker) -> None:
        bad = self.rejected()
        new = [e for e in self.wanted if e not in worker.requested and e not in bad]
        if new:
            worker.submit_import(new)

    def rejected(self) -> set[str]:
        """Entries that failed to import, are not installed, or made forking unsafe."""
        bad = set(self.excluded)
        for worker in [*workers(), *self._retired]:
            bad |= set(worker.failed) | worker.missing
        return bad

    def preloaded(self) -> list[str]:
        """Every wanted entry that imported fine where it was tried (what is worth persisting)."""
        bad = self.rejected()
        return [e for e in self.wanted if e not in bad]

    def take_warnings(self) -> list[str]:
        """Return (and forget) the preload problems found since the last call, each reported once."""
        out, self._warnings = self._warnings, []
        return out

    def _review(self, worker: Worker) -> None:
        """Turn the worker's import failures into warnings; retire it if an import made forking unsafe."""
        for entry, error in worker.failed.items():
            if entry not in self._reported:
                self._reported.add(entry)
                self._warnings.append(
                    f"the warm worker could not import {entry} ({error}); it is skipped, so each run imports it "
                    "itself (slower). Fix: make the package importable in this environment, or remove it from "
                    "the pytest cache entry repro/preload (`pytest --cache-clear`)"
                )
        if worker.tainted and worker.daemon is not None:
            with contextlib.suppress(EOFError, OSError):
                worker.retire()  # unsafe for every session: the next one starts a daemon without the culprit
        if worker.tainted and (not worker.culprit or worker.culprit in self.preload):
            self._drop(worker)  # a module every worker needs: forking cannot work in this environment
            self.isolation = "spawn"
            self._warnings.append(
                f"{worker.tainted or 'forking became unsafe'} in the warm worker, so every run of this session is "
                "a fresh interpreter (slower, same results). Fix: find what starts a thread or initialises CUDA "
                "on import (e.g. a sitecustomize), or run with --repro-isolation=spawn to skip the worker"
            )
        elif worker.tainted:
            self.excluded.add(worker.culprit)
            self._drop(worker)
            self._warnings.append(
                f"{worker.tainted} in the warm worker (forking from it is unsafe), so that worker was replaced by "
                f"one that does not preload {worker.culprit}: runs of jobs that import it pay that import themselves. "
                "Fix (only if runs are slow): have the package start threads or CUDA lazily, not on import"
            )

    def _learn_from(self, spec: RunSpec) -> None:
        """Read what the child imported beyond the worker's modules, and want the preloadable part of it."""
        if self.learn is None:
            return
        try:
            names = json.loads((Path(spec.workdir) / IMPORTS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if isinstance(names, list):
            self.want(self.learn([str(n) for n in names], spec.job.module))

    # ------------------------------------------------------------ workers

    def _worker(self, env: dict[str, str]) -> Worker:
        key = (sys.executable, tuple((k, env.get(k)) for k in STARTUP_ENV), self.preload)
        if self.daemon_folder is not None:
            try:
                try:
                    worker = warm_worker(key, env, self.preload, self.daemon_folder, self.idle)
                except DaemonStale as stale:  # it has retired: the next one starts with the new code
                    self.lines.append(f"{stale}; a new one was started")
                    worker = warm_worker(key, env, self.preload, self.daemon_folder, self.idle)
            except (DaemonUnavailable, OSError) as exc:
                self.daemon_folder = None
                self.lines.append(
                    f"the worker daemon could not be used ({exc}), so this session runs a worker of its own "
                    "(same results; later sessions pay the imports again). Fix: see the daemon's log in "
                    ".pytest_cache/d/repro-worker, or set repro_worker = session to stop trying"
                )
            else:
                self._announce(worker)
                return worker
        return warm_worker(key, env, self.preload)

    def _announce(self, worker: Worker) -> None:
        """One line per daemon this session used: started by it, or found warm."""
        opened = worker.daemon
        if opened is None or worker.pid in self._announced:
            return
        self._announced.add(worker.pid)
        self.lines += opened.retired
        idle = f"{self.idle / 60:g} min" if self.idle >= 60 else f"{self.idle:g} s"
        if opened.started:
            self.lines.append(
                f"started the worker daemon pid {worker.pid}: later sessions fork their runs from it and skip the "
                f"imports; it exits after {idle} without sessions (`pytest-repro worker status` shows it, "
                "`pytest-repro worker stop` ends it; repro_worker = session: none)"
            )
        else:
            self.lines.append(
                f"runs forked by the warm worker daemon pid {worker.pid} ({worker.served_before} run(s) before "
                "this session; `pytest-repro worker stop` ends it)"
            )

    def _drop(self, worker: Worker) -> None:
        forget(worker)
        self._retired.append(worker)
        if self._warm is worker:
            self._warm = None

    def use_daemon(self, folder: Path, idle: float) -> None:
        """Fork runs from the worker daemon kept under ``folder`` (started when none is running there)."""
        if self.isolation == "fork":
            self.daemon_folder, self.idle = folder, idle

    def warm_up(self, deterministic: bool, hash_seed: int) -> None:
        """Start a worker early (and send it what is wanted) so that its imports overlap with collection."""
        if self.isolation == "fork":
            self._warm = self._worker(self.env(deterministic, hash_seed))
            self.sync_warm()

    # ------------------------------------------------------------ runs

    def run(self, spec: RunSpec, timeout: float, hash_seed: int) -> RunOutcome:
        """Run the job once in a fresh process and report how it ended."""
        return self.run_many([spec], timeout, hash_seed)[0]

    def run_many(self, specs: Sequence[RunSpec], timeout: float, hash_seed: int, parallel: int = 1) -> list[RunOutcome]:
        """Run each spec in its own fresh process, up to ``parallel`` at a time; outcomes in spec order.

        Stops starting runs once one has not ended ok, so the list may be shorter than ``specs``
        (it always holds the first failed run, and every run started before it ended).
        """
        for spec in specs:
            Path(spec.workdir).mkdir(parents=True, exist_ok=True)
        if not specs:
            return []
        if len({s.deterministic for s in specs}) > 1:  # different start-up environments: one batch each
            out: list[RunOutcome] = []
            for spec in specs:
                out += self.run_many([spec], timeout, hash_seed, parallel)
                if out[-1].status != "ok":
                    break
            return out
        if self.isolation == "fork":
            return self._run_forked(specs, timeout, hash_seed, max(1, parallel))
        return self._run_spawned(specs, timeout, hash_seed, max(1, parallel))

    def _run_forked(self, specs: Sequence[RunSpec], timeout: float, hash_seed: int, parallel: int) -> list[RunOutcome]:
        env = self.env(specs[0].deterministic, hash_seed)
        worker = self._worker(env)
        outcomes: dict[int, RunOutcome] = {}
        in_flight: dict[int, tuple[int, float]] = {}  # request id -> (spec index, deadline)
        spawn_later: list[int] = []
        failed = False
        started = 0
        try:
            while in_flight or (started < len(specs) and not failed):
                while started < len(specs) and not failed and len(in_flight) < parallel:
                    if not in_flight:  # never while a child runs: the worker would not reap it while importing
                        self._sync(worker)
                    rid = worker.submit(specs[started], timeout, env)
                    in_flight[rid] = (started, time.monotonic() + timeout + WORKER_START_TIMEOUT + GRACE)
                    started += 1
                rid, reply = worker.wait(list(in_flight), min(d for _, d in in_flight.values()))
                index = in_flight.pop(rid)[0]
                if reply.get("status") == "unforkable":
                    spawn_later.append(index)
                    continue
                outcomes[index] = outcome(reply, Path(specs[index].workdir), timeout)
                if outcomes[index].status == "ok":
                    self._learn_from(specs[index])
                else:
                    failed = True
        except (EOFError, TimeoutError, OSError) as exc:
            if worker.daemon is not None and self.daemon_folder is not None:
                for rid, reply in worker.drain(list(in_flight)).items():  # what it said before it went away counts
                    index = in_flight.pop(rid)[0]
                    outcomes[index] = outcome(reply, Path(specs[index].workdir), timeout)
                self._drop(worker)
                if isinstance(exc, TimeoutError):  # alive but not answering: its runs must not write on
                    place = worker.daemon.place
                    stop_daemon(place, read_state(place.state) or {"pid": worker.pid, "key": place.key})
                return self._after_daemon_died(worker, exc, specs, outcomes, timeout, hash_seed, parallel)
            self._drop(worker)
            died: RunReply = {"status": "worker-died", "detail": str(exc), "log": read_tail(worker.log_path)}
            for index, _ in in_flight.values():
                outcomes[index] = outcome(died, Path(specs[index].workdir), timeout)
        else:
            self._review(worker)
        for index in spawn_later:
            outcomes[index] = self._run_spawned([specs[index]], timeout, hash_seed, 1)[0]
        return [outcomes[i] for i in sorted(outcomes)]

    def _after_daemon_died(
        self,
        worker: Worker,
        exc: BaseException,
        specs: Sequence[RunSpec],
        done: dict[int, RunOutcome],
        timeout: float,
        hash_seed: int,
        parallel: int,
    ) -> list[RunOutcome]:
        """The daemon went away mid-batch: repeat the unfinished runs in a worker of this session, say so once."""
        self.daemon_folder = None
        self.lines.append(
            f"the worker daemon pid {worker.pid} went away mid-session ({exc}); the runs it had not finished were "
            "repeated in a worker of this session, which serves the rest of it (same results, slower); the next "
            "session starts a new daemon"
        )
        todo = [i for i in range(len(specs)) if i not in done]
        for index in todo:  # whatever the killed run left is not trusted
            workdir = Path(specs[index].workdir)
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir(parents=True, exist_ok=True)
        if any(o.status != "ok" for o in done.values()):
            return [done[i] for i in sorted(done)]
        again = self._run_forked([specs[i] for i in todo], timeout, hash_seed, parallel)
        done.update({todo[n]: outcome for n, outcome in enumerate(again)})
        return [done[i] for i in sorted(done)]

    def _run_spawned(self, specs: Sequence[RunSpec], timeout: float, hash_seed: int, parallel: int) -> list[RunOutcome]:
        env = self.env(specs[0].deterministic, hash_seed)
        outcomes: dict[int, RunOutcome] = {}
        running: dict[int, Spawned] = {}
        started, failed, delay = 0, False, 0.002
        try:
            while running or (started < len(specs) and not failed):
                while started < len(specs) and not failed and len(running) < parallel:
                    running[started] = start_spawned(specs[started], env, timeout)
                    started += 1
                    delay = 0.002
                now = time.monotonic()
                for index in list(running):
                    reply = finish_spawned(running[index], now)
                    if reply is not None:
                        del running[index]
                        outcomes[index] = outcome(reply, Path(specs[index].workdir), timeout)
                        failed = failed or outcomes[index].status != "ok"
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
        finally:
            for run in running.values():  # interrupted: leave nothing behind
                stop_spawned(run)
        return [outcomes[i] for i in sorted(outcomes)]
