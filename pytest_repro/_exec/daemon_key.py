"""A worker daemon's key: what a daemon must share with a session to serve it (interpreter, venv, installed
distributions, pytest-repro's own code, import-time environment variables, CPUs, start-up preload list).
Imports only the standard library.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Environment variables that may change what importing torch & co. does (read at import, not per run).
_IMPORT_ENV_PREFIXES = (
    "ATEN_",
    "CUBLAS_",
    "CUDA_",
    "HF_",
    "JAX_",
    "KMP_",
    "LANG",
    "LC_",
    "LD_",
    "MKL_",
    "NCCL_",
    "NPY_",
    "NVIDIA_",
    "OMP_",
    "OPENBLAS_",
    "PYTHON",
    "PYTORCH_",
    "TOKENIZERS_",
    "TORCH",
    "TRANSFORMERS_",
    "TRITON_",
    "XLA_",
)
_VOLATILE = ("PYTHONBREAKPOINT",)


def _site_dirs() -> list[Path]:
    import site
    import sysconfig

    dirs = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    dirs |= set(site.getsitepackages())
    user = site.getusersitepackages()
    if site.ENABLE_USER_SITE and user:
        dirs.add(user)
    return sorted(Path(d) for d in dirs if d and Path(d).is_dir())


def packages_digest() -> str:
    """A digest of the installed distributions: every ``*.dist-info``/``*.egg-info``/``*.pth`` and when it changed."""
    h = hashlib.sha256()
    for folder in _site_dirs():
        h.update(str(folder).encode())
        with contextlib.suppress(OSError):
            for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                if entry.name.endswith((".dist-info", ".egg-info", ".pth", ".egg-link")):
                    with contextlib.suppress(OSError):
                        h.update(f"{entry.name}:{entry.stat().st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def own_digest() -> str:
    """A digest of pytest-repro's own source files (an edited checkout makes a new daemon)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(str(root).encode())
    for path in sorted(root.rglob("*.py")):
        with contextlib.suppress(OSError):
            st = path.stat()
            h.update(f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def import_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``env`` that importing torch, transformers & co. may read."""
    return {k: v for k, v in sorted(env.items()) if k.startswith(_IMPORT_ENV_PREFIXES) and k not in _VOLATILE}


@dataclass(frozen=True)
class Identity:
    """What a daemon must share with a session to serve it."""

    python: str
    prefix: str
    packages: str
    own: str
    env: str  # digest of import_env
    preload: str  # digest of the start-up preload list

    @property
    def key(self) -> str:
        """The daemon's name: a digest of everything above."""
        text = json.dumps([self.python, self.prefix, self.packages, self.own, self.env, self.preload])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def identity(env: Mapping[str, str], preload: Sequence[str]) -> Identity:
    """This interpreter's identity for a daemon started with ``env`` and ``preload``."""
    # The CPUs it may use too: torch sizes its default thread pool from them when it is imported.
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [os.cpu_count()]
    env_text = json.dumps([import_env(env), cpus], sort_keys=True)
    return Identity(
        python=os.path.realpath(sys.executable),  # `pytest` and `python -m pytest` may name it differently
        prefix=sys.prefix,
        packages=packages_digest(),
        own=own_digest(),
        env=hashlib.sha256(env_text.encode()).hexdigest()[:16],
        preload=hashlib.sha256("\n".join(preload).encode()).hexdigest()[:16],
    )
