"""Statistical equivalence of per-seed results: two one-sided t-tests (TOST), loss bands. Pure, no I/O."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .tolerances import Statistical

MAX_SEEDS = 2**40  # beyond this many seeds a margin is, in practice, unreachable


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
    paired: bool = False  # the same seeds on both sides: the test is on the per-seed differences
    seeds_needed: int | None = None  # seeds per side to establish a 0 difference within the margin (None: > MAX_SEEDS)

    @property
    def half_width(self) -> float:
        """Return the CI's half-width: no margin below it can be established, even for an unchanged result."""
        return (self.ci_high - self.ci_low) / 2

    @property
    def unresolved(self) -> bool:
        """True when the margin is below the resolution and the CI does not lie wholly outside ±margin."""
        outside = self.ci_low > self.margin or self.ci_high < -self.margin  # non-equivalence is established
        return not self.equivalent and not outside and self.margin <= self.half_width

    def describe(self) -> str:
        """Return the verdict in one line: both means, the difference with its CI, the margin."""
        level = 100 * (1 - 2 * (1 - self.confidence))
        verdict = "equivalent" if self.equivalent else "NOT equivalent"
        if self.unresolved:
            verdict = "UNRESOLVED (margin below what these seeds can resolve)"
        paired = ", paired by seed" if self.paired else ""
        return (
            f"{self.name}: reference mean {self.ref_mean:.6g} (n={self.n_ref}), this run mean {self.new_mean:.6g} "
            f"(n={self.n_new}), diff {self.diff:+.3g}, {level:.0f}% CI [{self.ci_low:+.3g}, {self.ci_high:+.3g}]"
            f"{paired}, margin ±{self.margin:.3g} -> {verdict} (TOST p={self.p_value:.3g})"
        )

    def explain_resolution(self) -> str:
        """Return why this margin cannot be established, and what would be needed."""
        level = 100 * (1 - 2 * (1 - self.confidence))
        if self.seeds_needed is not None:
            need = f"at this spread a margin of ±{self.margin:.3g} needs about {self.seeds_needed} seeds"
        else:
            need = f"at this spread a margin of ±{self.margin:.3g} needs more than {MAX_SEEDS:.2g} seeds"
        return (
            f"{self.name}: the margin ±{self.margin:.3g} is below what {self.n_new} seeds can resolve: their spread "
            f"gives a {level:.0f}% CI half-width of {self.half_width:.3g}, so no margin below ±{self.half_width:.3g} "
            f"can be established, even for an unchanged result; {need} (for a difference of 0). The difference "
            f"{self.diff:+.3g} cannot be told apart from ±{self.margin:.3g} here: this says neither that the code "
            "or data changed nor that they did not."
        )


def _seeds_needed(variance: float, margin: float, alpha: float, paired: bool) -> int | None:
    """Seeds per side for which t·SE < margin at the given per-seed variance (a difference of 0 established)."""
    from scipy import stats

    room = margin
    if room <= 0:
        return None

    def enough(n: int) -> bool:
        df = n - 1 if paired else 2 * n - 2
        return float(stats.t.ppf(1 - alpha, df)) * math.sqrt(variance / n) < room

    high = 2
    while not enough(high):  # t·SE falls monotonically with n: double, then bisect
        high *= 2
        if high > MAX_SEEDS:
            return None
    low = high // 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return max(high, 2)


