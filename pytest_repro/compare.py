"""Pure comparison of run records: what differs, where it first diverges, and by how much. No I/O."""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .tolerances import SCALAR_DTYPE, Tolerance, ToleranceSpec

if TYPE_CHECKING:
    import torch

    from .record import Record


@dataclass(frozen=True)
class Difference:
    """One place where two records disagree beyond tolerance."""

    section: str
    key: str | None
    kind: str  # "value", "length", "missing", "extra", "shape", "dtype"
    tolerance: str
    step: int | None = None
    expected: float | None = None
    actual: float | None = None
    index: tuple[int, ...] | None = None
    n_diff: int = 0
    numel: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    position: int | None = None  # position of the tensor in state-dict order
    detail: str = ""

    def describe(self, expected_label: str = "expected", actual_label: str = "actual") -> str:
        """Return one human-readable line for this difference."""
        tol = f" [tolerance: {self.tolerance}]"
        where = self.section if self.key is None else f"{self.section}[{self.key!r}]"
        if self.kind != "value":
            return f"{where}: {self.detail}{tol}"
        if self.section == "losses":
            return (
                f"losses: first divergent step {self.step}: {expected_label} {self.expected!r}, "
                f"{actual_label} {self.actual!r}, abs diff {_g(self.max_abs)}, rel diff {_g(self.max_rel)}; "
                f"{self.n_diff} of {self.numel} steps differ{tol}"
            )
        if self.section == "metrics":
            return (
                f"{where}: {expected_label} {self.expected!r}, {actual_label} {self.actual!r}, "
                f"abs diff {_g(self.max_abs)}, rel diff {_g(self.max_rel)}{tol}"
            )
        pct = 100.0 * self.n_diff / self.numel if self.numel else 0.0
        order = "in state-dict order" if self.section == "weights" else f"in {self.section}"
        pos = "" if self.position is None else f" (tensor {self.position + 1} {order})"
        at = "" if self.index is None else f", first at index {self.index}"
        return (
            f"{where}{pos}: {self.n_diff} of {self.numel} elements differ ({pct:.3g}%), "
            f"max abs diff {_g(self.max_abs)}, max rel diff {_g(self.max_rel)}{at}{tol}"
        )


def _g(x: float) -> str:
    return f"{x:.3g}"


