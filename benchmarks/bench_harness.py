"""Side-by-side timings of the harness, measured in one run.

(a) `pytest --repro` on one built-in-job test (2 runs + reference check) vs the same job run as two
    cold `python` processes one after the other (goal: ratio <= 0.6).
(b) `pytest --collect-only` of a generated 500-test suite with and without the plugin (goal: <= 5% more).
(c) `collect_manifest()` with torch already imported (goal: < 300 ms).
(d) the built-in LoRA job's wall time in deterministic vs default mode on the same device.
(e) four built-in-job tests under pytest-xdist `-n 2` vs serial.

Usage: python benchmarks/bench_harness.py [--repeats N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TEST_ID = "tests/test_reproducible.py::test_lora_is_reproducible"


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return elapsed


def cold_spec(workdir: Path, deterministic: bool = True) -> Path:
    from pytest_repro.context import JobRef, RunSpec
    from pytest_repro.seeding import derive_seed

    config = yaml.safe_load((ROOT / "fixtures" / "tiny_lora.yaml").read_text())
    spec = RunSpec(
        job=JobRef("pytest_repro.jobs", "lora_finetune"),
        config=config,
        seed=derive_seed(0, TEST_ID),
        device="cpu",
        deterministic=True,
        run_index=0,
        workdir=str(workdir),
        cwd=str(ROOT),
        config_dir=str(ROOT / "fixtures"),
    )
    path = workdir.parent / f"{workdir.name}.json"
    path.write_text(spec.to_json())
    return path


def bench_runs(repeats: int) -> dict[str, float]:
    pytest_cmd = [sys.executable, "-m", "pytest", "--repro", "-q", "-p", "no:cacheprovider", TEST_ID]
    # The dev environment also has hypothesis' pytest plugin, which imports hypothesis (~1 s) at the
    # end of every session; time pytest with and without it so the plugin's own cost is visible.
    bare_cmd = [*pytest_cmd[:-1], "-p", "no:hypothesispytest", TEST_ID]
    env = dict(
        os.environ,
        PYTHONHASHSEED="0",
        CUBLAS_WORKSPACE_CONFIG=":4096:8",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )  # as the harness runs jobs (repro_threads = 1)
    harness, bare, cold = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            harness.append(timed(pytest_cmd, ROOT))
            bare.append(timed(bare_cmd, ROOT))
            total = 0.0
            for i in range(2):
                spec = cold_spec(Path(tmp) / f"r{r}-run{i}")
                total += timed([sys.executable, "-m", "pytest_repro._exec.child", str(spec)], ROOT, env)
            cold.append(total)
    h, b, c = statistics.median(harness), statistics.median(bare), statistics.median(cold)
    return {
        "pytest_repro_s": h,
        "pytest_repro_no_hypothesis_s": b,
        "two_cold_processes_s": c,
        "ratio": h / c,
        "ratio_no_hypothesis": b / c,
    }


def make_suite(folder: Path, files: int = 50, per_file: int = 10) -> None:
    for f in range(files):
        lines = ["import pytest", ""]
        for t in range(per_file):
            if t % 5 == 0:
                lines += ["@pytest.mark.reproducible"]
            lines += [f"def test_{t}():", "    assert True", ""]
        (folder / f"test_mod{f}.py").write_text("\n".join(lines))
    (folder / "pytest.ini").write_text("[pytest]\nmarkers =\n    reproducible: stand-in when the plugin is off\n")


def bench_collection(repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        suite = Path(tmp)
        make_suite(suite)
        base = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
        without, with_plugin = [], []
        timed(base, suite)  # warm the file cache
        for _ in range(repeats):  # interleaved, so machine noise hits both alike
            without.append(timed([*base, "-p", "no:repro"], suite))
            with_plugin.append(timed(base, suite))
    w, p = statistics.median(without), statistics.median(with_plugin)
    return {"without_plugin_s": w, "with_plugin_s": p, "ratio": p / w, "tests": 500}


def bench_determinism(repeats: int) -> dict[str, float]:
    """The LoRA job's own wall time (imports excluded) in deterministic vs default mode, same device."""
    times: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for det in (True, False):  # interleaved
                workdir = Path(tmp) / f"{'det' if det else 'default'}-{r}"
                spec = cold_spec(workdir, deterministic=det)
                env = dict(os.environ, PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
                if det:
                    env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
                timed([sys.executable, "-m", "pytest_repro._exec.child", str(spec)], ROOT, env)
                record = json.loads((workdir / "record" / "record.json").read_text())
                times[det].append(record["meta"]["wall_s"])
    d, n = statistics.median(times[True]), statistics.median(times[False])
    return {"deterministic_s": d, "default_s": n, "overhead": d / n - 1}


XDIST_TESTS = """
import pytest
from pytest_repro.jobs import lora_finetune

@pytest.mark.reproducible
@pytest.mark.parametrize("lr", [0.001, 0.002, 0.003, 0.004])
def test_lora(repro, lr):
    repro.check(lora_finetune, config={"train": {"lr": lr, "steps": 32}, "data": DATA})
"""


def bench_xdist(repeats: int) -> dict[str, float]:
    """Four built-in-job tests with pytest-xdist -n 2 vs serial, on this machine."""
    import shutil

    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        for name in ("corpus.jsonl", "splits_v1.json", "tokenizer.json"):
            shutil.copy(ROOT / "fixtures" / name, project / name)
        data = {
            k: str(project / v)
            for k, v in (("corpus", "corpus.jsonl"), ("splits", "splits_v1.json"), ("tokenizer", "tokenizer.json"))
        }
        (project / "test_four.py").write_text(XDIST_TESTS.replace("DATA", repr(data)))
        (project / "pytest.ini").write_text("[pytest]\n")
        base = [sys.executable, "-m", "pytest", "--repro", "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest"]
        timed([*base, "--repro-regen"], project)
        serial, parallel = [], []
        for _ in range(repeats):
            serial.append(timed([*base, "-n", "0"], project))
            parallel.append(timed([*base, "-n", "2"], project))
    s, p = statistics.median(serial), statistics.median(parallel)
    return {"serial_s": s, "xdist_2_s": p, "ratio": p / s}


def bench_manifest(repeats: int) -> dict[str, float]:
    import torch  # noqa: F401 - the target is "with torch already imported"

    from pytest_repro.manifest import collect_manifest

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        collect_manifest(ROOT)
        times.append(time.perf_counter() - start)
    return {"collect_manifest_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = bench_runs(args.repeats)
    print(f"(a) 2 cold python processes running the LoRA job: {runs['two_cold_processes_s']:.2f} s")
    print(
        f"    pytest --repro, 1 LoRA test x 2 runs:        {runs['pytest_repro_s']:.2f} s | "
        f"ratio {runs['ratio']:.2f} (goal <= 0.60)"
    )
    print(
        f"    same, -p no:hypothesispytest:                {runs['pytest_repro_no_hypothesis_s']:.2f} s | "
        f"ratio {runs['ratio_no_hypothesis']:.2f}"
    )
    coll = bench_collection(max(args.repeats, 10))
    print(
        f"(b) collect 500 tests: without plugin {coll['without_plugin_s']:.3f} s | with plugin "
        f"{coll['with_plugin_s']:.3f} s | ratio {coll['ratio']:.3f} (goal <= 1.05)"
    )
    det = bench_determinism(max(args.repeats, 5))
    print(
        f"(d) LoRA job on cpu, deterministic {det['deterministic_s']:.3f} s vs default {det['default_s']:.3f} s: "
        f"overhead {det['overhead'] * 100:+.1f}%"
    )
    xd = bench_xdist(max(args.repeats, 2))
    print(
        f"(e) 4 LoRA tests: serial {xd['serial_s']:.2f} s | pytest-xdist -n 2 {xd['xdist_2_s']:.2f} s | "
        f"ratio {xd['ratio']:.2f} ({os.cpu_count()} cores)"
    )
    man = bench_manifest(max(args.repeats, 10))
    print(f"(c) collect_manifest() with torch imported: {man['collect_manifest_s'] * 1000:.0f} ms (goal < 300 ms)")
    if args.json:
        results = {"runs": runs, "collection": coll, "determinism": det, "xdist": xd, "manifest": man}
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
