"""Peak memory of a check whose job returns one large float32 tensor, in every process, in one run.

A generated project holds two tests: one whose job returns an N MB float32 tensor (default 200 MB,
like the weights of a small full fine-tune) and one returning a 40-byte tensor (the baseline: what
torch & co. cost in the same process). Each is run with ``pytest --repro`` inside a wrapper that
reports ``getrusage`` peaks: the pytest process itself (RUSAGE_SELF) and, with
``--repro-isolation=spawn`` so that job processes are its waited-for children, the largest job
process (RUSAGE_CHILDREN). Every case runs in a fresh process:

- first run (no reference: records it, 2 runs compared)      -- pytest process, job process
- against the reference (2 runs + the stored reference)      -- pytest process, job process

Printed: peak MB, peak / tensor size (goal: < 3x in every process), and the peak above the baseline
of the same process kind / tensor size.

Usage: python benchmarks/bench_memory.py [--mb 200] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

JOB = """
import torch


def big(ctx):
    g = torch.Generator().manual_seed(ctx.seed)
    return {{"losses": [1.0, 0.5], "weights": {{"w": torch.randn({n}, generator=g)}}}}


def small(ctx):
    g = torch.Generator().manual_seed(ctx.seed)
    return {{"losses": [1.0, 0.5], "weights": {{"w": torch.randn(10, generator=g)}}}}
"""

TESTS = """
import pytest

from jobs import big, small


@pytest.mark.reproducible
def test_big(repro):
    repro.check(big)


@pytest.mark.reproducible
def test_small(repro):
    repro.check(small)
"""

MEASURE = """
import resource, sys, pytest
rc = pytest.main(["--repro", "-q", "-p", "no:cacheprovider", *sys.argv[1:]])
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
print("PEAKS", rc, own, kids)
"""


def peaks(project: Path, test: str, *args: str) -> tuple[int, int]:
    """Run one test in a fresh process; return (pytest process peak MB, largest waited child peak MB)."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, f"test_mem.py::{test}", *args],
        cwd=project,
        capture_output=True,
        text=True,
        check=False,
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("PEAKS")), None)
    if line is None:
        raise SystemExit(f"no result from {test} {args}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    _, rc, own, kids = line.split()
    if rc != "0":
        raise SystemExit(f"{test} {args} failed (exit {rc}):\n{out.stdout[-3000:]}")
    return int(own), int(kids)


def main() -> None:
    """Print peak RSS per process kind for a large-tensor check and a tiny one."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=200, help="size of the job's float32 tensor in MB")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    n = args.mb * 1_000_000 // 4
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        project = Path(tmp)
        (project / "jobs.py").write_text(JOB.format(n=n))
        (project / "test_mem.py").write_text(TESTS)
        (project / "pytest.ini").write_text("[pytest]\nrepro_config_audit = off\nrepro_timeout = 600\n")
        rows: dict[str, dict[str, int]] = {}
        for test in ("test_small", "test_big"):
            first_own, _ = peaks(project, test, "--repro-regen=missing")
            again_own, _ = peaks(project, test)
            # the same two cases with spawned job processes (their peaks become measurable children)
            for folder in (project / "reference_outputs").glob(f"*/{test}"):
                shutil.rmtree(folder)
            first_spawn, first_job = peaks(project, test, "--repro-regen=missing", "--repro-isolation=spawn")
            again_spawn, again_job = peaks(project, test, "--repro-isolation=spawn")
            rows[test] = {
                "pytest, first run (fork)": first_own,
                "pytest, against reference (fork)": again_own,
                "pytest, first run (spawn)": first_spawn,
                "pytest, against reference (spawn)": again_spawn,
                "job process, first run": first_job,
                "job process, against reference": again_job,
            }
    size = n * 4 / 2**20
    print(f"job tensor: {n:,} float32 = {size:.0f} MiB; peaks are ru_maxrss (MiB)\n")
    print(f"| process, case | tiny job | {args.mb} MB job | peak / tensor | above tiny / tensor |")
    print("| --- | --- | --- | --- | --- |")
    for case, big in rows["test_big"].items():
        small = rows["test_small"][case]
        print(f"| {case} | {small} | {big} | {big / size:.2f}x | {(big - small) / size:.2f}x |")
    worst = max(rows["test_big"].values()) / size
    print(f"\nworst process: {worst:.2f}x the tensor (goal < 3x)")
    if args.json:
        args.json.write_text(json.dumps({"tensor_mib": size, "peaks_mib": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
