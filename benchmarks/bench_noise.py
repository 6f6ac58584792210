"""Cost of the noise floor: one built-in LoRA check against this environment's reference (bitwise, no floor)
vs the same check against only the H200's reference (noise-aware: 2 perturbed runs), side by side.

    python benchmarks/bench_noise.py [--repeats 3]

Each figure is the wall time of a whole `pytest --repro` session in a fresh temporary project; the two
kinds alternate so that both see the same machine load. Also prints the floor's own seconds (JSON report).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST = "tests/test_reproducible.py::test_lora_is_reproducible"


def project(root: Path, gpu: bool) -> Path:
    """A project with the repo's reproducibility tests; references: the H200's (gpu) or recorded here."""
    shutil.copytree(REPO / "fixtures", root / "fixtures")
    (root / "tests").mkdir()
    shutil.copy(REPO / "tests" / "test_reproducible.py", root / "tests")
    (root / "pytest.ini").write_text("[pytest]\nrepro_timeout = 300\n")
    if gpu:
        with tarfile.open(REPO / "tests" / "data" / "cuda-refs.tgz") as tar:
            tar.extractall(root / "reference_outputs", filter="data")
    else:
        session(root, "--repro-regen=missing")
    return root


def session(root: Path, *extra: str) -> tuple[float, dict]:
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "--repro", TEST, "-q", "-p", "no:cacheprovider", "--repro-report=r.json"]
    done = subprocess.run([*cmd, *extra], cwd=root, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"pytest failed in {root}:\n{done.stdout[-3000:]}")
    return seconds, json.loads((root / "r.json").read_text())["tests"][0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        here, there = project(Path(tmp) / "here", False), project(Path(tmp) / "h200", True)
        plain, noisy, floor = [], [], []
        for _ in range(args.repeats):
            s, t = session(here)
            assert t["verdict"] == "passed", t["verdict"]
            plain.append(s)
            s, t = session(there)
            assert t["verdict"] == "passed-cross-env", t["verdict"]
            noisy.append(s)
            floor.append(t["noise"]["floor"]["seconds"])
    p, n = statistics.median(plain), statistics.median(noisy)
    print(f"bitwise vs this environment's reference: {min(plain):.2f}-{max(plain):.2f} s (median {p:.2f})")
    print(f"noise-aware vs the H200 reference:      {min(noisy):.2f}-{max(noisy):.2f} s (median {n:.2f})")
    print(f"extra per check: {n - p:+.2f} s (median); the floor's own runs: {min(floor):.2f}-{max(floor):.2f} s")


if __name__ == "__main__":
    main()
