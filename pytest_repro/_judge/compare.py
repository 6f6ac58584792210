"""Pure comparison of run records: what differs, where it first diverges, and by how much.

Losses and metrics are compared here, tensors by ``tensor_compare``. No I/O of its own: tensors of loaded
records (``StoredTensor``) are read chunk by chunk as compared.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from .difference import NAN_BOTH, Comparison, Difference, describe_nan_both
from .tensor_compare import compare_tensor, max_abs_diff
from .tolerances import SCALAR_DTYPE, Tolerance, ToleranceSpec

if TYPE_CHECKING:
    from ..record import Record
    from ..tensorfile import TensorLike


def _scalar_equal(a: float, b: float, tol: Tolerance) -> bool:
    if tol.kind == "bitwise":
        return struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))
    if math.isnan(a) or math.isnan(b):
        return tol.equal_nan and math.isnan(a) and math.isnan(b)
    if a == b:
        return True
    atol, rtol = tol.limits(SCALAR_DTYPE)
    return abs(a - b) <= atol + rtol * abs(b)


def _rel(diff: float, expected: float) -> float:
    if diff == 0:
        return 0.0
    return diff / abs(expected) if expected != 0 else math.inf


def _max(values: Sequence[float]) -> float:
    """The largest value, NaN if any is NaN (as a tensor's max)."""
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def _nan_in_both(a: float, b: float, tol: Tolerance) -> bool:
    return tol.kind != "bitwise" and not tol.equal_nan and math.isnan(a) and math.isnan(b)


def compare_losses(expected: Sequence[float], actual: Sequence[float], tol: Tolerance) -> list[Difference]:
    """Compare two loss traces step by step; report the first divergent step."""
    diffs: list[Difference] = []
    tdesc = tol.describe(SCALAR_DTYPE)
    common = min(len(expected), len(actual))
    bad = [i for i in range(common) if not _scalar_equal(actual[i], expected[i], tol)]
    if bad:
        nan_both = sum(_nan_in_both(expected[i], actual[i], tol) for i in bad)
        i = bad[0]
        d = abs(actual[i] - expected[i])
        steps_abs = [abs(actual[k] - expected[k]) for k in bad]
        steps_rel = [_rel(x, expected[k]) for x, k in zip(steps_abs, bad, strict=True)]
        diffs.append(
            Difference(
                "losses",
                None,
                "value",
                tdesc,
                step=i,
                expected=expected[i],
                actual=actual[i],
                n_diff=len(bad),
                numel=common,
                max_abs=_max(steps_abs),
                max_rel=_max(steps_rel),
                first_step_abs=d,
                first_step_rel=_rel(d, expected[i]),
                detail=describe_nan_both(nan_both, "step") if nan_both else "",
            )
        )
    if len(expected) != len(actual):
        diffs.append(
            Difference(
                "losses",
                None,
                "length",
                tdesc,
                detail=f"loss trace has {len(actual)} steps, expected {len(expected)}",
            )
        )
    return diffs


def compare_metrics(
    expected: Mapping[str, float], actual: Mapping[str, float], spec: ToleranceSpec
) -> list[Difference]:
    """Compare scalar metrics key by key."""
    diffs: list[Difference] = []
    for key, exp in expected.items():
        tol = spec.for_key("metrics", key)
        if key not in actual:
            diffs.append(
                Difference("metrics", key, "missing", tol.describe(SCALAR_DTYPE), detail="missing from this run")
            )
            continue
        act = actual[key]
        if not _scalar_equal(act, exp, tol):
            d = abs(act - exp)
            diffs.append(
                Difference(
                    "metrics",
                    key,
                    "value",
                    tol.describe(SCALAR_DTYPE),
                    expected=exp,
                    actual=act,
                    n_diff=1,
                    numel=1,
                    max_abs=d,
                    max_rel=_rel(d, exp),
                    detail=f"NaN in both ({NAN_BOTH})" if _nan_in_both(exp, act, tol) else "",
                )
            )
    for key in actual:
        if key not in expected:
            tol = spec.for_key("metrics", key)
            diffs.append(
                Difference("metrics", key, "extra", tol.describe(SCALAR_DTYPE), detail="not in the expected record")
            )
    return diffs


def compare_tensor_maps(
    section: str, expected: Mapping[str, TensorLike], actual: Mapping[str, TensorLike], spec: ToleranceSpec
) -> list[Difference]:
    """Compare two name->tensor maps in the expected map's (state-dict) order."""
    diffs: list[Difference] = []
    for pos, (key, exp) in enumerate(expected.items()):
        tol = spec.for_key(section, key)
        if key not in actual:
            diffs.append(
                Difference(section, key, "missing", tol.describe(), position=pos, detail="missing from this run")
            )
            continue
        d = compare_tensor(section, key, exp, actual[key], tol, position=pos)
        if d is not None:
            diffs.append(d)
    for key in actual:
        if key not in expected:
            tol = spec.for_key(section, key)
            diffs.append(Difference(section, key, "extra", tol.describe(), detail="not in the expected record"))
    return diffs


def compare_records(expected: Record, actual: Record, spec: ToleranceSpec) -> Comparison:
    """Compare two records section by section (and rank by rank), under a tolerance spec."""
    diffs = compare_losses(expected.losses, actual.losses, spec.for_key("losses"))
    diffs += compare_tensor_maps("weights", expected.weights, actual.weights, spec)
    diffs += compare_metrics(expected.metrics, actual.metrics, spec)
    diffs += compare_tensor_maps("outputs", expected.outputs, actual.outputs, spec)
    if not (expected.ranks or actual.ranks):
        return Comparison(tuple(diffs))
    diffs = [replace(d, rank=0) for d in diffs]  # several ranks: every line names its rank
    for rank in sorted(set(expected.ranks) | set(actual.ranks)):
        if rank not in expected.ranks or rank not in actual.ranks:
            missing = "this run" if rank not in actual.ranks else "the expected record"
            diffs.append(
                Difference("ranks", None, "missing", "-", detail=f"no record of rank {rank} in {missing}", rank=rank)
            )
            continue
        other = compare_records(expected.ranks[rank], actual.ranks[rank], spec)
        diffs += [replace(d, rank=rank) for d in other.differences]
    return Comparison(tuple(diffs))


def section_max_abs(expected: Record, actual: Record, *, chunk_elements: int | None = None) -> dict[str, float]:
    """Return the largest absolute difference per section, whatever the tolerance (NaN where shapes differ)."""

    def tensors(a: Mapping[str, TensorLike], b: Mapping[str, TensorLike]) -> float:
        worst = 0.0
        for key, exp in a.items():
            act = b.get(key)
            if act is None or act.shape != exp.shape:
                return math.nan
            if exp.numel():
                diff = max_abs_diff(exp, act, chunk_elements=chunk_elements)
                if math.isnan(diff):
                    return math.nan
                worst = max(worst, diff)
        return worst

    steps = list(zip(expected.losses, actual.losses, strict=False))
    losses = (
        max((abs(a - b) for a, b in steps), default=0.0) if len(expected.losses) == len(actual.losses) else math.nan
    )
    metrics = max((abs(actual.metrics[k] - v) for k, v in expected.metrics.items() if k in actual.metrics), default=0.0)
    return {
        "losses": losses,
        "weights": tensors(expected.weights, actual.weights),
        "metrics": metrics,
        "outputs": tensors(expected.outputs, actual.outputs),
    }
