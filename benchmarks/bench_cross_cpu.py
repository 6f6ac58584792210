"""How far do the built-in LoRA jobs move when the CPU kernels change? A measured basis for cross-CPU tolerances.

The committed CPU references (reference_outputs/tests/test_reproducible/*/cpu*/) were recorded on an AMD EPYC
with torch's AVX-512 kernels; another CPU family (e.g. an Intel Xeon) picks other vectorised kernels and
other MKL code paths, and the results differ in the last bits. Without another CPU we use proxies that
change exactly those things on this machine, each in a fresh process (the variables are read at start-up):

* ``ATEN_CPU_CAPABILITY`` = default / avx2 / avx512 (or unset: the machine's own choice): which
  vectorised ATen kernels run (elementwise ops, reductions, softmax, the bf16/fp16 gemm fallbacks).
* ``OMP_NUM_THREADS`` (and MKL/OpenBLAS) = 1 or 2: how reductions are split (the harness pins 1).
* ``MKL_CBWR=COMPATIBLE``: MKL's conditional-numerical-reproducibility mode, which runs other sgemm
  kernels (the only MKL knob that changed a float32 matmul here; MKL_ENABLE_INSTRUCTIONS and
  ONEDNN_MAX_CPU_ISA changed nothing on this machine).

Every run is seeded the way the harness seeds it (``runner.execute``: PYTHONHASHSEED in the environment,
``seed_everything(seed, deterministic=True)``, the test's own seed read from the committed reference's
``meta.seed``), its record is saved (safetensors + JSON) under ``--out``, and every setting is compared
with the committed reference, with this machine's unmodified run, and with every other setting:
max abs / max rel difference, and max |diff| / (eps * max|reference tensor|) ("scale ulps").
The table and conclusions go to stdout and to ``--md`` (default benchmarks/results-cross-cpu.md).

Usage: python benchmarks/bench_cross_cpu.py [--parallel 2] [--out DIR] [--md PATH] [--json PATH]
       [--reuse]   (compare the records already under --out instead of running again)
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REFS = ROOT / "reference_outputs" / "tests" / "test_reproducible"
CONFIG = ROOT / "fixtures" / "tiny_lora.yaml"

# name -> (reference folder, job, dtype override or None)
JOBS: dict[str, tuple[str, str, str | None]] = {
    "lora float32": ("test_lora_is_reproducible", "pytest_repro.jobs:lora_finetune", None),
    "lora bfloat16": (
        "test_lora_half_precision_is_reproducible_bfloat16-cfb348c5",
        "pytest_repro.jobs:lora_finetune",
        "bfloat16",
    ),
    "lora float16": (
        "test_lora_half_precision_is_reproducible_float16-cd2b5b9e",
        "pytest_repro.jobs:lora_finetune",
        "float16",
    ),
    "trainer float32": ("test_lora_trainer_is_reproducible", "pytest_repro.jobs:lora_finetune_trainer", None),
}

# name -> (ATEN_CPU_CAPABILITY or None for unset, threads, extra env). "native/t1" is how the references
# were recorded (this machine's own capability, 1 thread) and is the local baseline.
BASELINE = "native/t1"
SETTINGS: dict[str, tuple[str | None, int, dict[str, str]]] = {
    "native/t1": (None, 1, {}),
    "avx512/t1": ("avx512", 1, {}),
    "avx2/t1": ("avx2", 1, {}),
    "default/t1": ("default", 1, {}),
    "avx512/t2": ("avx512", 2, {}),
    "avx2/t2": ("avx2", 2, {}),
    "default/t2": ("default", 2, {}),
    "native/t1+cbwr": (None, 1, {"MKL_CBWR": "COMPATIBLE"}),
    "avx2/t1+cbwr": ("avx2", 1, {"MKL_CBWR": "COMPATIBLE"}),
}
REFERENCE = "reference"

EPS = {"float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10, "float64": 2.0**-52}
# torch.testing.assert_close defaults: dtype -> (rtol, atol). pytest-repro's "close" uses the same table,
# keyed by the *stored* dtype (float32 for every tensor here) and float32 for losses/metrics.
CLOSE = {"float32": (1.3e-6, 1e-5), "bfloat16": (1.6e-2, 1e-5), "float16": (1e-3, 1e-5)}
# The tolerances this benchmark recommends (rtol, atol), by model dtype and by kind of value; the
# numbers are chosen from the measured envelope (see the results file) and checked against it here.
RECOMMENDED: dict[str, dict[str, tuple[float, float]]] = {
    "float32": {"tensors": (1.3e-6, 1e-5), "scalars": (1.3e-6, 1e-5)},  # = torch's float32 defaults
    "bfloat16": {"tensors": (1.6e-2, 5e-2), "scalars": (1e-3, 1e-5)},
    "float16": {"tensors": (1e-3, 3e-2), "scalars": (1e-3, 1e-5)},
}
# Enough when only SIMD-kernel variation must pass (the envelope without the scalar kernels): tensors only.
RECOMMENDED_SIMD: dict[str, tuple[float, float]] = {
    "float32": (1.3e-6, 1e-5),
    "bfloat16": (1.6e-2, 3e-2),
    "float16": (1e-3, 4e-3),
}
# Settings that use the scalar (non-SIMD) ATen kernels: no x86-64 CPU of interest runs them, so the
# envelope is also shown without them ("SIMD only": what another AVX2/AVX-512 CPU can differ by).
SCALAR_KERNELS = {name for name, (cap, _, _) in SETTINGS.items() if cap == "default"}


# ---------------------------------------------------------------------------------------- child side


def child(spec_path: str) -> int:
    """Run one job in this fresh process as runner.execute() does, and save its record."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    os.chdir(ROOT)
    import torch

    from pytest_repro.record import normalize_result, save_record
    from pytest_repro.seeding import seed_everything

    try:
        from pytest_repro import JobContext
    except ImportError:  # the package's public name has moved between modules over time
        from pytest_repro.context import JobContext  # type: ignore[no-redef]

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        torch.set_num_threads(int(threads))
    seed_everything(spec["seed"], deterministic=True, transformers=False)
    module, _, name = spec["job"].partition(":")
    job = getattr(importlib.import_module(module), name)
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        transformers.set_seed(spec["seed"])
    workdir = Path(spec["workdir"])
    (workdir / "job").mkdir(parents=True, exist_ok=True)
    ctx = JobContext(
        seed=spec["seed"],
        device="cpu",
        config=spec["config"],
        workdir=workdir / "job",
        config_dir=Path(spec["config_dir"]) if spec["config_dir"] else None,
    )
    started = time.perf_counter()
    result = job(ctx)
    meta = {
        "seed": spec["seed"],
        "job": spec["job"],
        "setting": spec["setting"],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "MKL_CBWR": os.environ.get("MKL_CBWR"),
        "wall_s": round(time.perf_counter() - started, 3),
        "dtype": spec["config"].get("dtype", "float32"),
    }
    save_record(normalize_result(result, meta), workdir / "record")
    return 0


