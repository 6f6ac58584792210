"""Collect this machine's environment manifest; diff two manifests and classify the drift."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST_SCHEMA = 1
PACKAGES = ("numpy", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "scipy")
NUMERIC_ENV = (
    "CUBLAS_WORKSPACE_CONFIG",
    "PYTHONHASHSEED",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_TF32_OVERRIDE",
    "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",
    "CUDA_LAUNCH_BLOCKING",
    "OPENBLAS_CORETYPE",
)
# Top-level manifest sections and what a change in them means for results.
NUMERIC_SECTIONS = ("torch", "gpu", "cpu", "packages", "env", "determinism", "python")
CODE_SECTIONS = ("git",)


def _probe(fn: Callable[[], Any]) -> Any:
    """Run one probe; a probe that fails records its error instead of failing the run."""
    try:
        return fn()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _cpu() -> dict[str, Any]:
    model = platform.processor() or ""
    flags: list[str] = []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        text = cpuinfo.read_text(errors="replace")
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        model = m.group(1).strip() if m else model
        f = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        present = set(f.group(1).split()) if f else set()
        flags = sorted(
            x for x in present if x in {"avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
        )
    return {"model": model, "machine": platform.machine(), "logical_cores": os.cpu_count(), "isa_flags": flags}


def _torch() -> dict[str, Any]:
    if importlib.util.find_spec("torch") is None:
        return {"installed": False}
    import torch

    return {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,  # type: ignore[no-untyped-call]
        "debug": torch.version.debug,
        "intra_op_threads": torch.get_num_threads(),
        "inter_op_threads": torch.get_num_interop_threads(),
        "mkl": torch.backends.mkl.is_available(),  # type: ignore[no-untyped-call]
        "mkldnn": torch.backends.mkldnn.is_available(),  # type: ignore[no-untyped-call]
    }


def _gpu() -> list[dict[str, Any]]:
    if importlib.util.find_spec("torch") is None:
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append(
            {
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
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


def _packages(extra: tuple[str, ...]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in (*PACKAGES, *extra):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def collect_manifest(cwd: str | Path | None = None, extra_packages: tuple[str, ...] = ()) -> dict[str, Any]:
    """Return this process's environment manifest as a plain, YAML/JSON-serializable dict."""
    libc = platform.libc_ver()
    return {
        "schema": MANIFEST_SCHEMA,
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation()},
        "os": _probe(
            lambda: {
                "system": platform.system(),
                "release": platform.release(),
                "libc": "-".join(x for x in libc if x) or None,
            }
        ),
        "cpu": _probe(_cpu),
        "torch": _probe(_torch),
        "gpu": _probe(_gpu),
        "packages": _probe(lambda: _packages(extra_packages)),
        "env": {k: os.environ.get(k) for k in NUMERIC_ENV},
        "determinism": _probe(_determinism),
        "git": _probe(lambda: _git(Path(cwd or os.getcwd()))),
    }


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

    def describe(self) -> str:
        """Return one aligned line for this change."""
        old, new = self.values()
        return f"{self.category:<8} {self.path}: {old} -> {new}"


def _category(path: str) -> str:
    top = path.split(".", 1)[0].split("[", 1)[0]
    if top in CODE_SECTIONS:
        return "code"
    if top in NUMERIC_SECTIONS:
        return "numeric"
    return "cosmetic"


def diff_manifests(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Drift]:
    """Return every changed field between two manifests, classified, numeric first."""
    from deepdiff import DeepDiff

    diff = DeepDiff(dict(old), dict(new), ignore_order=False, view="tree")
    drifts: list[Drift] = []
    for change_type in diff:
        for level in diff[change_type]:
            path = ".".join(str(p) for p in level.path(output_format="list"))
            added, removed = change_type.endswith("_added"), change_type.endswith("_removed")
            old_v = None if added else level.t1
            new_v = None if removed else level.t2
            change = "added" if added else "removed" if removed else "changed"
            drifts.append(Drift(path, old_v, new_v, _category(path), change))
    order = {"numeric": 0, "code": 1, "cosmetic": 2}
    return sorted(drifts, key=lambda d: (order[d.category], d.path))
