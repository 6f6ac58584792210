"""Collect this machine's environment manifest, and read what a manifest says about the machine.

Comparing two manifests (what drifted, and what kind of drift it is) is ``_judge.drift``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MANIFEST_SCHEMA = 2
PACKAGES = ("numpy", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "scipy")
# Environment variables that change numerics, threading or device selection.
NUMERIC_ENV = re.compile(
    r"^(CUBLAS_WORKSPACE_CONFIG|PYTHONHASHSEED|CUDA_VISIBLE_DEVICES|CUDA_LAUNCH_BLOCKING|NVIDIA_TF32_OVERRIDE"
    r"|TORCH_ALLOW_TF32_CUBLAS_OVERRIDE|OMP_.*|MKL_.*|OPENBLAS_.*|KMP_.*|GOMP_.*|NCCL_.*|CUDNN_.*|CUBLAS_.*"
    r"|TORCH_.*|PYTORCH_.*|XLA_.*|TF_ENABLE_ONEDNN_OPTS|ONEDNN_.*|DNNL_.*)$"
)
# Names that look like credentials: their values never reach a manifest.
SECRET_NAME = re.compile(
    r"(TOKEN|SECRET|PASSW|PASSWORD|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE|AUTH|COOKIE|SESSION)", re.IGNORECASE
)
REDACTED = "<redacted>"
CPU_FLAGS = {
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "amx_bf16",
    "amx_tile",
    "amx_int8",
    "sve",
    "neon",
    "asimd",
}

# /proc/cpuinfo vendor_id -> vendor part of the CPU environment key.
VENDOR_IDS = {"AuthenticAMD": "amd", "GenuineIntel": "intel"}
# Model-string fallbacks (manifests recorded before cpu.vendor existed, machines without /proc/cpuinfo).
VENDOR_MODELS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("amd", re.compile(r"\b(AMD|EPYC|Ryzen|Threadripper|Opteron)\b", re.IGNORECASE)),
    ("intel", re.compile(r"\b(Intel|Xeon)", re.IGNORECASE)),
    ("arm", re.compile(r"\b(ARM|Neoverse|Cortex|Apple|Graviton|Ampere|aarch64|arm64)\b", re.IGNORECASE)),
)
# torch's CPU capability names that mean "no vector extension" ("NO" is what older manifests recorded).
_NO_VECTOR_CAPABILITY = {"NO AVX", "NO_AVX", "NO", "DEFAULT"}
MANIFEST_KINDS = ("job", "cli")


def _probe(fn: Callable[[], Any]) -> Any:
    """Run one probe; a probe that fails records its error instead of failing the run."""
    try:
        return fn()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def vendor_from_cpuinfo(text: str) -> str | None:
    """Return the CPU vendor named by /proc/cpuinfo text (``vendor_id`` or ARM's ``CPU implementer``), or None."""
    m = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.M)
    if m and m.group(1) in VENDOR_IDS:
        return VENDOR_IDS[m.group(1)]
    if re.search(r"^CPU implementer\s*:", text, re.M):
        return "arm"
    return None


def vendor_from_model(model: str, machine: str = "") -> str:
    """Return the CPU vendor guessed from a model string (and machine type): amd, intel, arm or unknown."""
    for vendor, pattern in VENDOR_MODELS:
        if pattern.search(model):
            return vendor
    return "arm" if machine.lower() in ("aarch64", "arm64") or machine.lower().startswith("armv") else "unknown"


def _cpu() -> dict[str, Any]:
    model = platform.processor() or ""
    flags: list[str] = []
    vendor: str | None = None
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        text = cpuinfo.read_text(errors="replace")
        m = re.search(r"^(model name|Model)\s*:\s*(.+)$", text, re.M)
        model = m.group(2).strip() if m else model
        f = re.search(r"^(flags|Features)\s*:\s*(.+)$", text, re.M)
        flags = sorted(set(f.group(2).split()) & CPU_FLAGS) if f else []
        vendor = vendor_from_cpuinfo(text)
    return {
        "model": model,
        "vendor": vendor or vendor_from_model(model, platform.machine()),
        "machine": platform.machine(),
        "logical_cores": os.cpu_count(),
        "isa_flags": flags,
    }


