"""Small helpers shared by the plugin's tests."""

from __future__ import annotations

import functools
from pathlib import Path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes, to prove a folder was left untouched."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@functools.cache
def env_key() -> str:
    """The environment key this machine's CPU references are stored under (e.g. cpu-amd-avx512)."""
    from pytest_repro.manifest import collect_manifest, environment_key

    return environment_key(collect_manifest(), "cpu")
