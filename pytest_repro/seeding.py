"""Seeding every RNG and setting determinism flags, with a way to restore what was there before."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import sys
from types import TracebackType
from typing import Any

CUBLAS_WORKSPACE_CONFIG = ":4096:8"
_VALID_CUBLAS = (":4096:8", ":16:8")
_SEED_MODULUS = 2**32


def derive_seed(base_seed: int, nodeid: str) -> int:
    """Return a per-test seed: the base seed combined with a stable hash of the test's node id."""
    digest = hashlib.sha256(f"{base_seed}:{nodeid}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def determinism_env(deterministic: bool, hash_seed: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """Return the environment a job process must start with (set before torch is imported)."""
    env = dict(os.environ if base is None else base)
    env["PYTHONHASHSEED"] = str(hash_seed % _SEED_MODULUS)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Lets torch.cuda.is_available() answer without initialising CUDA, so a process can still fork.
    env.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    if deterministic and env.get("CUBLAS_WORKSPACE_CONFIG") not in _VALID_CUBLAS:
        env["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
    return env


def determinism_flags() -> dict[str, Any]:
    """Return the determinism-related flags of this process, for the run record."""
    flags: dict[str, Any] = {
        "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED"),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        flags["use_deterministic_algorithms"] = torch.are_deterministic_algorithms_enabled()
        flags["cudnn_deterministic"] = bool(torch.backends.cudnn.deterministic)
        flags["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    return flags


class SeedState:
    """The RNG states and determinism flags captured before seeding; restores them on exit."""

    def __init__(self) -> None:
        self._python = random.getstate()
        self._env = {k: os.environ.get(k) for k in ("PYTHONHASHSEED", "CUBLAS_WORKSPACE_CONFIG", "PL_GLOBAL_SEED")}
        self._numpy: Any = None
        self._torch: dict[str, Any] | None = None
        np = _optional("numpy")
        if np is not None:
            self._numpy = np.random.get_state()
        torch = _optional("torch")
        if torch is not None:
            self._torch = {
                "cpu": torch.get_rng_state(),
                # Reading CUDA RNG state would initialise CUDA: only do it when it already is.
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
                "deterministic": torch.are_deterministic_algorithms_enabled(),
                "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
                "cudnn_deterministic": torch.backends.cudnn.deterministic,
                "cudnn_benchmark": torch.backends.cudnn.benchmark,
            }

    def restore(self) -> None:
        """Put back every RNG state and flag captured at construction."""
        random.setstate(self._python)
        for key, value in self._env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if self._numpy is not None:
            import numpy as np

            np.random.set_state(self._numpy)
        if self._torch is not None:
            import torch

            torch.set_rng_state(self._torch["cpu"])
            if self._torch["cuda"] is not None:
                torch.cuda.set_rng_state_all(self._torch["cuda"])
            torch.use_deterministic_algorithms(self._torch["deterministic"], warn_only=self._torch["warn_only"])
            torch.backends.cudnn.deterministic = self._torch["cudnn_deterministic"]
            torch.backends.cudnn.benchmark = self._torch["cudnn_benchmark"]

    def __enter__(self) -> SeedState:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.restore()


def _optional(name: str) -> Any:
    if name in sys.modules:
        return sys.modules[name]
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)


def seed_everything(seed: int, deterministic: bool = True, transformers: bool | None = None) -> SeedState:
    """Seed Python, NumPy, torch (CPU and all CUDA devices), transformers and Lightning; set determinism flags.

    Use it plainly to seed for the rest of the process, or as ``with seed_everything(0): ...`` to
    restore the previous RNG states and flags afterwards. ``transformers.set_seed`` is called when
    transformers is installed (``transformers=None``), always (``True``) or never (``False``).
    ``CUBLAS_WORKSPACE_CONFIG`` and ``PYTHONHASHSEED`` only take full effect in a process started with
    them (the harness does that). ``PL_GLOBAL_SEED`` is set to the seed, as Lightning's own
    ``seed_everything`` does.
    """
    seed = int(seed) % _SEED_MODULUS
    state = SeedState()
    random.seed(seed)
    # A running interpreter's hash seed cannot change; this only reaches processes the job starts.
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    # What lightning.seed_everything(seed) would set: Lightning's DDP setup and its DistributedSampler read it.
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    np = _optional("numpy")
    if np is not None:
        np.random.seed(seed)
    torch = _optional("torch")
    if torch is not None:
        torch.manual_seed(seed)  # also seeds every CUDA device (lazily when CUDA is not yet initialised)
        torch.cuda.manual_seed_all(seed)
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = not deterministic and torch.backends.cudnn.benchmark
    if transformers is not False:
        module = _optional("transformers")
        if module is not None:
            module.set_seed(seed)
        elif transformers:
            raise ImportError("seed_everything(transformers=True) but transformers is not installed")
    return state