def _torch() -> dict[str, Any]:
    if importlib.util.find_spec("torch") is None:
        return {"installed": False}
    import torch

    build = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=([^,\s]+)", build)
    lapack = re.search(r"LAPACK_INFO=([^,\s]+)", build)
    capability = re.search(r"CPU capability usage: (.+)", build)
    info: dict[str, Any] = {
        "version": torch.__version__,
        "git_version": getattr(torch.version, "git_version", None),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,  # type: ignore[no-untyped-call]
        "debug": torch.version.debug,
        "blas": blas.group(1) if blas else None,
        "lapack": lapack.group(1) if lapack else None,
        "cpu_capability": capability.group(1).strip() if capability else None,
        "parallel_backend": _parallel_backend(torch.__config__.parallel_info()),
        "intra_op_threads": torch.get_num_threads(),
        "inter_op_threads": torch.get_num_interop_threads(),
        "mkl": torch.backends.mkl.is_available(),  # type: ignore[no-untyped-call]
        "mkldnn": torch.backends.mkldnn.is_available(),  # type: ignore[no-untyped-call]
    }
    if torch.cuda.is_available():
        info["nccl"] = _probe(lambda: ".".join(map(str, torch.cuda.nccl.version())))  # type: ignore[no-untyped-call]
    return info


def _parallel_backend(parallel_info: str) -> str | None:
    m = re.search(r"ATen parallel backend: (.+)", parallel_info)
    return m.group(1).strip() if m else None


