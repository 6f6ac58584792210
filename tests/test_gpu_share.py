"""repro_parallel_runs=auto on a GPU, on the CPU: free memory against a job's measured peak (no GPU needed)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_repro._exec.child import PEAK_FILE
from pytest_repro._exec.gpu_share import (
    CONTEXT_BYTES,
    HEADROOM,
    fit,
    free_bytes,
    job_key,
    load_peaks,
    read_peak,
    save_peaks,
)
from pytest_repro.context import JobRef, RunSpec
from pytest_repro.session import ReproSession
from pytest_repro.settings import Settings

GiB = 1 << 30


class _Cache:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get(self, key: str, default: Any) -> Any:
        return self.data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = json.loads(json.dumps(value))


def _spec(tmp_path: Path, config: dict[str, Any], index: int = 0) -> RunSpec:
    return RunSpec(
        job=JobRef("jobs", "train"),
        config=config,
        seed=1,
        device="cuda",
        deterministic=True,
        run_index=index,
        workdir=str(tmp_path / f"run{index}"),
        cwd=str(tmp_path),
    )


def test_runs_fit_by_memory() -> None:
    per = 10 * GiB * HEADROOM + CONTEXT_BYTES
    assert fit(2, int(2 * per), 10 * GiB) == 2
    assert fit(2, int(2 * per) - 1, 10 * GiB) == 1
    assert fit(5, 1000 * GiB, 1 * GiB) == 5  # never more than the check's runs
    assert fit(2, None, GiB) == 1 and fit(2, 80 * GiB, None) == 1 and fit(2, 80 * GiB, 0) == 1
    assert fit(1, 80 * GiB, GiB) == 1


@given(st.integers(1, 64), st.integers(0, 1 << 40), st.integers(1, 1 << 38))
def test_fit_never_overcommits(runs: int, free: int, peak: int) -> None:
    n = fit(runs, free, peak)
    assert 1 <= n <= runs
    assert n == 1 or n * (peak * HEADROOM + CONTEXT_BYTES) <= free


def test_free_memory_from_nvidia_smi_without_touching_cuda() -> None:
    calls: list[list[str]] = []

    def run(cmd: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "81000\n", "")

    assert free_bytes("3,1", run, lambda _: "/usr/bin/nvidia-smi") == 81000 << 20
    assert calls[0][-2:] == ["-i", "3"]  # the first visible GPU is the runs' GPU
    assert free_bytes(None, run, lambda _: None) is None  # no nvidia-smi: unknown, one at a time

    def broken(cmd: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 0, "[N/A]\n", "")

    assert free_bytes("0", broken, lambda _: "x") is None
    assert free_bytes("0", lambda *a, **k: subprocess.CompletedProcess(a, 9, "", "no"), lambda _: "x") is None


def test_peaks_are_read_kept_and_garbage_ignored(tmp_path: Path) -> None:
    (tmp_path / PEAK_FILE).write_text(json.dumps({"peak_bytes": 123}))
    assert read_peak(tmp_path) == 123
    for bad in ("{", json.dumps({"peak_bytes": -1}), json.dumps(["x"]), json.dumps({"peak_bytes": "9"})):
        (tmp_path / PEAK_FILE).write_text(bad)
        assert read_peak(tmp_path) is None
    cache = _Cache()
    save_peaks(cache, {"a": 5})
    save_peaks(cache, {"b": 7})
    assert load_peaks(cache) == {"a": 5, "b": 7}
    cache.data["repro/gpu-peak"] = {"a": "x", "b": 3}
    assert load_peaks(cache) == {"b": 3}


def test_the_first_runs_of_a_job_go_one_at_a_time_and_later_ones_side_by_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = ReproSession(Settings(), tmp_path, [])
    try:
        specs = [_spec(tmp_path, {"lr": 1}, i) for i in range(3)]
        monkeypatch.setattr("pytest_repro._exec.gpu_share.free_bytes", lambda visible: 80 * GiB)
        assert session.gpu_parallel(specs) == 1  # no peak measured yet
        for spec in specs[:2]:
            Path(spec.workdir).mkdir()
            (Path(spec.workdir) / PEAK_FILE).write_text(json.dumps({"peak_bytes": 24 * GiB}))
        session.note_peaks(specs, [Path(s.workdir) for s in specs])  # the third wrote nothing: ignored
        assert session.gpu_peaks == {job_key(specs[0]): 24 * GiB}
        assert session.gpu_parallel(specs) == 2  # 80 GiB free holds two runs at 24 GiB x 1.25 + context, not three
        other = [_spec(tmp_path, {"lr": 2}, i) for i in range(2)]
        assert session.gpu_parallel(other) == 1  # another config: its own peak, not measured yet
        cache = _Cache()
        session.save_preloads(cache)
        assert load_peaks(cache) == {job_key(specs[0]): 24 * GiB}
    finally:
        session.close()
