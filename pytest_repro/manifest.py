"""Collect this machine's environment manifest; diff two manifests and classify the drift."""

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
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
# Fields the harness sets inside job processes (determinism flags, one thread, PYTHONHASHSEED, ...).
# A manifest printed by `pytest-repro manifest` (kind "cli") cannot match them, so they are compared
# only between two manifests of the same kind.
RUN_ONLY_FIELDS = (
    "determinism",
    "torch.intra_op_threads",
    "torch.inter_op_threads",
    "env.OMP_NUM_THREADS",
    "env.MKL_NUM_THREADS",
    "env.OPENBLAS_NUM_THREADS",
    "env.PYTHONHASHSEED",
    "env.CUBLAS_WORKSPACE_CONFIG",
    "env.PYTORCH_NVML_BASED_CUDA_CHECK",
)
MANIFEST_KINDS = ("job", "cli")

# First matching prefix decides what a changed field means for results.
CATEGORY_RULES: tuple[tuple[str, str], ...] = (
    ("git", "code"),
    ("host", "cosmetic"),
    ("collected_at", "cosmetic"),
    ("container", "cosmetic"),
    ("python.executable", "cosmetic"),
    ("os.release", "cosmetic"),
    ("pip", "cosmetic"),
    ("torch", "numeric"),
    ("gpu", "numeric"),
    ("cpu", "numeric"),
    ("packages", "numeric"),
    ("env", "numeric"),
    ("determinism", "numeric"),
    ("python", "numeric"),
    ("os", "numeric"),
)


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
    or ``cli`` (a plain process, e.g. ``pytest-repro manifest``); see ``RUN_ONLY_FIELDS``.
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


@dataclass(frozen=True)
class Drift:
    """One changed manifest field and what kind of change it is."""

    path: str
    old: Any
    new: Any
    category: str  # "numeric", "code" or "cosmetic"
    change: str = "changed"  # "changed", "added" or "removed"

    def values(self) -> tuple[str, str]:
        """Return the old and new value as text, '(absent)' where the field did not exist."""
        old = "(absent)" if self.change == "added" else repr(self.old)
        new = "(absent)" if self.change == "removed" else repr(self.new)
        return old, new

    def list_items(self) -> tuple[list[Any], list[Any]] | None:
        """Return the items added and removed when both sides are lists of plain values, else None."""
        if self.change != "changed" or not (_scalar_list(self.old) and _scalar_list(self.new)):
            return None
        return [x for x in self.new if x not in self.old], [x for x in self.old if x not in self.new]

    def describe(self) -> str:
        """Return one aligned line for this change (a list of plain values as the items added and removed)."""
        items = self.list_items()
        if items is not None:
            return f"{self.category:<8} {self.path}: {_list_change(self.old, self.new, *items)}"
        old, new = self.values()
        return f"{self.category:<8} {self.path}: {old} -> {new}"


_SCALARS = (str, int, float, bool, type(None))


def _scalar_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, _SCALARS) for x in value)


def _item(value: Any) -> str:
    return value if isinstance(value, str) and re.fullmatch(r"[\w.+:/@-]+", value) else repr(value)


def _list_change(old: list[Any], new: list[Any], added: list[Any], removed: list[Any]) -> str:
    """Say how a list of plain values changed: "added a, b; removed c" (or that only the order changed)."""
    parts = [f"{word} {', '.join(_item(x) for x in xs)}" for word, xs in (("added", added), ("removed", removed)) if xs]
    if not parts:  # the same items: another order or other repeat counts
        return f"same items, reordered: {old!r} -> {new!r}"
    return "; ".join(parts)


def category(path: str) -> str:
    """Classify a manifest field path as numeric, code or cosmetic."""
    for prefix, cat in CATEGORY_RULES:
        if _matches(path, (prefix,)):
            return cat
    return "cosmetic"


def manifest_kind(manifest: Mapping[str, Any]) -> str:
    """Return where a manifest was collected: ``job`` or ``cli`` (manifests without the field are job ones)."""
    kind = manifest.get("kind")
    return kind if kind in MANIFEST_KINDS else "job"


def _matches(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith((p + ".", p + "[")) for p in prefixes)