def tost(
    name: str,
    reference: Sequence[float],
    new: Sequence[float],
    margin: float,
    confidence: float,
    *,
    paired: bool = False,
) -> Equivalence:
    """Two one-sided tests of H0: |mean(new) - mean(reference)| >= margin (Welch, or paired by seed)."""
    from scipy import stats

    if len(reference) < 2 or len(new) < 2:
        raise TooFewSeedsError(
            f"{name}: statistical equivalence needs at least 2 values on each side "
            f"(reference has {len(reference)}, this run has {len(new)})"
        )
    if paired and len(reference) != len(new):
        raise ValueError(f"{name}: a paired test needs as many values on each side ({len(reference)} vs {len(new)})")
    alpha = 1 - confidence
    m_ref, m_new = statistics.fmean(reference), statistics.fmean(new)
    diff = m_new - m_ref
    if paired:
        # The same seeds on both sides: what seed-to-seed variation the two share cancels out.
        d = [b - a for a, b in zip(reference, new, strict=True)]
        variance = statistics.variance(d)
        se = math.sqrt(variance / len(d))
        df = float(len(d) - 1)
    else:
        v_ref, v_new = statistics.variance(reference), statistics.variance(new)
        variance = v_ref + v_new
        df = 1.0
        se = math.sqrt(v_ref / len(reference) + v_new / len(new))
        if se > 0.0:
            # Welch-Satterthwaite degrees of freedom, computed scale-free so tiny variances do not underflow.
            a, b = v_ref / len(reference), v_new / len(new)
            top = max(a, b)
            a, b = a / top, b / top
            df = (a + b) ** 2 / (a**2 / (len(reference) - 1) + b**2 / (len(new) - 1))
    if se == 0.0:  # both sides constant (or a constant per-seed difference): the difference is known exactly
        equivalent = abs(diff) < margin
        ci_low = ci_high = diff
        p_value = 0.0 if equivalent else 1.0
    else:
        t_crit = float(stats.t.ppf(1 - alpha, df))
        ci_low, ci_high = diff - t_crit * se, diff + t_crit * se
        p_lower = float(stats.t.sf((diff + margin) / se, df))  # H0: diff <= -margin
        p_upper = float(stats.t.cdf((diff - margin) / se, df))  # H0: diff >= +margin
        p_value = max(p_lower, p_upper)
        equivalent = margin > 0 and p_value < alpha
    needed = None if equivalent or se == 0.0 else _seeds_needed(variance, margin, alpha, paired)
    return Equivalence(
        name,
        m_ref,
        m_new,
        len(reference),
        len(new),
        diff,
        ci_low,
        ci_high,
        margin,
        p_value,
        confidence,
        equivalent,
        paired,
        needed,
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
    reference: Sequence[Sequence[float]],
    new: Sequence[Sequence[float]],
    spec: Statistical,
    margins: Sequence[float] | None = None,
) -> BandExit | None:
    """Compare per-step mean loss across seeds with the reference band (mean ± margin ± t·SE).

    ``margins``: a measured margin per step (when the tolerance gives none).
    """
    from scipy import stats

    steps = min(min(len(t) for t in reference), min(len(t) for t in new))
    alpha = 1 - spec.confidence
    for step in range(steps):
        ref = [t[step] for t in reference]
        cur = [t[step] for t in new]
        m_ref, m_new = statistics.fmean(ref), statistics.fmean(cur)
        se = math.sqrt(statistics.variance(ref) / len(ref) + statistics.variance(cur) / len(cur))
        t_crit = float(stats.t.ppf(1 - alpha, len(ref) + len(cur) - 2)) if se > 0 else 0.0
        margin = margins[step] if margins is not None and step < len(margins) else spec.margin_for(m_ref)
        half = margin + t_crit * se
        if not m_ref - half <= m_new <= m_ref + half:
            return BandExit(step, m_new, m_ref - half, m_ref + half)
    return None


def _common_seeds(ref_seeds: object, new_seeds: object) -> tuple[list[int], list[int]] | None:
    """Positions of the seeds both sides ran (at least 2, each once), for a test paired by seed; else None."""
    if not isinstance(ref_seeds, list) or not isinstance(new_seeds, list):
        return None
    if len(set(ref_seeds)) != len(ref_seeds) or len(set(new_seeds)) != len(new_seeds):
        return None
    common = [seed for seed in new_seeds if seed in ref_seeds]
    if len(common) < 2:
        return None
    return [ref_seeds.index(seed) for seed in common], [new_seeds.index(seed) for seed in common]


def compare_statistical(
    reference: Mapping[str, object],
    new: Mapping[str, object],
    spec: Statistical,
    measured: tuple[Mapping[str, float], Sequence[float]] | None = None,
) -> tuple[list[Equivalence], BandExit | None]:
    """Compare per-seed metrics ({"metrics": {name: [values]}, "losses": [[...]]}) of reference and new runs.

    ``measured``: margins per metric and per loss step from the noise floor, used where the spec gives none.
    """
    ref_metrics: Mapping[str, Sequence[float]] = reference.get("metrics", {})  # type: ignore[assignment]
    new_metrics: Mapping[str, Sequence[float]] = new.get("metrics", {})  # type: ignore[assignment]
    names = spec.metrics or tuple(sorted(ref_metrics))
    pairs = _common_seeds(reference.get("seeds"), new.get("seeds"))
    results = []
    for name in names:
        if name not in ref_metrics or name not in new_metrics:
            raise KeyError(f"metric {name!r} is missing from the {'reference' if name not in ref_metrics else 'runs'}")
        ref_values, new_values = ref_metrics[name], new_metrics[name]
        if spec.margin is None:
            if measured is None or name not in measured[0]:
                raise KeyError(f"metric {name!r} has no measured noise floor to take its margin from")
            margin = measured[0][name]
        else:
            margin = spec.margin_for(statistics.fmean(ref_values))
        if pairs is not None and max(pairs[0]) < len(ref_values) and max(pairs[1]) < len(new_values):
            ref_pairs, new_pairs = [ref_values[i] for i in pairs[0]], [new_values[j] for j in pairs[1]]
            results.append(tost(name, ref_pairs, new_pairs, margin, spec.confidence, paired=True))
        else:
            results.append(tost(name, ref_values, new_values, margin, spec.confidence))
    band = None
    ref_losses: Sequence[Sequence[float]] = reference.get("losses", [])  # type: ignore[assignment]
    new_losses: Sequence[Sequence[float]] = new.get("losses", [])  # type: ignore[assignment]
    if spec.losses and ref_losses and new_losses and all(ref_losses) and all(new_losses):
        loss_margins = None
        if spec.margin is None:
            if measured is None:
                raise KeyError("the loss trace has no measured noise floor to take its margins from")
            loss_margins = measured[1]
        band = loss_band_exit(ref_losses, new_losses, spec, loss_margins)
    return results, band
