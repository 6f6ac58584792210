"""Concurrency and kills: writers racing, a reader during a rewrite, xdist regeneration, SIGKILL mid-regen.

REPRO_KILLS (default 5) sets how many times the kill test kills pytest; benchmarks/bench_kill.sh runs it 50+ times.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import env_key

pytestmark = pytest.mark.slow

JOB = """
import os
from pathlib import Path

import torch


def job(ctx):
    version = float(Path(os.environ["REPRO_VERSION_FILE"]).read_text())
    gen = torch.Generator().manual_seed(ctx.seed)
    return {
        "losses": [version, version / 2],
        "metrics": {"version": version},
        "weights": {"w": torch.randn(2_000_000, generator=gen) + version},  # 8 MB: a write takes some ms
    }
"""

TEST = """
import pytest
from killjob import job

@pytest.mark.reproducible
def test_k(repro):
    repro.check(job)
"""


def _project(tmp_path: Path) -> Path:
    (tmp_path / "killjob.py").write_text(textwrap.dedent(JOB))
    (tmp_path / "test_k.py").write_text(TEST)
    (tmp_path / "pytest.ini").write_text("[pytest]\nrepro_timeout = 120\n")
    (tmp_path / "version.txt").write_text("1")
    return tmp_path


def _pytest(root: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "REPRO_VERSION_FILE": str(root / "version.txt"), "PYTHONPATH": str(root)}
    env.pop("CI", None)
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "--repro", "-p", "no:cacheprovider", "-q", *args],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _target(root: Path) -> Path:
    return root / "reference_outputs" / "test_k" / "test_k" / env_key()


def _version(root: Path) -> float:
    from pytest_repro.storage import load_reference

    return load_reference(_target(root)).record.metrics["version"]


def test_two_processes_regenerating_one_reference(tmp_path: Path) -> None:
    root = _project(tmp_path)
    procs = [_pytest(root, "--repro-regen"), _pytest(root, "--repro-regen")]
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert _version(root) == 1.0
    assert not [p for p in _target(root).parent.iterdir() if p.name.startswith(".")], "no staging left behind"


def test_a_reader_sees_the_complete_old_or_new_reference_during_rewrites(tmp_path: Path) -> None:
    """Two writer processes rewrite one reference for 4 s while this process reads it in a loop."""
    import torch

    from pytest_repro.record import Record
    from pytest_repro.staging import write_reference
    from pytest_repro.storage import MissingReferenceError, load_reference
    from pytest_repro.tensorfile import materialize

    target = tmp_path / "refs" / "test" / "cpu"
    write_reference(target, Record(losses=[0.0], metrics={"v": 0.0}, weights={"w": torch.zeros(500_000)}), {}, {})
    writer = textwrap.dedent(
        f"""
        import sys, time, torch
        from pathlib import Path
        from pytest_repro.record import Record
        from pytest_repro.staging import write_reference
        v = float(sys.argv[1]); end = time.monotonic() + 4; n = 0
        while time.monotonic() < end:
            write_reference(Path({str(target)!r}), Record(losses=[v], metrics={{"v": v}},
                            weights={{"w": torch.full((500_000,), v)}}), {{}}, {{}})
            n += 1
        print(n)
        """
    )
    writers = [subprocess.Popen([sys.executable, "-c", writer, str(v)], stdout=subprocess.PIPE) for v in (1, 2)]
    reads, bad = 0, []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(w.poll() is None for w in writers):
        try:
            ref = load_reference(target)
        except (MissingReferenceError, OSError, ValueError) as exc:
            bad.append(repr(exc))
            continue
        v = ref.record.metrics["v"]
        if not (ref.record.losses == [v] and bool((materialize(ref.record.weights["w"]) == v).all())):
            bad.append(f"mixed reference: metrics {v}, losses {ref.record.losses}")
        reads += 1
    writes = [int(w.communicate(timeout=60)[0] or 0) for w in writers]
    assert all(w.returncode == 0 for w in writers)
    assert not bad, f"{len(bad)} bad reads of {reads}: {bad[:3]}"
    assert reads > 20 and min(writes) > 5, (reads, writes)
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]


def test_xdist_regeneration_writes_every_reference(heavy_modules: None, pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile(killjob=textwrap.dedent(JOB))
    pytester.makepyfile(
        test_x="\n".join(
            [
                "import pytest",
                "from killjob import job",
                "@pytest.mark.reproducible",
                "@pytest.mark.parametrize('i', range(4))",
                "def test_k(repro, i):",
                "    repro.check(job, config={'i': i})",
            ]
        )
    )
    (pytester.path / "version.txt").write_text("3")
    pytester.makeini("[pytest]\nrepro_timeout = 120\nrepro_config_audit = off\n")
    os.environ["REPRO_VERSION_FILE"] = str(pytester.path / "version.txt")
    try:
        result = pytester.runpytest_subprocess("--repro", "--repro-regen", "-n", "2", "--repro-report=r.json")
    finally:
        del os.environ["REPRO_VERSION_FILE"]
    assert result.ret == 0, result.stdout.str()
    report = json.loads((pytester.path / "r.json").read_text())
    assert sorted(t["verdict"] for t in report["tests"]) == ["written"] * 4
    from pytest_repro.storage import load_reference

    for t in report["tests"]:
        assert load_reference(Path(t["path"])).record.metrics["version"] == 3.0


def test_sigkill_during_regeneration_never_loses_the_reference(tmp_path: Path) -> None:
    """Kill pytest at random moments of --repro-regen (half of them while the reference is being written)."""
    kills = int(os.environ.get("REPRO_KILLS", "5"))
    root = _project(tmp_path)
    first = _pytest(root, "--repro-regen")
    assert first.wait(timeout=300) == 0
    rng = random.Random(1234)
    outcomes = {"old": 0, "new": 0, "corrupt": 0, "missing": 0}
    staging_hits = 0
    old = 1.0
    for i in range(kills):
        new = old + 1
        (root / "version.txt").write_text(str(new))
        proc = _pytest(root, "--repro-regen")
        targeted = i % 2 == 0
        started = time.monotonic()
        if targeted:  # wait for the staging folder to appear, then kill within the write
            while proc.poll() is None and time.monotonic() - started < 60:
                if any(p.name.startswith(f".{env_key()}.new-") for p in _target(root).parent.iterdir()):
                    staging_hits += 1
                    time.sleep(rng.uniform(0, 0.03))
                    break
                time.sleep(0.001)
        else:
            time.sleep(rng.uniform(0.5, 6.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        from pytest_repro.record import CorruptRecordError
        from pytest_repro.storage import MissingReferenceError

        try:
            version = _version(root)
        except MissingReferenceError:
            outcomes["missing"] += 1
            continue
        except CorruptRecordError:
            outcomes["corrupt"] += 1
            continue
        outcomes["old" if version == old else "new" if version == new else "corrupt"] += 1
        if version == new:
            old = new
    print(f"kills: {kills}, staging seen before {staging_hits} of them, outcomes: {outcomes}")
    assert outcomes["corrupt"] == 0 and outcomes["missing"] == 0, outcomes
    assert not [p for p in _target(root).parent.iterdir() if p.name.startswith(".")], "stale folders removed"