def _driver_version() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    out = subprocess.run(
        [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=5,
        check=True,
    ).stdout
    return out.splitlines()[0].strip() if out.strip() else None


def _gpu() -> list[dict[str, Any]]:
    if importlib.util.find_spec("torch") is None:
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    driver = _probe(_driver_version)
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append(
            {
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
                "driver": driver,
            }
        )
    return gpus


def _determinism() -> dict[str, Any]:
    if "torch" not in sys.modules:
        return {}
    import torch

    return {
        "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def _git(cwd: Path) -> dict[str, Any]:
    def run(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = run("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}
    return {
        "commit": commit,
        "branch": run("rev-parse", "--abbrev-ref", "HEAD"),
        "dirty": bool(run("status", "--porcelain", "--untracked-files=no")),
    }


def _packages(extra: Iterable[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in (*PACKAGES, *extra):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _pip() -> dict[str, Any]:
    """A hash of the installed distributions (what `pip freeze` lists), without running pip."""
    dists = sorted({f"{d.metadata['Name']}=={d.version}".lower() for d in importlib.metadata.distributions()})
    return {"freeze_sha256": hashlib.sha256("\n".join(dists).encode()).hexdigest(), "distributions": len(dists)}


def _container() -> dict[str, Any]:
    cgroup = Path("/proc/1/cgroup")
    text = cgroup.read_text(errors="replace") if cgroup.exists() else ""
    runtime = next((name for name in ("kubepods", "docker", "containerd", "lxc", "podman") if name in text), None)
    return {
        "dockerenv": Path("/.dockerenv").exists(),
        "containerenv": Path("/run/.containerenv").exists(),
        "cgroup_runtime": runtime,
        "kubernetes": "KUBERNETES_SERVICE_HOST" in os.environ,
    }


def redact_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Return the numerics-relevant variables of ``environ``, with credential-like names redacted."""
    out: dict[str, str] = {}
    for name in sorted(environ):
        if NUMERIC_ENV.match(name):
            out[name] = REDACTED if SECRET_NAME.search(name) else environ[name]
    return out


def _identity(value: str, mode: str) -> str | None:
    if mode == "omit":
        return None
    if mode == "plain":
        return value
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:16]


def _user() -> str:
    import getpass

    return getpass.getuser()


def collect_manifest(
    cwd: str | Path | None = None, extra_packages: Iterable[str] = (), identity: str = "hash", kind: str = "job"
) -> dict[str, Any]:
    """Return this process's environment manifest as a plain, YAML/JSON-serializable dict.

    ``identity`` decides how hostname and user name appear: ``hash`` (default), ``omit`` or ``plain``.
    ``kind`` says where it was collected: ``job`` (inside a job process, under the harness's settings)
    or ``cli`` (a plain process, e.g. ``pytest-repro manifest``); see ``_judge.drift.RUN_ONLY_FIELDS``.
    """
    if identity not in ("hash", "omit", "plain"):
        raise ValueError(f"identity must be hash, omit or plain, got {identity!r}")
    if kind not in MANIFEST_KINDS:
        raise ValueError(f"kind must be job or cli, got {kind!r}")
    libc = platform.libc_ver()
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "kind": kind,
        "collected_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "python": _probe(
            lambda: {
                "version": platform.python_version(),
                "implementation": platform.python_implementation(),
                "executable": sys.executable,
            }
        ),
        "os": _probe(
            lambda: {
                "system": platform.system(),
                "release": platform.release(),
                "libc": "-".join(x for x in libc if x) or None,
            }
        ),
        "container": _probe(_container),
        "host": _probe(
            lambda: {"hostname": _identity(socket.gethostname(), identity), "user": _identity(_user(), identity)}
        ),
        "cpu": _probe(_cpu),
        "torch": _probe(_torch),
        "gpu": _probe(_gpu),
        "packages": _probe(lambda: _packages(extra_packages)),
        "pip": _probe(_pip),
        "env": _probe(lambda: redact_env(os.environ)),
        "determinism": _probe(_determinism),
        "git": _probe(lambda: _git(Path(cwd or os.getcwd()))),
    }
    # Round-trip through JSON: plain types only (torch's version is a str subclass YAML cannot dump).
    return json.loads(json.dumps(manifest, default=str))  # type: ignore[no-any-return]


def manifest_problem(data: Any) -> str | None:
    """Say why ``data`` is not a pytest-repro manifest (a mapping with schema, python and torch); None if it is."""
    if not isinstance(data, Mapping):
        return f"a YAML {type(data).__name__}, not a mapping"
    if not isinstance(data.get("schema"), int) or isinstance(data.get("schema"), bool):
        return "no integer 'schema' field: not a pytest-repro manifest"
    missing = [k for k in ("python", "torch") if not isinstance(data.get(k), Mapping)]
    if missing:
        return f"no {' or '.join(repr(k) for k in missing)} section: not a pytest-repro manifest"
    return None


def cpu_vendor(manifest: Mapping[str, Any]) -> str:
    """Return the manifest's CPU vendor (amd, intel, arm, ...): cpu.vendor, else derived from cpu.model."""
    cpu = manifest.get("cpu")
    if not isinstance(cpu, Mapping):
        return "unknown"
    vendor = cpu.get("vendor")
    if isinstance(vendor, str) and vendor and vendor != "unknown":
        return vendor.lower()
    return vendor_from_model(str(cpu.get("model") or ""), str(cpu.get("machine") or ""))


def cpu_capability(manifest: Mapping[str, Any]) -> str:
    """Return torch's CPU capability from the manifest, lower-cased (avx512, avx2, default), or unknown."""
    torch_info = manifest.get("torch")
    value = torch_info.get("cpu_capability") if isinstance(torch_info, Mapping) else None
    if not isinstance(value, str) or not value.strip():
        return "unknown"
    value = value.strip().upper()
    return "default" if value in _NO_VECTOR_CAPABILITY else value.lower()


def environment_key(manifest: Mapping[str, Any], device: str, extra_fields: Iterable[str] = ()) -> str:
    """Return the key references are stored under: device type and GPU family, plus chosen manifest fields.

    CPU keys name the vendor and torch's CPU capability (``cpu-amd-avx512``): CPUs of different vendors or
    vector widths round float32 differently, so their references are not compared bitwise.
    """
    parts = [f"cpu-{cpu_vendor(manifest)}-{cpu_capability(manifest)}"]
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        gpus = manifest.get("gpu") or []
        cap = gpus[index].get("capability") if isinstance(gpus, list) and len(gpus) > index else None
        parts = [f"cuda-sm{str(cap).replace('.', '')}" if cap else "cuda"]
    for field in extra_fields:
        value: Any = manifest
        for part in field.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        parts.append(f"{field.rsplit('.', 1)[-1]}-{value}")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(parts))
