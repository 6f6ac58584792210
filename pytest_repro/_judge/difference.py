"""What two records disagree on: one Difference per place, a Comparison of them all, and their wording."""

from __future__ import annotations

from dataclasses import dataclass


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
    max_abs: float = 0.0  # the largest |actual - expected| among the steps/elements that differ
    max_rel: float = 0.0
    first_step_abs: float | None = None  # losses: |actual - expected| at the first divergent step
    first_step_rel: float | None = None
    position: int | None = None  # position of the tensor in state-dict order
    detail: str = ""
    rank: int | None = None  # jobs on several ranks: which rank's record differs

    def describe(self, expected_label: str = "expected", actual_label: str = "actual") -> str:
        """Return one human-readable line for this difference."""
        line = self._describe(expected_label, actual_label)
        return line if self.rank is None else f"rank {self.rank}: {line}"

    def _describe(self, expected_label: str, actual_label: str) -> str:
        where = self.section if self.key is None else f"{self.section}[{self.key!r}]"
        if self.kind != "value":
            return f"{where}: {self.detail} [tolerance: {self.tolerance}]"
        tol = f"{'; ' + self.detail if self.detail else ''} [tolerance: {self.tolerance}]"
        if self.section == "losses":
            return (
                f"losses: first divergent step {self.step}: {expected_label} {self.expected!r}, "
                f"{actual_label} {self.actual!r}, abs diff {_g(self.first_step_abs)}, "
                f"rel diff {_g(self.first_step_rel)}; {self.n_diff} of {self.numel} steps differ, "
                f"max abs diff {_g(self.max_abs)}, max rel diff {_g(self.max_rel)}{tol}"
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


def _g(x: float | None) -> str:
    return "?" if x is None else f"{x:.3g}"


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
        by_section: dict[tuple[int | None, str], list[Difference]] = {}
        for d in self.differences:
            by_section.setdefault((d.rank, d.section), []).append(d)
        for (_, section), diffs in by_section.items():
            lines.append("  " + diffs[0].describe(expected_label, actual_label))
            rest = diffs[1:]
            shown = rest[: max(0, limit - 1)]
            lines += ["    also " + d.describe(expected_label, actual_label) for d in shown]
            if len(rest) > len(shown):
                lines.append(f"    … and {len(rest) - len(shown)} more in {section}")
        return "\n".join(lines)


NAN_BOTH = "NaN != NaN unless the tolerance sets equal_nan: true"


def describe_nan_both(n: int, unit: str = "element") -> str:
    """Say how many elements (or steps) are NaN in both records: differences unless the tolerance sets equal_nan."""
    verb = "is" if n == 1 else "are"
    return f"{n} {unit}{'' if n == 1 else 's'} {verb} NaN in both ({NAN_BOTH})"
