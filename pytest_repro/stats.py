"""Statistical equivalence of per-seed results: two one-sided t-tests (TOST), loss bands. Pure, no I/O."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .tolerances import Statistical


class TooFewSeedsError(ValueError):
    """Not enough per-seed values to estimate a spread at the requested confidence."""


@dataclass(frozen=True)
class Equivalence:
    """The outcome of one TOST: is the new mean within ±margin of the reference mean?"""

    name: str
    ref_mean: float
    new_mean: float
    n_ref: int
    n_new: int
    diff: float
    ci_low: float
    ci_high: float
    margin: float
    p_value: float
    confidence: float
    equivalent: bool

    def describe(self) -> str:
        """Return the verdict in one line: both means, the difference with its CI, the margin."""
        level = 100 * (1 - 2 * (1 - self.confidence))
        verdict = "equivalent" if self.equivalent else "NOT equivalent"
        return (
            f"{self.name}: reference mean {self.ref_mean:.6g} (n={self.n_ref}), this run mean {self.new_mean:.6g} "
            f"(n={self.n_new}), diff {self.diff:+.3g}, {level:.0f}% CI [{self.ci_low:+.3g}, {self.ci_high:+.3g}], "
            f"margin ±{self.margin:.3g} -> {verdict} (TOST p={self.p_value:.3g})"
        )


def tost(name: str, reference: Sequence[float], new: Sequence[float], margin: float, confidence: float) -> Equivalence:
    """Welch two one-sided tests of H0: |mean(new) - mean(reference)| >= margin, at the given confidence."""
    from scipy import stats

    if len(reference) < 2 or len(new) < 2:
        raise TooFewSeedsError(
            f"{name}: statistical equivalence needs at least 2 values on each side "
            f"(reference has {len(reference)}, this run has {len(new)})"
        )
    alpha = 1 - confidence
    m_ref, m_new = statistics.fmean(reference), statistics.fmean(new)
    v_ref, v_new = statistics.variance(reference), statistics.variance(new)
    diff = m_new - m_ref
    se = math.sqrt(v_ref / len(reference) + v_new / len(new))
    if se == 0.0:  # both sides constant: the difference is known exactly
        equivalent = abs(diff) < margin
        ci_low = ci_high = diff
        p_value = 0.0 if equivalent else 1.0
    else:
        # Welch-Satterthwaite degrees of freedom, computed scale-free so tiny variances do not underflow.
        a, b = v_ref / len(reference), v_new / len(new)
        top = max(a, b)
        a, b = a / top, b / top
        df = (a + b) ** 2 / (a**2 / (len(reference) - 1) + b**2 / (len(new) - 1))
        t_crit = float(stats.t.ppf(1 - alpha, df))
        ci_low, ci_high = diff - t_crit * se, diff + t_crit * se
        p_lower = float(stats.t.sf((diff + margin) / se, df))  # H0: diff <= -margin
        p_upper = float(stats.t.cdf((diff - margin) / se, df))  # H0: diff >= +margin
        p_value = max(p_lower, p_upper)
        equivalent = margin > 0 and p_value < alpha
    return Equivalence(
        name, m_ref, m_new, len(reference), len(new), diff, ci_low, ci_high, margin, p_value, confidence, equivalent
    )


@dataclass(frozen=True)
class BandExit:
    """The first step where the new mean loss leaves the reference band."""

    step: int
    new_mean: float
    low: float
    high: float

    def describe(self) -> str:
        """Return one line naming the step and the band."""
        return (
            f"losses: the mean loss leaves the reference band first at step {self.step}: "
            f"{self.new_mean:.6g} not in [{self.low:.6g}, {self.high:.6g}]"
        )


def loss_band_exit(
    reference: Sequence[Sequence[float]], new: Sequence[Sequence[float]], spec: Statistical
) -> BandExit | None:
    """Compare per-step mean loss across seeds with the reference band (mean ± margin ± t·SE)."""
    from scipy import stats

    steps = min(min(len(t) for t in reference), min(len(t) for t in new))
    alpha = 1 - spec.confidence
    for step in range(steps):
        ref = [t[step] for t in reference]
        cur = [t[step] for t in new]
        m_ref, m_new = statistics.fmean(ref), statistics.fmean(cur)
        se = math.sqrt(statistics.variance(ref) / len(ref) + statistics.variance(cur) / len(cur))
        t_crit = float(stats.t.ppf(1 - alpha, len(ref) + len(cur) - 2)) if se > 0 else 0.0
        half = spec.margin_for(m_ref) + t_crit * se
        if not m_ref - half <= m_new <= m_ref + half:
            return BandExit(step, m_new, m_ref - half, m_ref + half)
    return None


def compare_statistical(
    reference: Mapping[str, object], new: Mapping[str, object], spec: Statistical
) -> tuple[list[Equivalence], BandExit | None]:
    """Compare per-seed metrics ({"metrics": {name: [values]}, "losses": [[...]]}) of reference and new runs."""
    ref_metrics: Mapping[str, Sequence[float]] = reference.get("metrics", {})  # type: ignore[assignment]
    new_metrics: Mapping[str, Sequence[float]] = new.get("metrics", {})  # type: ignore[assignment]
    names = spec.metrics or tuple(sorted(ref_metrics))
    results = []
    for name in names:
        if name not in ref_metrics or name not in new_metrics:
            raise KeyError(f"metric {name!r} is missing from the {'reference' if name not in ref_metrics else 'runs'}")
        ref_values, new_values = ref_metrics[name], new_metrics[name]
        results.append(
            tost(name, ref_values, new_values, spec.margin_for(statistics.fmean(ref_values)), spec.confidence)
        )
    band = None
    ref_losses: Sequence[Sequence[float]] = reference.get("losses", [])  # type: ignore[assignment]
    new_losses: Sequence[Sequence[float]] = new.get("losses", [])  # type: ignore[assignment]
    if spec.losses and ref_losses and new_losses and all(ref_losses) and all(new_losses):
        band = loss_band_exit(ref_losses, new_losses, spec)
    return results, band


def spread(values: Sequence[float]) -> float:
    """Return max - min."""
    return max(values) - min(values) if values else 0.0
