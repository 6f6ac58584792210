"""This repository's committed references were recorded consistently: a clean tree, one commit, no overrides."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1] / "reference_outputs"
# What the harness itself sets in a job process; anything else came from the recording shell.
HARNESS_ENV = {
    "CUBLAS_WORKSPACE_CONFIG",
    "MKL_NUM_THREADS",
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "PYTHONHASHSEED",
    "PYTORCH_NVML_BASED_CUDA_CHECK",
}


def test_committed_references_come_from_one_clean_commit_per_environment_without_overrides() -> None:
    manifests = sorted(ROOT.rglob("manifest.yaml"))
    assert manifests, "no committed references found"
    commits: dict[str, set[str]] = defaultdict(set)
    for path in manifests:
        manifest = yaml.safe_load(path.read_text(encoding="utf-8"))
        where = path.relative_to(ROOT).parent
        assert manifest["git"]["dirty"] is False, f"{where} was recorded from a dirty tree"
        extra = sorted(set(manifest.get("env") or {}) - HARNESS_ENV)
        assert not extra, f"{where} was recorded with environment overrides {extra}"
        commits[where.name].add(manifest["git"]["commit"])
    for env_key, seen in commits.items():
        assert len(seen) == 1, f"the {env_key} references were recorded at {len(seen)} commits: {sorted(seen)}"
