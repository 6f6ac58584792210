"""Side-by-side timings and extra peak memory of `compare_tensor` / `section_max_abs` on large tensors.

A float32 tensor of --mb MB (default 200) is compared against
  equal:     an identical copy,
  one:       a copy with one element (in the middle) changed,
  perturbed: a copy where every element differs by ~1 ulp (within the "close" tolerance),
with `numpy.array_equal` on the numpy views as the yardstick (median of --repeats, default 5).
"bitwise (files)" / "close (files)" compare the same tensors as a check does: saved as records, loaded
(sha256-verified, nothing held in memory) and read chunk by chunk from the (page-cached) files.
Extra peak memory is measured in a fresh subprocess per (case, method): build the tensors, warm up
on a tiny tensor, reset the peak RSS (/proc/self/clear_refs), run once, report VmHWM minus VmRSS before.
tracemalloc would not see torch's allocations.

Goals: bitwise <= 1.5x numpy.array_equal and close <= 3x on equal tensors; <= 64 MB extra memory.

Usage: python benchmarks/bench_compare.py [--mb 200] [--repeats 5] [--threads N (default: torch's)]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

CASES = ("equal", "one", "perturbed")
METHODS = ("numpy.array_equal", "bitwise", "close", "section_max_abs", "bitwise (files)", "close (files)")
_FILES: dict[int, Any] = {}  # id(tensor) -> its record loaded from a temporary folder


def build(mb: int, case: str) -> tuple[Any, Any]:
    import torch

    n = mb * 1024 * 1024 // 4
    expected = torch.randn(n, generator=torch.Generator().manual_seed(0))
    actual = torch.nextafter(expected, torch.tensor(float("inf"))) if case == "perturbed" else expected.clone()
    if case == "one":
        actual[n // 2] += 1.0
    return expected, actual


def operation(method: str, expected: Any, actual: Any) -> Callable[[], object]:
    import numpy

    from pytest_repro._judge.compare import section_max_abs
    from pytest_repro._judge.tensor_compare import compare_tensor
    from pytest_repro._judge.tolerances import BITWISE, CLOSE
    from pytest_repro.record import Record

    if method == "numpy.array_equal":
        en, an = expected.numpy(), actual.numpy()
        return lambda: numpy.array_equal(en, an)
    if method in ("bitwise", "close"):
        tol = BITWISE if method == "bitwise" else CLOSE
        return lambda: compare_tensor("weights", "w", expected, actual, tol)
    if method.endswith("(files)"):
        tol = BITWISE if method.startswith("bitwise") else CLOSE
        se, sa = stored(expected), stored(actual)
        return lambda: compare_tensor("weights", "w", se, sa, tol)
    re, ra = Record(weights={"w": expected}), Record(weights={"w": actual})
    return lambda: section_max_abs(re, ra)


def stored(t: Any) -> Any:
    """The tensor as a check sees a run's: written as a record, loaded back (read from the file on demand)."""
    import tempfile
    from pathlib import Path

    from pytest_repro.record import Record, load_record, save_record

    if id(t) not in _FILES:
        folder = Path(tempfile.mkdtemp(prefix="bench-compare-"))
        save_record(Record(weights={"w": t}), folder)
        _FILES[id(t)] = load_record(folder)
        shutil.rmtree(folder)  # the open handle keeps the data readable
    return _FILES[id(t)].weights["w"]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(mb: int, case: str, method: str) -> float:
    """Run one operation in this (fresh) process; return its extra peak RSS in MB."""
    import torch

    expected, actual = build(mb, case)
    operation(method, torch.randn(64), torch.randn(64))()  # warm up kernels and imports
    op = operation(method, expected, actual)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    before = _status_kb("VmRSS")
    op()
    return (_status_kb("VmHWM") - before) / 1024


def memory_in_subprocess(mb: int, threads: int, case: str, method: str) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--mb", str(mb), "--threads", str(threads), "--_memory", case, method],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(out.strip().splitlines()[-1])


def median_ms(op: Callable[[], object], repeats: int) -> float:
    op()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        op()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--_memory", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory:
        print(measure_memory(args.mb, *args._memory))
        return

    import pytest_repro._judge.compare

    print(f"{args.mb} MB float32 tensor, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"compare module: {pytest_repro._judge.compare.__file__}")
    print(f"{'case':<10} {'method':<18} {'median ms':>10} {'x array_equal':>14} {'extra peak MB':>14}")
    for case in CASES:
        expected, actual = build(args.mb, case)
        base = 0.0
        for method in METHODS:
            ms = median_ms(operation(method, expected, actual), args.repeats)
            base = base or ms
            mem = memory_in_subprocess(args.mb, args.threads, case, method)
            print(f"{case:<10} {method:<18} {ms:>10.1f} {ms / base:>14.2f} {mem:>14.1f}", flush=True)
        del expected, actual
        _FILES.clear()
        gc.collect()


if __name__ == "__main__":
    main()
