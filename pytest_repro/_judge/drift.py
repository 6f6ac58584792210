"""Diff two environment manifests and classify each change: numeric (can change results), code or cosmetic."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..manifest import MANIFEST_KINDS, cpu_vendor

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
