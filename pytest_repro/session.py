"""Per-session state: the runner (warm workers), the device, scratch folders, and what the run saw."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._exec.daemon import DIR_NAME
from ._exec.gpu_share import load_peaks, save_peaks
from ._exec.preload import Preloads, distributions_cached, load_cached, save_cached
from ._exec.runner import Runner
from .context import JobRef, RunSpec
from .scratch import make_scratch, release_scratch
from .settings import Settings


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
    """Pin the CPU thread pools of job processes (results independent of core count, no oversubscription)."""
    if threads <= 0:
        return {}
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}


def daemon_wanted(setting: str, environ: Mapping[str, str]) -> bool:
    """Whether runs come from the worker daemon: ``daemon``; ``auto`` unless CI or PYTEST_REPRO_WORKER=session."""
    if setting != "auto":
        return setting == "daemon"
    chosen = environ.get("PYTEST_REPRO_WORKER", "").strip().lower()
    if chosen in ("daemon", "session"):
        return chosen == "daemon"
    return environ.get("CI", "").strip().lower() in ("", "0", "false", "no")


class DeviceUnavailableError(RuntimeError):
    """CUDA was asked for explicitly but this machine cannot provide it."""


def no_gpu_driver(dev: Path = Path("/dev")) -> bool:
    """Linux: no NVIDIA or ROCm device node, so torch cannot see a GPU (known without importing torch)."""
    if not sys.platform.startswith("linux") or not dev.is_dir():
        return False
    return not any(dev.glob("nvidia*")) and not (dev / "kfd").exists() and not (dev / "dxg").exists()


def resolve_device(requested: str) -> str:
    """Turn 'auto' into cuda or cpu; raise DeviceUnavailableError when an explicit CUDA device is missing."""
    if requested == "cpu" or (requested == "auto" and no_gpu_driver()):
        return "cpu"  # importing torch only to learn that costs the session ~1.5 s
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


class ReproSession:
    """Session-wide state: the runner (warm workers), the outcomes, and a scratch folder."""

    def __init__(self, settings: Settings, rootdir: Path, invocation: list[str]) -> None:
        self.settings = settings
        self.rootdir = rootdir
        self.invocation = invocation
        self.scratch = make_scratch()  # locked while this process lives: see scratch.py
        # What the warm worker imports besides the basics: found in job/test sources, learned from runs,
        # and kept in pytest's cache between sessions (see preload.py).
        self.preloads = Preloads([rootdir])
        self.runner = Runner(
            settings.isolation,
            extra_env={**thread_env(settings.threads), **job_env(settings.device, os.environ)},
            learn=self.preloads.learned,
        )
        self._cached_preloads: list[str] = []
        self.gpu_peaks: dict[str, int] = {}  # job key -> peak device memory of a run (see _exec/gpu_share)
        self._new_peaks: dict[str, int] = {}
        self.outcomes: list[dict[str, Any]] = []  # JSON form, gathered from test reports (all xdist workers)
        # For the unused-reference check: reproducible tests collected/deselected (merged from xdist workers),
        # and what the run could not see (collection errors, module-level skips, ignored paths).
        self.owned_nodeids: list[str] = []
        self.deselected_reproducible: list[str] = []
        self.not_collected: list[str] = []
        self.unused: list[Path] = []
        self.unused_kept: list[str] = []
        self.unused_note = ""
        # nodeid -> when -> (outcome, why): the logged setup/call outcome of each running test
        self.logged: dict[str, dict[str, tuple[str, str]]] = {}
        self.notes: list[str] = []  # session-level lines for the summary (e.g. a report that failed to write)
        self._counter = 0

    def warm_up(self, cache: Any = None) -> None:
        """Start the default worker now, with what pytest's cache says jobs import, to overlap with collection.

        The worker is the daemon (under pytest's cache) when wanted and a cache is there, else this session's own.
        """
        if cache is not None:
            distributions_cached(cache)
            self.gpu_peaks = load_peaks(cache)
            self._cached_preloads = load_cached(cache)
            self.runner.want(self._cached_preloads)
            if daemon_wanted(self.settings.worker, os.environ):
                try:
                    self.runner.use_daemon(Path(cache.mkdir(DIR_NAME)), self.settings.worker_idle)
                except OSError as exc:  # e.g. a read-only checkout
                    self.notes.append(f"no worker daemon: pytest's cache folder is not writable ({exc})")
        elif self.settings.worker == "daemon":
            self.notes.append(
                "no worker daemon: it lives in pytest's cache, which is disabled (-p no:cacheprovider); "
                "this session used a worker of its own"
            )
        self.runner.warm_up(self.settings.deterministic, self.settings.base_seed)

    def worker_lines(self) -> None:
        """Add the runner's lines about the worker daemon to the session's notes."""
        self.notes += [line for line in self.runner.lines if line not in self.notes]
        self.runner.lines.clear()

    def preload_tests(self, files: Sequence[Path]) -> None:
        """Send the warm worker what the collected reproducible tests' modules (and their jobs) import."""
        self.runner.want(self.preloads.tests(files))
        self.runner.sync_warm()

    def preload_job(self, ref: JobRef, test_dir: Path | None = None) -> None:
        """Before a check's first run: have the worker import what the job's module imports."""
        self.runner.want(self.preloads.for_job(ref, test_dir))
        if self.runner.daemon_folder is not None:  # the daemon skips a job's own list: it may name the user's code
            tops = {e: e.partition(":")[0].partition(".")[0] for e in ref.preload}
            self.runner.want(
                [
                    e
                    for e, top in tops.items()
                    if top not in self.preloads.job_packages and self.preloads.third_party(top)
                ]
            )

    def gpu_parallel(self, specs: Sequence[RunSpec]) -> int:
        """repro_parallel_runs=auto on a GPU: as many runs side by side as its free memory holds at their peak."""
        from ._exec.gpu_share import fit, free_bytes, job_key

        peak = self.gpu_peaks.get(job_key(specs[0]))
        if peak is None or len(specs) < 2:
            return 1  # the first runs of a job, one at a time: their peak decides for the next ones
        visible = self.runner.extra_env.get("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES"))
        return fit(len(specs), free_bytes(visible), peak)

    def note_peaks(self, specs: Sequence[RunSpec], workdirs: Sequence[Path]) -> None:
        """Remember the largest GPU peak the runs reported, per job and config."""
        from ._exec.gpu_share import job_key, read_peak

        peaks = [p for p in (read_peak(w) for w in workdirs) if p is not None]
        if specs and peaks:
            key = job_key(specs[0])
            self.gpu_peaks[key] = self._new_peaks[key] = max(peaks)

    def save_preloads(self, cache: Any) -> None:
        """Add what this session found worth preloading (and GPU peaks) to pytest's cache, for the next session."""
        if cache is not None and self._new_peaks:
            save_peaks(cache, self._new_peaks)
        if cache is None or self.runner.isolation != "fork":
            return
        found = self.preloads.keep(self.runner.preloaded())
        bad = self.runner.rejected()
        if set(found) - set(self._cached_preloads) or bad & set(self._cached_preloads):
            save_cached(cache, found, bad)

    def next_workdir(self, label: str) -> Path:
        """Return a fresh scratch folder for one run."""
        self._counter += 1
        path = self.scratch / f"{self._counter:04d}-{label}"
        path.mkdir(parents=True)
        return path

    def relative(self, path: Path) -> str:
        """Return ``path`` relative to the rootdir when it lies inside it."""
        try:
            return str(path.relative_to(self.rootdir))
        except ValueError:
            return str(path)

    def close(self) -> None:
        """Remove scratch files (warm workers stay for the rest of the process; see runner)."""
        release_scratch(self.scratch)