def _has_path(manifest: Mapping[str, Any], path: str) -> bool:
    value: Any = manifest
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return False
        value = value[part]
    return True


def _without(manifest: Mapping[str, Any], paths: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``manifest`` without the given dotted paths (copying only the sections it changes)."""
    out = dict(manifest)
    for path in paths:
        *parents, leaf = path.split(".")
        node: dict[str, Any] = out
        for part in parents:
            child = node.get(part)
            if not isinstance(child, Mapping):
                break
            node[part] = node = dict(child)
        else:
            node.pop(leaf, None)
    return out


def _with_vendor(manifest: dict[str, Any]) -> dict[str, Any]:
    """Fill cpu.vendor of a manifest recorded before the field existed, so that its absence is no drift."""
    cpu = manifest.get("cpu")
    if isinstance(cpu, Mapping) and "vendor" not in cpu and "error" not in cpu and "model" in cpu:
        manifest["cpu"] = {**cpu, "vendor": cpu_vendor(manifest)}
    return manifest


def run_only_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Return the run-only fields ``diff_manifests`` skips: those present when the two kinds differ, else none."""
    if manifest_kind(old) == manifest_kind(new):
        return []
    return [f for f in RUN_ONLY_FIELDS if _has_path(old, f) or _has_path(new, f)]


def run_only_note(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """Return one line naming the fields not compared and why, or None when everything was compared."""
    skipped = run_only_fields(old, new)
    if not skipped:
        return None
    names = ", ".join(f + ".*" if f == "determinism" else f for f in skipped)
    return (
        f"not compared: {names} (a {manifest_kind(old)} manifest vs a {manifest_kind(new)} manifest: "
        "the harness sets these inside job processes, so a plain process cannot match them)"
    )


def diff_manifests(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Drift]:
    """Return every changed field between two manifests, classified, numeric first.

    Between a ``job`` and a ``cli`` manifest the run-only fields (``run_only_fields``) are skipped.
    """
    from deepdiff import DeepDiff

    skip = ("kind", *run_only_fields(old, new))
    a, b = _with_vendor(_without(old, skip)), _with_vendor(_without(new, skip))
    diff = DeepDiff(a, b, ignore_order=False, view="tree")
    drifts: list[Drift] = []
    lists: set[str] = set()
    for change_type in diff:
        for level in diff[change_type]:
            parts = level.path(output_format="list")
            inside = _scalar_list_at(a, b, parts)
            if inside is not None:  # an item of a list of plain values: one change of the whole list
                path = ".".join(str(p) for p in parts[:inside])
                if path not in lists:
                    lists.add(path)
                    old_list, new_list = _get(a, parts[:inside]), _get(b, parts[:inside])
                    # The manifest's plain lists are sets (ISA flags, ...): only another order is no drift.
                    reordered = sorted(map(repr, old_list)) == sorted(map(repr, new_list))
                    drifts.append(Drift(path, old_list, new_list, "cosmetic" if reordered else category(path)))
                continue
            path = ".".join(str(p) for p in parts)
            added, removed = change_type.endswith("_added"), change_type.endswith("_removed")
            old_v = None if added else level.t1
            new_v = None if removed else level.t2
            change = "added" if added else "removed" if removed else "changed"
            drifts.append(Drift(path, old_v, new_v, category(path), change))
    order = {"numeric": 0, "code": 1, "cosmetic": 2}
    return sorted(drifts, key=lambda d: (order[d.category], d.path))


def _get(data: Any, parts: Sequence[Any]) -> Any:
    for part in parts:
        data = data[part]
    return data


def _scalar_list_at(a: Any, b: Any, parts: Sequence[Any]) -> int | None:
    """How many path parts lead to a list of plain values, in both manifests, that the change lies inside; or None."""
    for depth, part in enumerate(parts):
        if isinstance(a, list) and isinstance(b, list):
            return depth if _scalar_list(a) and _scalar_list(b) else None
        if not (isinstance(a, Mapping) and isinstance(b, Mapping) and part in a and part in b):
            return None
        a, b = a[part], b[part]
    return None


def numeric_drift(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Drift]:
    """Return only the changes that can change results."""
    return [d for d in diff_manifests(old, new) if d.category == "numeric"]


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
