"""How many runs of one check fit side by side on a GPU: its free memory (asked of nvidia-smi, so that the pytest
process never touches CUDA) against the peak a run of the same job and config needed before (kept in pytest's cache).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..context import RunSpec
from .child import PEAK_FILE

CACHE_KEY = "repro/gpu-peak"
CONTEXT_BYTES = 600 << 20  # per process, outside the allocator's peak: the CUDA context and torch's kernels
HEADROOM = 1.25  # allocator fragmentation and cuBLAS workspaces differ a little between runs
_MAX_ENTRIES = 1000


def fit(runs: int, free: int | None, peak: int | None, context: int = CONTEXT_BYTES, headroom: float = HEADROOM) -> int:
    """Runs that fit in ``free`` bytes at ``peak`` each (1 when either is unknown): at most ``runs``, at least 1."""
    if free is None or peak is None or peak <= 0 or runs <= 1:
        return 1
    return max(1, min(runs, int(free // (peak * headroom + context))))


def job_key(spec: RunSpec) -> str:
    """The job, its config and its device: runs with the same key need about the same memory."""
    config = json.dumps(spec.config, sort_keys=True, default=str)
    digest = hashlib.sha256(config.encode()).hexdigest()[:16]
    return f"{spec.job.module}:{spec.job.qualname}:{digest}:{spec.device}"


def free_bytes(
    visible: str | None, run: Callable[..., Any] = subprocess.run, which: Callable[[str], str | None] = shutil.which
) -> int | None:
    """Free memory of the GPU the runs get (the first of CUDA_VISIBLE_DEVICES, else GPU 0); None when unknown."""
    if which("nvidia-smi") is None:
        return None
    first = (visible or "0").split(",")[0].strip()
    select = ["-i", first] if first else []
    try:
        out = run(
            ["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits", *select],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    try:
        return int(float(str(out.stdout).split()[0]) * (1 << 20))  # MiB
    except (ValueError, IndexError):
        return None


def read_peak(workdir: Path) -> int | None:
    """The peak device memory a finished run reported (None: it did not use a GPU, or said nothing)."""
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        value = json.loads((workdir / PEAK_FILE).read_text(encoding="utf-8")).get("peak_bytes")
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_peaks(cache: Any) -> dict[str, int]:
    """The peaks earlier sessions measured (empty when absent or malformed)."""
    try:
        value = cache.get(CACHE_KEY, None)
    except Exception:  # an unreadable cache costs only speed
        return {}
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, int) and v > 0}


def save_peaks(cache: Any, peaks: Mapping[str, int]) -> None:
    """Keep the peaks for later sessions (the newest _MAX_ENTRIES)."""
    if peaks:
        with contextlib.suppress(Exception):
            cache.set(CACHE_KEY, dict(list({**load_peaks(cache), **peaks}.items())[-_MAX_ENTRIES:]))
