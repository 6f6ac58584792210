"""pytest-repro: prove that model-training code still trains the same way."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "JobContext",
    "Record",
    "__version__",
    "collect_manifest",
    "diff_manifests",
    "noise",
    "seed_everything",
    "statistical",
]

if TYPE_CHECKING:
    from ._judge.drift import diff_manifests
    from ._judge.tolerances import noise, statistical
    from .context import JobContext
    from .manifest import collect_manifest
    from .record import Record
    from .seeding import seed_everything

_LAZY = {
    "seed_everything": "seeding",
    "collect_manifest": "manifest",
    "diff_manifests": "_judge.drift",
    "Record": "record",
    "JobContext": "context",
    "statistical": "_judge.tolerances",
    "noise": "_judge.tolerances",
}


def __getattr__(name: str) -> Any:
    """Import public names on first use so that loading the plugin stays cheap."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'pytest_repro' has no attribute {name!r}")