@dataclass(frozen=True)
class Comparison:
    """The outcome of comparing two records."""

    differences: tuple[Difference, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether the records agree within tolerance everywhere."""
        return not self.differences

    def first(self, section: str) -> Difference | None:
        """Return the first difference in a section, or None."""
        return next((d for d in self.differences if d.section == section), None)

    def describe(self, expected_label: str = "expected", actual_label: str = "actual", limit: int = 8) -> str:
        """Return the differences as lines, the first of each section first."""
        lines: list[str] = []
        by_section: dict[str, list[Difference]] = {}
        for d in self.differences:
            by_section.setdefault(d.section, []).append(d)
        for section, diffs in by_section.items():
            lines.append("  " + diffs[0].describe(expected_label, actual_label))
            rest = diffs[1:]
            shown = rest[: max(0, limit - 1)]
            lines += ["    also " + d.describe(expected_label, actual_label) for d in shown]
            if len(rest) > len(shown):
                lines.append(f"    … and {len(rest) - len(shown)} more in {section}")
        return "\n".join(lines)


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


def compare_losses(expected: Sequence[float], actual: Sequence[float], tol: Tolerance) -> list[Difference]:
    """Compare two loss traces step by step; report the first divergent step."""
    diffs: list[Difference] = []
    common = min(len(expected), len(actual))
    bad = [i for i in range(common) if not _scalar_equal(actual[i], expected[i], tol)]
    if bad:
        i = bad[0]
        d = abs(actual[i] - expected[i])
        diffs.append(
            Difference(
                "losses",
                None,
                "value",
                tol.describe(),
                step=i,
                expected=expected[i],
                actual=actual[i],
                n_diff=len(bad),
                numel=common,
                max_abs=d,
                max_rel=_rel(d, expected[i]),
            )
        )
    if len(expected) != len(actual):
        diffs.append(
            Difference(
                "losses",
                None,
                "length",
                tol.describe(),
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
            diffs.append(Difference("metrics", key, "missing", tol.describe(), detail="missing from this run"))
            continue
        act = actual[key]
        if not _scalar_equal(act, exp, tol):
            d = abs(act - exp)
            diffs.append(
                Difference(
                    "metrics",
                    key,
                    "value",
                    tol.describe(),
                    expected=exp,
                    actual=act,
                    n_diff=1,
                    numel=1,
                    max_abs=d,
                    max_rel=_rel(d, exp),
                )
            )
    for key in actual:
        if key not in expected:
            tol = spec.for_key("metrics", key)
            diffs.append(Difference("metrics", key, "extra", tol.describe(), detail="not in the expected record"))
    return diffs


def _bits(t: torch.Tensor) -> torch.Tensor:
    import torch

    int_of_size = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    size = t.element_size()
    if t.dtype.is_complex:
        t = torch.view_as_real(t)
        size //= 2
    return t.view(int_of_size[size]) if t.dim() else t.reshape(1).view(int_of_size[size])


def compare_tensor(
    section: str, key: str, expected: torch.Tensor, actual: torch.Tensor, tol: Tolerance, position: int | None = None
) -> Difference | None:
    """Compare two tensors under a tolerance; return None when they agree."""
    import torch

    dtype = str(expected.dtype).replace("torch.", "")
    tdesc = tol.describe(dtype)
    if expected.shape != actual.shape:
        return Difference(
            section,
            key,
            "shape",
            tdesc,
            position=position,
            detail=f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}",
        )
    if expected.dtype != actual.dtype:
        return Difference(
            section, key, "dtype", tdesc, position=position, detail=f"dtype {actual.dtype}, expected {expected.dtype}"
        )
    numel = expected.numel()
    if numel == 0:
        return None
    if tol.kind == "bitwise":
        bad = (_bits(expected) != _bits(actual)).reshape(-1)
        if bad.dim() and bad.numel() != numel:  # complex: real/imag pairs
            bad = bad.reshape(numel, -1).any(dim=1)
    else:
        atol, rtol = tol.limits(dtype)
        e = expected.reshape(-1).to(torch.complex128 if expected.dtype.is_complex else torch.float64)
        a = actual.reshape(-1).to(e.dtype)
        close = (a == e) | ((a - e).abs() <= atol + rtol * e.abs())
        if tol.equal_nan:
            close |= e.isnan() & a.isnan()
        bad = ~close
    n_diff = int(bad.sum())
    if n_diff == 0:
        return None
    flat_first = int(torch.nonzero(bad)[0, 0])
    index = (
        tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_first), expected.shape)) if expected.dim() else ()
    )
    e64 = expected.reshape(-1)[bad].to(torch.complex128 if expected.dtype.is_complex else torch.float64)
    a64 = actual.reshape(-1)[bad].to(e64.dtype)
    absdiff = (a64 - e64).abs()
    max_abs = float(absdiff.max()) if not absdiff.isnan().any() else math.nan
    with torch.no_grad():
        rel = torch.where(e64.abs() > 0, absdiff / e64.abs(), torch.where(absdiff > 0, math.inf, 0.0))
    max_rel = float(rel.max()) if not rel.isnan().any() else math.nan
    return Difference(
        section,
        key,
        "value",
        tdesc,
        index=index,
        n_diff=n_diff,
        numel=numel,
        max_abs=max_abs,
        max_rel=max_rel,
        position=position,
    )


def compare_tensor_maps(
    section: str, expected: Mapping[str, torch.Tensor], actual: Mapping[str, torch.Tensor], spec: ToleranceSpec
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
    """Compare two records section by section under a tolerance spec."""
    diffs = compare_losses(expected.losses, actual.losses, spec.for_key("losses"))
    diffs += compare_tensor_maps("weights", expected.weights, actual.weights, spec)
    diffs += compare_metrics(expected.metrics, actual.metrics, spec)
    diffs += compare_tensor_maps("outputs", expected.outputs, actual.outputs, spec)
    return Comparison(tuple(diffs))


def section_max_abs(expected: Record, actual: Record) -> dict[str, float]:
    """Return the largest absolute difference per section, whatever the tolerance (NaN where shapes differ)."""
    import torch

    def tensors(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
        worst = 0.0
        for key, exp in a.items():
            act = b.get(key)
            if act is None or act.shape != exp.shape:
                return math.nan
            if exp.numel():
                diff = (act.to(torch.float64) - exp.to(torch.float64)).abs().max()
                worst = max(worst, float(diff)) if not diff.isnan() else math.nan
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