# --------------------------------------------------------------------------------------- parent side


def reference_dir(test_dir: str) -> Path:
    """The committed CPU reference of a test: ``cpu/`` or a CPU-family folder such as ``cpu-amd-avx512/``."""
    base = REFS / test_dir
    found = sorted(p.parent for p in base.glob("cpu*/record.json"))
    found.sort(key=lambda p: (p.name != "cpu-amd-avx512", p.name != "cpu", p.name))
    if not found:
        raise SystemExit(f"no CPU reference under {base}")
    return found[0]


def job_config(dtype: str | None) -> tuple[dict[str, Any], str | None]:
    """The config and config folder the tests pass (tests/test_reproducible.py)."""
    import yaml

    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    if dtype is None:
        return config, str(CONFIG.parent)
    config["dtype"] = dtype
    config.pop("data")  # the defaults: the same data, shipped with the package
    return config, None


def run_one(job_name: str, setting: str, out: Path) -> tuple[str, str, float]:
    from pytest_repro.seeding import determinism_env

    ref_dir, job, dtype = JOBS[job_name]
    ref_meta = json.loads((reference_dir(ref_dir) / "record.json").read_text(encoding="utf-8"))["meta"]
    config, config_dir = job_config(dtype)
    workdir = out / job_name.replace(" ", "-") / setting.replace("/", "-")
    workdir.mkdir(parents=True, exist_ok=True)
    spec = {
        "job": job,
        "seed": ref_meta["seed"],
        "config": config,
        "config_dir": config_dir,
        "workdir": str(workdir),
        "setting": setting,
    }
    (workdir / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    capability, threads, extra = SETTINGS[setting]
    env = determinism_env(True, int(ref_meta["flags"]["PYTHONHASHSEED"]))
    for key in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA"):
        env.pop(key, None)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)})
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    env.update(extra)
    started = time.perf_counter()
    with open(workdir / "output.log", "wb") as log:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(workdir / "spec.json")],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    if proc.returncode != 0:
        raise SystemExit(f"{job_name} / {setting} failed; see {workdir / 'output.log'}")
    return job_name, setting, time.perf_counter() - started


