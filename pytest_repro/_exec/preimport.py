"""Importing the warm worker's preload list, and whether forking is still safe afterwards (worker side).

Imports only the standard library (what it imports on request is the point).
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import os
import sys
import threading
import time
from collections.abc import Sequence

from .protocol import PreloadResult


def log(message: str) -> None:
    """One line in the worker's log (its stderr)."""
    print(f"pytest-repro worker {os.getpid()}: {message}", file=sys.stderr, flush=True)


def _import_entry(entry: str) -> None:
    """Import ``module`` or ``module:name`` (the name resolved too: lazy modules such as transformers load it then)."""
    module, _, attr = entry.partition(":")
    mod = importlib.import_module(module)
    if attr:
        try:
            getattr(mod, attr)
        except AttributeError:
            importlib.import_module(f"{module}.{attr}")  # `from pkg import submodule`


def _is_missing(entry: str, exc: ModuleNotFoundError) -> bool:
    """Whether the error says the entry itself is not installed (rather than that importing it failed)."""
    module, _, attr = entry.partition(":")
    full = f"{module}.{attr}" if attr else module
    return bool(exc.name) and (full == exc.name or full.startswith(f"{exc.name}."))


def preload(entries: Sequence[str], checked: bool = False) -> PreloadResult:
    """Import the entries; return errors, the missing ones, and (``checked``) what made forking unsafe.

    Missing packages are skipped silently. With ``checked``, importing stops at the first entry after
    which CUDA is initialised or a Python thread is running (a forked child would inherit a broken
    CUDA context, or locks held by a thread it does not have).
    """
    errors: dict[str, str] = {}
    missing: list[str] = []
    tainted = culprit = ""
    threads = threading.active_count()
    for entry in entries:
        module, _, attr = entry.partition(":")
        if not attr and module in sys.modules:
            continue
        try:
            if importlib.util.find_spec(module.partition(".")[0]) is None:
                missing.append(entry)
                continue
            _import_entry(entry)
        except ModuleNotFoundError as exc:
            if _is_missing(entry, exc):
                missing.append(entry)
            else:
                errors[entry] = f"{type(exc).__name__}: {exc}"
        except AttributeError:
            missing.append(entry)  # `from pkg import name` of a name pkg does not have: the job fails on its own
        except (Exception, SystemExit) as exc:
            errors[entry] = f"{type(exc).__name__}: {exc}"
        if checked and cuda_initialised():
            tainted = f"importing {entry} initialised CUDA"
        elif checked and threading.active_count() > threads:
            tainted = f"importing {entry} started a thread"
        if tainted:
            culprit = entry
            break
    return {"errors": errors, "missing": missing, "tainted": tainted, "culprit": culprit}


def _summary(entries: Sequence[str]) -> str:
    """'torch (812), transformers (140), peft' style: the top-level packages of the entries, with counts."""
    counts: dict[str, int] = {}
    for entry in entries:
        top = entry.partition(":")[0].partition(".")[0]
        counts[top] = counts.get(top, 0) + 1
    return ", ".join(f"{top} ({n})" if n > 1 else top for top, n in sorted(counts.items()))


def preload_logged(entries: Sequence[str], when: str) -> PreloadResult:
    """Preload with the fork-safety checks and say in the worker's log what was imported and what was not."""
    started = time.perf_counter()
    before = len(sys.modules)
    # Garbage collection while importing thousands of modules rescans them all, over and over (~20% of the
    # import time of torch + transformers + peft); nothing cyclic worth collecting is made meanwhile.
    enabled = gc.isenabled()
    gc.disable()
    try:
        result = preload(entries, checked=True)
    finally:
        if enabled:
            gc.enable()
    bad = set(result["errors"]) | set(result["missing"])
    done = [e for e in entries if e not in bad]
    log(
        f"preloaded {len(done)} of {len(entries)} requested module(s) {when} in {time.perf_counter() - started:.2f} s "
        f"({len(sys.modules) - before} new in sys.modules): {_summary(done) or 'nothing'}"
    )
    for entry, error in result["errors"].items():
        log(f"could not preload {entry} (skipped; runs import it themselves): {error}")
    if result["missing"]:
        log(f"not installed, skipped: {', '.join(result['missing'])}")
    if result["tainted"]:
        log(f"stopped preloading: {result['tainted']}; forking is unsafe from now on")
    return result


def cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())
