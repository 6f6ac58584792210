"""Cost of where-it-starts digests (issue 21), side by side on the built-in LoRA job:

- a passing check against a reference with ``digests.json`` vs the same reference without it;
- ``--repro-regen`` of an unchanged reference (UNCHANGED: run 1 traced for its first 2 steps, nothing
  rewritten) against the plain check's time.

    python benchmarks/bench_locate.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST = "tests/test_reproducible.py::test_lora_is_reproducible"


def session(root: Path, *extra: str) -> float:
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "--repro", TEST, "-q", "-p", "no:cacheprovider", *extra]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"pytest failed in {root}:\n{done.stdout[-3000:]}")
    return time.perf_counter() - started


def project(root: Path, digests: bool) -> Path:
    shutil.copytree(REPO / "fixtures", root / "fixtures")
    (root / "tests").mkdir()
    shutil.copy(REPO / "tests" / "test_reproducible.py", root / "tests")
    (root / "pytest.ini").write_text("[pytest]\nrepro_timeout = 300\n")
    session(root, "--repro-regen=missing")
    if not digests:
        for f in (root / "reference_outputs").rglob("digests.json"):
            f.unlink()
    return root


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with_d, without = project(Path(tmp) / "with", True), project(Path(tmp) / "without", False)
        a, b = [], []
        for _ in range(args.repeats):
            b.append(session(without))
            a.append(session(with_d))
        regen = [session(with_d, "--repro-regen") for _ in range(args.repeats)]
    print(f"check, reference without digests.json: {min(b):.2f}-{max(b):.2f} s (median {statistics.median(b):.2f})")
    print(f"check, reference with digests.json:    {min(a):.2f}-{max(a):.2f} s (median {statistics.median(a):.2f})")
    print(f"--repro-regen (run 1 traced, 2 steps): {min(regen):.2f}-{max(regen):.2f} s")


if __name__ == "__main__":
    main()
