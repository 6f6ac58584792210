"""Scratch space: a killed session's scratch folder is removed by the next session (and said so, once), a live
session's never, nor a folder whose owner is unknown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# A process that makes a scratch folder the way a session does, fills it, says where it is, then dies or waits.
OWNER = """
import os, signal, sys
from pytest_repro.scratch import make_scratch

folder = make_scratch()
(folder / "0001-run").mkdir()
(folder / "0001-run" / "weights.safetensors").write_bytes(b"x" * 2_000_000)
print(folder, os.getpid(), flush=True)
if sys.argv[1] == "die":
    os.kill(os.getpid(), signal.SIGKILL)
sys.stdin.read()  # alive until the test closes stdin
"""

TEST = """
import pytest
from userjobs import train

@pytest.mark.reproducible
def test_y(repro):
    repro.check(train, config={"hang_at": 3})
"""


def _owner(tmp: Path, how: str) -> tuple[subprocess.Popen[str], Path, str]:
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER, how], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    folder, pid = proc.stdout.readline().split()
    return proc, Path(folder), pid


@pytest.fixture
def tmp(userjobs: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp dir of this test's own: the sessions' scratch goes there, and only there is cleaned."""
    folder = userjobs.path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _scratch(tmp: Path) -> set[str]:
    # the warm workers' log folder lives as long as this process: not a session's scratch
    return {p.name for p in tmp.glob("pytest-repro-*") if not p.name.startswith("pytest-repro-workers-")}


def test_a_killed_sessions_scratch_is_removed_by_the_next_session_a_live_one_kept(
    userjobs: pytest.Pytester, tmp: Path
) -> None:
    dead_proc, dead, dead_pid = _owner(tmp, "die")
    assert dead_proc.wait(timeout=60) == -signal.SIGKILL and dead.is_dir(), "a killed owner leaves its folder"
    live_proc, live, _ = _owner(tmp, "wait")
    unknown = tmp / "pytest-repro-0ld3r"  # no owner recorded (an older version's): not ours to judge
    unknown.mkdir()
    (unknown / "record.json").write_text("{}")
    userjobs.makepyfile(test_plain="def test_ok():\n    pass\n")
    try:
        result = userjobs.runpytest("--repro")
        out = result.stdout.str()
        assert result.ret == 0
        notes = [line for line in out.splitlines() if "scratch folder" in line]
        assert notes == [
            f"reproducibility: removed 1 scratch folder(s) of killed sessions from {tmp} (2.0 MB): "
            f"{dead.name} (pid {dead_pid})"
        ], out
        assert not dead.exists(), "the dead session's scratch is removed"
        assert (live / "0001-run" / "weights.safetensors").stat().st_size == 2_000_000, "a live one is kept"
        assert (unknown / "record.json").exists(), "a folder without an owner lock is kept"
        assert _scratch(tmp) == {live.name, unknown.name}, "the session removed its own scratch"

        again = userjobs.runpytest("--repro").stdout.str()
        assert "scratch folder" not in again, "nothing more to remove, nothing said"
    finally:
        assert live_proc.stdin is not None
        live_proc.stdin.close()
        live_proc.wait(timeout=60)
    userjobs.runpytest("--repro")
    assert _scratch(tmp) == {unknown.name}, "once its owner has gone, the live one's scratch is removed too"


def test_a_sigkilled_pytest_session_leaves_scratch_that_the_next_session_removes(
    userjobs: pytest.Pytester, tmp: Path
) -> None:
    userjobs.makepyfile(test_x=TEST)
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "--repro", "-p", "no:cacheprovider", "-q"],
        cwd=userjobs.path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(p.name.endswith("-run1") for p in tmp.glob("pytest-repro-*/*")):
        assert proc.poll() is None, "the session ended before its job started"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    left = sorted(p.name for p in tmp.glob("pytest-repro-*"))  # its scratch and its warm worker's log folder
    assert len(left) == 2 and any(name.startswith("pytest-repro-workers-") for name in left), left
    result = userjobs.runpytest("--repro", "-k", "not test_y")
    out = result.stdout.str()
    assert f"removed 2 scratch folder(s) of killed sessions from {tmp}" in out, out
    assert all(f"{name} (pid {proc.pid})" in out for name in left), out
    assert not any((tmp / name).exists() for name in left), "nothing of the killed session is left behind"