def run_all(out: Path, parallel: int) -> None:
    one_thread = [(j, s) for j in JOBS for s in SETTINGS if SETTINGS[s][1] == 1]
    more = [(j, s) for j in JOBS for s in SETTINGS if SETTINGS[s][1] > 1]
    started = time.perf_counter()
    # 1-thread runs side by side; multi-thread runs one at a time (OpenMP spin-waits under oversubscription).
    for batch, workers in ((one_thread, parallel), (more, 1)):
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for job_name, setting, wall in pool.map(lambda js: run_one(js[0], js[1], out), batch):
                print(f"  ran {job_name:16s} {setting:15s} {wall:5.1f} s", flush=True)
    print(f"all runs: {time.perf_counter() - started:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------ comparing


def load_all(out: Path) -> dict[str, dict[str, Any]]:
    from pytest_repro.record import load_record, user_view

    records: dict[str, dict[str, Any]] = {}
    for job_name, (ref_dir, _, _) in JOBS.items():
        records[job_name] = {REFERENCE: user_view(load_record(reference_dir(ref_dir)))}
        for setting in SETTINGS:
            folder = out / job_name.replace(" ", "-") / setting.replace("/", "-") / "record"
            records[job_name][setting] = user_view(load_record(folder))
    return records


def tensor_stats(exp: Any, act: Any, eps: float, tol: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Differences of one tensor (or scalar trace) against the expected one; tol: name -> (rtol, atol)."""
    import torch

    e = exp.reshape(-1).to(torch.float64)
    a = act.reshape(-1).to(torch.float64)
    d = (a - e).abs()
    nz = e != 0
    rel = float((d[nz] / e[nz].abs()).max()) if bool(nz.any()) else 0.0
    if bool((d[~nz] > 0).any()):
        rel = math.inf
    scale = float(e.abs().max())
    stats = {
        "bitwise": bool(torch.equal(exp.contiguous().view(torch.uint8), act.contiguous().view(torch.uint8)))
        if exp.dtype == act.dtype and exp.shape == act.shape
        else False,
        "n_diff": int((d > 0).sum()),
        "numel": int(e.numel()),
        "max_abs": float(d.max()) if d.numel() else 0.0,
        "max_rel": rel,
        "ulps": float(d.max()) / (eps * scale) if scale > 0 else (0.0 if float(d.max()) == 0 else math.inf),
    }
    for name, (rtol, atol) in tol.items():  # worst |d| / allowed: <= 1 passes, its inverse is the margin
        allowed = atol + rtol * e.abs()
        ratio = torch.where(d == 0, torch.zeros_like(d), d / allowed)
        stats[f"ratio:{name}"] = float(ratio.max()) if ratio.numel() else 0.0
    return stats


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Worst case over several tensors of one section."""
    if not parts:
        return {}
    out: dict[str, Any] = {"bitwise": all(p["bitwise"] for p in parts)}
    for key in parts[0]:
        if key == "bitwise":
            continue
        out[key] = sum(p[key] for p in parts) if key in ("n_diff", "numel") else max(p[key] for p in parts)
    return out


def compare(exp: Any, act: Any, model_dtype: str) -> dict[str, Any]:
    """Per section: worst differences, with ulps in the model dtype's eps and ratios to the tolerances."""
    import torch

    eps = EPS[model_dtype]
    tensor_tol = {"close": CLOSE["float32"], "torch-default": CLOSE[model_dtype]}
    tensor_tol["recommended"] = RECOMMENDED[model_dtype]["tensors"]
    tensor_tol["simd"] = RECOMMENDED_SIMD[model_dtype]
    scalar_tol = {"close": CLOSE["float32"], "torch-default": CLOSE[model_dtype]}
    scalar_tol["recommended"] = RECOMMENDED[model_dtype]["scalars"]
    scalar_tol["simd"] = RECOMMENDED[model_dtype]["scalars"]
    result: dict[str, Any] = {}
    for section in ("weights", "outputs"):
        ea, aa = getattr(exp, section), getattr(act, section)
        result[section] = merge([tensor_stats(ea[k], aa[k], eps, tensor_tol) for k in ea])
    e = torch.tensor(exp.losses, dtype=torch.float64)
    a = torch.tensor(act.losses, dtype=torch.float64)
    result["losses"] = tensor_stats(e, a, eps, scalar_tol)
    d = (a - e).abs()
    result["losses"]["per_step_abs"] = d.tolist()
    result["losses"]["per_step_rel"] = (d / e.abs()).tolist()
    diff_steps = torch.nonzero(d > 0)
    result["losses"]["first_diff_step"] = int(diff_steps[0, 0]) if diff_steps.numel() else None
    result["metrics"] = merge(
        [
            tensor_stats(torch.tensor([exp.metrics[k]]), torch.tensor([act.metrics[k]]), eps, scalar_tol)
            for k in exp.metrics
        ]
    )
    result["metrics"]["per_key_abs"] = {k: abs(act.metrics[k] - exp.metrics[k]) for k in exp.metrics}
    result["metrics"]["per_key_rel"] = {
        k: abs(act.metrics[k] - exp.metrics[k]) / abs(exp.metrics[k]) for k in exp.metrics
    }
    return result


def record_bitwise(a: Any, b: Any) -> bool:
    import struct

    import torch

    def same_tensors(x: dict[str, Any], y: dict[str, Any]) -> bool:
        return x.keys() == y.keys() and all(
            x[k].dtype == y[k].dtype
            and x[k].shape == y[k].shape
            and torch.equal(x[k].contiguous().view(torch.uint8), y[k].contiguous().view(torch.uint8))
            for k in x
        )

    def same_floats(x: list[float], y: list[float]) -> bool:
        return len(x) == len(y) and all(struct.pack("<d", p) == struct.pack("<d", q) for p, q in zip(x, y, strict=True))

    return (
        same_floats(a.losses, b.losses)
        and a.metrics.keys() == b.metrics.keys()
        and same_floats([a.metrics[k] for k in a.metrics], [b.metrics[k] for k in a.metrics])
        and same_tensors(a.weights, b.weights)
        and same_tensors(a.outputs, b.outputs)
    )


def bitwise_classes(recs: dict[str, Any]) -> list[list[str]]:
    classes: list[list[str]] = []
    for name, rec in recs.items():
        for cls in classes:
            if record_bitwise(recs[cls[0]], rec):
                cls.append(name)
                break
        else:
            classes.append([name])
    return classes


def analyse(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for job_name, recs in records.items():
        dtype = JOBS[job_name][2] or "float32"
        names = list(recs)
        pairs = {}
        for i, x in enumerate(names):
            for y in names[i + 1 :]:
                pairs[f"{y} vs {x}"] = compare(recs[x], recs[y], dtype)
        results[job_name] = {
            "dtype": dtype,
            "vs_reference": {s: compare(recs[REFERENCE], recs[s], dtype) for s in SETTINGS},
            "vs_baseline": {s: compare(recs[BASELINE], recs[s], dtype) for s in SETTINGS if s != BASELINE},
            "pairs": pairs,
            "bitwise_classes": bitwise_classes(recs),
            "wall_s": {s: recs[s].meta.get("wall_s") for s in SETTINGS},
            "capability": {s: recs[s].meta.get("cpu_capability") for s in SETTINGS},
        }
    return results


# ------------------------------------------------------------------------------------------ reporting


def g(x: float, digits: int = 2) -> str:
    if x == 0:
        return "0"
    if math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}"


def cell(stats: dict[str, Any]) -> str:
    if stats["bitwise"]:
        return "="
    return f"{g(stats['max_abs'])} ({g(stats['ulps'], 2)})"


def envelope(results: dict[str, Any], simd_only: bool = False) -> dict[tuple[str, str], dict[str, Any]]:
    """Worst case per (model dtype, section) over every pair of records (settings and the reference)."""
    env: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for res in results.values():
        for pair, stats in res["pairs"].items():
            if simd_only and set(pair.split(" vs ")) & SCALAR_KERNELS:
                continue
            for section in ("losses", "metrics", "weights", "outputs"):
                env.setdefault((res["dtype"], section), []).append(stats[section])
    keep = ("max_abs", "max_rel", "ulps", "ratio:close", "ratio:torch-default", "ratio:recommended", "ratio:simd")
    return {k: {f: max(s[f] for s in v) for f in keep} for k, v in env.items()}


def verdict(ratio: float) -> str:
    return "pass" if ratio <= 1 else "FAIL"


def report(results: dict[str, Any], machine: str) -> str:
    lines: list[str] = []
    add = lines.append
    add("# Cross-CPU-kernel differences of the built-in LoRA jobs")
    add("")
    add(f"Produced by `python benchmarks/bench_cross_cpu.py` on {machine}.")
    add("Each setting is one fresh process seeded like the harness (the test's seed from the committed")
    add("reference, deterministic mode), CPU. Settings: `ATEN_CPU_CAPABILITY` (native = unset, i.e. this")
    add("machine's AVX512), `tN` = OMP/MKL/OpenBLAS threads, `+cbwr` = `MKL_CBWR=COMPATIBLE` (other MKL")
    add("sgemm kernels). The references were recorded as native/t1.")
    add("")
    add("## Bitwise-equal groups (whole record: losses, metrics, weights, outputs)")
    add("")
    for job_name, res in results.items():
        groups = " | ".join("{" + ", ".join(c) + "}" for c in res["bitwise_classes"])
        add(f"- **{job_name}**: {groups}")
    add("")
    add("## Against the committed reference")
    add("")
    add("Cell: max abs diff (scale ulps = max|diff| / (eps(model dtype) * max|reference|)); `=` bitwise equal.")
    add("Losses are per-step Python floats (float32 values), metrics are eval_loss and perplexity; weights are")
    add("the float32 LoRA adapters, outputs the float32 probe logits (of a half-precision model for bf16/fp16).")
    add("First diff = first loss step that differs.")
    add("")
    add("| job | setting | capability | losses | first diff | metrics | weights | outputs |")
    add("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for job_name, res in results.items():
        for setting, st in res["vs_reference"].items():
            first = st["losses"]["first_diff_step"]
            add(
                f"| {job_name} | {setting} | {res['capability'][setting]} | {cell(st['losses'])} | "
                f"{'-' if first is None else first} | {cell(st['metrics'])} | {cell(st['weights'])} | "
                f"{cell(st['outputs'])} |"
            )
    add("")
    same = all(any(BASELINE in c and REFERENCE in c for c in res["bitwise_classes"]) for res in results.values())
    if same:
        add(f"The fresh {BASELINE} run is bitwise equal to the committed reference for every job, so the")
        add("comparison with the local baseline is the same table (all of it is in the JSON output).")
    else:
        add(f"NOTE: the fresh {BASELINE} run is NOT bitwise equal to the reference for some job; see the JSON.")
    add("")
    add("## Per-step loss differences (worst over all settings, against the reference)")
    add("")
    jobs = list(results)
    add("| step | " + " | ".join(f"{j} abs | rel" for j in jobs) + " |")
    add("| --- | " + " | ".join("--- | ---" for _ in jobs) + " |")
    n_steps = len(next(iter(results[jobs[0]]["vs_reference"].values()))["losses"]["per_step_abs"])
    for step in range(n_steps):
        row = []
        for j in jobs:
            sts = results[j]["vs_reference"].values()
            row.append(g(max(s["losses"]["per_step_abs"][step] for s in sts)))
            row.append(g(max(s["losses"]["per_step_rel"][step] for s in sts)))
        add(f"| {step} | " + " | ".join(row) + " |")
    add("")
    env, simd = envelope(results), envelope(results, simd_only=True)
    add("## Envelope: worst over every pair of records (9 settings + reference) per model dtype")
    add("")
    add("*all* = every pair; *SIMD only* = pairs without the scalar `ATEN_CPU_CAPABILITY=default` kernels")
    add("(no x86-64 CPU of interest runs those; an Intel Xeon runs the AVX2/AVX-512 kernels with other MKL/oneDNN")
    add("paths). Ratio = worst |diff| / (atol + rtol*|reference|) over all pairs: <= 1 passes, 1/ratio is the")
    add('margin. `close` = pytest-repro\'s `"close"` as it is (torch defaults of the *stored* dtype: float32 for')
    add("every tensor here, and float32 for losses/metrics); `torch-default` = torch.testing defaults of the")
    add("*model* dtype (float32 rtol 1.3e-6 atol 1e-5; bfloat16 rtol 1.6e-2 atol 1e-5; float16 rtol 1e-3 atol")
    add("1e-5); `recommended` = the tolerances below.")
    add("")
    add(
        "| model dtype | section | max abs (all) | max rel (all) | scale ulps (all) | max abs (SIMD only) "
        "| scale ulps (SIMD only) | close | torch-default | recommended |"
    )
    add("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (dtype, section), e in env.items():
        si = simd[(dtype, section)]
        add(
            f"| {dtype} | {section} | {g(e['max_abs'])} | {g(e['max_rel'])} | {g(e['ulps'])} | "
            f"{g(si['max_abs'])} | {g(si['ulps'])} | "
            f"{g(e['ratio:close'])} {verdict(e['ratio:close'])} | "
            f"{g(e['ratio:torch-default'])} {verdict(e['ratio:torch-default'])} | "
            f"{g(e['ratio:recommended'])} {verdict(e['ratio:recommended'])} |"
        )
    add("")
    add("## Recommended cross-environment tolerances (|actual - reference| <= atol + rtol * |reference|)")
    add("")
    add("| model dtype | tensors (weights, outputs) | losses and metrics | worst ratio, all pairs (margin) |")
    add("| --- | --- | --- | --- |")

    def worst(dtype: str, sections: tuple[str, ...]) -> float:
        return float(max(env[(dtype, s)]["ratio:recommended"] for s in sections if (dtype, s) in env))

    def simd_worst(dtype: str) -> float:
        return float(max(simd[(dtype, s)]["ratio:simd"] for s in ("weights", "outputs")))

    for dtype, rec in RECOMMENDED.items():
        wt, ws = worst(dtype, ("weights", "outputs")), worst(dtype, ("losses", "metrics"))
        (rt, at), (rs, as_) = rec["tensors"], rec["scalars"]
        add(
            f"| {dtype} | rtol {g(rt)}, atol {g(at)} | rtol {g(rs)}, atol {g(as_)} | tensors {g(wt)} "
            f"({g(1 / wt if wt else math.inf)}x), losses/metrics {g(ws)} ({g(1 / ws if ws else math.inf)}x) |"
        )
    add("")
    add("## Conclusions")
    add("")
    threads_same = all(
        any(f"{cap}/t1" in c and f"{cap}/t2" in c for c in res["bitwise_classes"])
        for res in results.values()
        for cap in ("avx512", "avx2", "default")
    )
    f32 = {k: env[("float32", k)] for k in ("losses", "metrics", "weights", "outputs")}

    def bf(k: str) -> dict[str, Any]:
        return env[("bfloat16", k)]

    def fp(k: str) -> dict[str, Any]:
        return env[("float16", k)]

    def bfs(k: str) -> dict[str, Any]:
        return simd[("bfloat16", k)]

    def fps(k: str) -> dict[str, Any]:
        return simd[("float16", k)]

    bf_runs = [r["losses"]["per_step_abs"] for r in results["lora bfloat16"]["vs_reference"].values()]
    bf_steps = [max(col) for col in zip(*bf_runs, strict=True)]
    add(
        f"- The proxies reproduce the reported Intel-vs-AMD magnitudes: with SIMD kernels float32 losses differ by "
        f"up to {g(simd[('float32', 'losses')]['max_abs'])} (1 float32 ulp at a loss of ~4; "
        f"{g(f32['losses']['max_abs'])} with the scalar kernels) and bfloat16-model logits by up to "
        f"{g(bfs('outputs')['max_abs'])} (1 bfloat16 ulp at |logit| ~1). The logits move by at most "
        f"{g(f32['outputs']['ulps'])} / {g(bf('outputs')['ulps'])} / {g(fp('outputs')['ulps'])} scale ulps of the "
        "model dtype (float32 / bfloat16 / float16); the adapters can drift further."
    )
    add(
        "- Thread count: "
        + (
            "1 vs 2 threads is bitwise identical for every job and kernel set — this model is too small for "
            "ATen/MKL to split a reduction, so this proxy shows nothing here (it may on bigger models)."
            if threads_same
            else "1 vs 2 threads changes results for some job (see the bitwise groups)."
        )
    )
    add(
        f"- float32 (losses, metrics, adapters, logits): torch's float32 defaults (= pytest-repro's `close`, "
        f"rtol 1.3e-6, atol 1e-5) pass every measured pair; the tightest is metrics (perplexity ~43: "
        f"ratio {g(f32['metrics']['ratio:close'])}, {g(1 / f32['metrics']['ratio:close'])}x margin), "
        f"losses {g(1 / f32['losses']['ratio:close'])}x, tensors "
        f"{g(1 / max(f32['weights']['ratio:close'], f32['outputs']['ratio:close']))}x. rtol alone is not enough "
        f"for tensors (max rel {g(max(f32['weights']['max_rel'], f32['outputs']['max_rel']))} on near-zero "
        "elements): keep the atol."
    )
    add(
        "- Half-precision models: `close` as implemented picks float32 limits (the adapters and logits are "
        f"stored in float32, and scalars always use float32) and fails by up to "
        f"{g(max(bf('weights')['ratio:close'], fp('weights')['ratio:close']))}x. Even torch's defaults of the "
        f"*model* dtype fail for its tensors (bfloat16 ratio up to "
        f"{g(max(bf('weights')['ratio:torch-default'], bf('outputs')['ratio:torch-default']))}, float16 up to "
        f"{g(max(fp('weights')['ratio:torch-default'], fp('outputs')['ratio:torch-default']))}): their atol 1e-5 "
        "is far below one half-precision ulp at the logits' scale, and near-zero elements break any rtol. "
        "They need an atol of a few model-dtype ulps at the tensor's scale."
    )
    add(
        f"- Their losses and metrics are float32 scalars that moved by at most {g(bf('losses')['max_rel'])} / "
        f"{g(bf('metrics')['max_rel'])} relative (bfloat16 losses / metrics) and {g(fp('losses')['max_rel'])} / "
        f"{g(fp('metrics')['max_rel'])} (float16): rtol 1e-3 (atol 1e-5) passes with "
        f"{g(1 / worst('bfloat16', ('losses', 'metrics')))}x (bf16) and "
        f"{g(1 / worst('float16', ('losses', 'metrics')))}x (fp16) margin; the model dtype's own defaults also "
        "pass (bf16's rtol 1.6e-2 would hide a 1% loss regression, so 1e-3 is the better choice). The loss "
        "differences grow along the run (per-step table, worst abs for "
        f"bfloat16: {g(bf_steps[0])} at step 0, {g(max(bf_steps[: len(bf_steps) // 2]))} by step "
        f"{len(bf_steps) // 2 - 1}, {g(max(bf_steps))} at worst), so a much longer job needs re-measuring."
    )
    add(
        f"- Half-precision tensors: the worst cases are a few adapter elements under the scalar kernels "
        f"(bfloat16 {g(bf('weights')['max_abs'])}, float16 {g(fp('weights')['max_abs'])}, in one layer's "
        "q_proj adapters; probably Adam, whose step is about ±lr whatever the gradient's size, so a tiny gradient "
        f"that changes sign moves an element by a whole step); with SIMD kernels only they are "
        f"{g(bfs('weights')['max_abs'])} and {g(fps('weights')['max_abs'])}, and the logits "
        f"{g(bfs('outputs')['max_abs'])} and {g(fps('outputs')['max_abs'])} (one ulp at |logit| ~1). "
        f"bfloat16 rtol 1.6e-2 atol 5e-2 and float16 rtol 1e-3 atol 3e-2 pass everything with "
        f"{g(1 / worst('bfloat16', ('weights', 'outputs')))}x / {g(1 / worst('float16', ('weights', 'outputs')))}x "
        "margin. If only SIMD-kernel variation must pass (what another AVX2/AVX-512 CPU gives), about 4 ulps "
        f"at the output scale is enough: rtol {g(RECOMMENDED_SIMD['bfloat16'][0])} atol "
        f"{g(RECOMMENDED_SIMD['bfloat16'][1])} (bf16) / rtol {g(RECOMMENDED_SIMD['float16'][0])} atol "
        f"{g(RECOMMENDED_SIMD['float16'][1])} (fp16) pass the SIMD-only pairs with "
        f"{g(1 / simd_worst('bfloat16'))}x / {g(1 / simd_worst('float16'))}x margin (and fail the scalar-kernel "
        f"adapters: ratio {g(max(bf('weights')['ratio:simd'], fp('weights')['ratio:simd']))})."
    )
    add("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--parallel", type=int, default=2, help="1-thread runs side by side (default 2)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-cross-cpu"), help="where records go")
    parser.add_argument("--md", type=Path, default=ROOT / "benchmarks" / "results-cross-cpu.md")
    parser.add_argument("--json", type=Path, default=None, help="also write every comparison as JSON")
    parser.add_argument("--reuse", action="store_true", help="compare the records already under --out")
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    if not args.reuse:
        run_all(args.out, args.parallel)
    records = load_all(args.out)
    results = analyse(records)
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    machine = f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"
    text = report(results, machine)
    print(text)
    if args.md:
        args.md.write_text(text, encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
