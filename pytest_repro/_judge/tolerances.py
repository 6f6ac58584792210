"""Tolerance values and their parsing: bitwise, close (dtype-aware), explicit atol/rtol, per-key maps."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

SECTIONS: tuple[str, ...] = ("losses", "weights", "metrics", "outputs")

# Same defaults as torch.testing.assert_close (rtol, atol), keyed by dtype name.
_CLOSE_DEFAULTS: dict[str, tuple[float, float]] = {
    "float16": (1e-3, 1e-5),
    "bfloat16": (1.6e-2, 1e-5),
    "float32": (1.3e-6, 1e-5),
    "float64": (1e-7, 1e-7),
    "complex32": (1e-3, 1e-5),
    "complex64": (1.3e-6, 1e-5),
    "complex128": (1e-7, 1e-7),
}
# Python floats in loss traces and metrics come from float32 training: use float32 defaults.
SCALAR_DTYPE = "float32"

ACCEPTED_FORMS = (
    '"bitwise", "close", {"atol": A, "rtol": R} (either may be omitted, meaning 0), '
    "or a map from section (losses/weights/metrics/outputs/default) to one of those "
    'or to a map from key (glob patterns allowed) to one of those; or, for the whole record, "noise"'
)


class ToleranceError(ValueError):
    """A tolerance specification that cannot be parsed."""


@dataclass(frozen=True)
class Tolerance:
    """How closely two values must agree."""

    kind: Literal["bitwise", "close", "explicit"] = "bitwise"
    atol: float = 0.0
    rtol: float = 0.0
    equal_nan: bool = False

    def limits(self, dtype: str) -> tuple[float, float]:
        """Return (atol, rtol) for values of the given dtype name."""
        if self.kind == "close":
            rtol, atol = _CLOSE_DEFAULTS.get(dtype.replace("torch.", ""), (0.0, 0.0))
            return atol, rtol
        return self.atol, self.rtol

    def describe(self, dtype: str = SCALAR_DTYPE) -> str:
        """Return a short human-readable form, e.g. 'bitwise' or 'atol=1e-05, rtol=1.3e-06'."""
        if self.kind == "bitwise":
            return "bitwise"
        atol, rtol = self.limits(dtype)
        prefix = "close: " if self.kind == "close" else ""
        return f"{prefix}atol={atol:g}, rtol={rtol:g}"


BITWISE = Tolerance("bitwise")
CLOSE = Tolerance("close")


@dataclass(frozen=True)
class SectionTolerance:
    """Tolerances for one record section: per-key patterns, then a section default."""

    default: Tolerance | None = None
    per_key: tuple[tuple[str, Tolerance], ...] = ()

    def lookup(self, key: str) -> Tolerance | None:
        """Return the tolerance for ``key``: exact key first, then glob patterns in order."""
        for pattern, tol in self.per_key:
            if pattern == key:
                return tol
        for pattern, tol in self.per_key:
            if fnmatch.fnmatchcase(key, pattern):
                return tol
        return self.default


@dataclass(frozen=True)
class Statistical:
    """Statistical equivalence over several seeded runs (TOST), instead of value-by-value equality."""

    metrics: tuple[str, ...] = ()  # empty: every metric
    seeds: int = 5
    margin: float | None = None  # None: k x the measured noise floor of each metric and loss step
    relative: bool = False  # margin is a fraction of |reference mean|
    confidence: float = 0.95
    losses: bool = True  # also compare the per-step loss band
    same_seed: bool = False  # N runs with the same seed: their spread must stay within the margin

    def margin_for(self, reference_mean: float) -> float:
        """Return the absolute equivalence margin around a reference mean (a given margin only)."""
        if self.margin is None:
            raise ValueError("this statistical tolerance takes its margins from the measured noise floor")
        return self.margin * abs(reference_mean) if self.relative else self.margin

    def describe(self) -> str:
        """Return a short human-readable form."""
        if self.margin is None:
            margin = "measured (6 x the noise floor of each value)"
        else:
            margin = f"{self.margin:g} relative" if self.relative else f"±{self.margin:g}"
        kind = "same seed" if self.same_seed else "seeds"
        return f"statistical: {self.seeds} {kind}, margin {margin}, confidence {self.confidence:g}"


@dataclass(frozen=True)
class Noise:
    """Noise-aware: each difference within ``k`` x this environment's measured noise floor (``_judge/noise.py``)."""

    k: float = 6.0  # noise.DEFAULT_K
    runs: int = 2  # perturbed runs that measure the floor (noise.DEFAULT_RUNS)

    def describe(self) -> str:
        """Return a short human-readable form."""
        return f"noise-aware: within {self.k:g} x the measured noise floor ({self.runs} perturbed runs)"


_NOISE_KEYS = {"mode", "k", "runs"}
MAX_NOISE_RUNS = 100


def noise(k: float = 6.0, runs: int = 2) -> dict[str, Any]:
    """Return a noise-aware tolerance for ``@pytest.mark.reproducible(tolerance=...)`` or ``cross_env=``."""
    return {"mode": "noise", "k": k, "runs": runs}


def _parse_noise(value: Mapping[str, Any], where: str) -> Noise:
    unknown = sorted(set(value) - _NOISE_KEYS)
    if unknown:
        raise ToleranceError(f"{where}: unknown key(s) {unknown} for mode noise; allowed: {sorted(_NOISE_KEYS)}")
    k, runs = value.get("k", Noise.k), value.get("runs", Noise.runs)
    if isinstance(k, str):  # an ini's YAML reads 1e-3 as text
        try:
            k = float(k)
        except ValueError:
            raise ToleranceError(f"{where}.k: expected a number, got {k!r}") from None
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k < math.inf:
        raise ToleranceError(
            f"{where}.k: expected a finite number > 0 (how many noise floors a difference may be), got {k!r}"
        )
    if isinstance(runs, bool) or not isinstance(runs, int) or not 2 <= runs <= MAX_NOISE_RUNS:
        raise ToleranceError(
            f"{where}.runs: a noise floor needs 2 to {MAX_NOISE_RUNS} perturbed runs (one can land on the reference "
            f"by chance), got {runs!r}"
        )
    return Noise(float(k), runs)


_STAT_KEYS = {"mode", "metrics", "seeds", "margin", "relative", "confidence", "losses", "same_seed"}


def statistical(
    metrics: tuple[str, ...] | list[str] = (),
    seeds: int = 5,
    margin: float | None = None,
    relative: bool = False,
    confidence: float = 0.95,
    losses: bool = True,
    same_seed: bool = False,
) -> dict[str, Any]:
    """Return a statistical tolerance for ``@pytest.mark.reproducible(tolerance=...)``."""
    return {
        "mode": "statistical",
        "metrics": list(metrics),
        "seeds": seeds,
        "margin": margin,
        "relative": relative,
        "confidence": confidence,
        "losses": losses,
        "same_seed": same_seed,
    }


def _parse_statistical(value: Mapping[str, Any], where: str) -> Statistical:
    unknown = sorted(set(value) - _STAT_KEYS)
    if unknown:
        raise ToleranceError(f"{where}: unknown key(s) {unknown} for mode statistical; allowed: {sorted(_STAT_KEYS)}")
    metrics = value.get("metrics", ())
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    seeds, margin, confidence = value.get("seeds", 5), value.get("margin"), value.get("confidence", 0.95)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 2:
        raise ToleranceError(
            f"{where}.seeds: statistical mode needs at least 2 runs to estimate a spread, got {seeds!r} "
            "(use 5 or more for a 95% confidence level to mean much)"
        )
    if margin is not None and (
        isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < math.inf
    ):
        raise ToleranceError(
            f"{where}.margin: expected a finite number >= 0, or none for k x the measured noise floor, got {margin!r}"
        )
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.5 < confidence < 1:
        raise ToleranceError(f"{where}.confidence: expected a number between 0.5 and 1, got {confidence!r}")
    flags = {k: value.get(k, d) for k, d in (("relative", False), ("losses", True), ("same_seed", False))}
    for k, v in flags.items():
        if not isinstance(v, bool):
            raise ToleranceError(f"{where}.{k}: expected true or false, got {v!r}")
    return Statistical(
        tuple(str(m) for m in metrics),
        seeds,
        None if margin is None else float(margin),
        flags["relative"],
        float(confidence),
        flags["losses"],
        flags["same_seed"],
    )


@dataclass(frozen=True)
class ToleranceSpec:
    """A full tolerance specification for a record."""

    default: Tolerance = BITWISE
    sections: tuple[tuple[str, SectionTolerance], ...] = field(default=())
    statistical: Statistical | None = None
    noise: Noise | None = None

    def for_key(self, section: str, key: str | None = None) -> Tolerance:
        """Return the tolerance that applies to ``key`` in ``section``."""
        for name, sec in self.sections:
            if name == section:
                found = sec.lookup(key) if key is not None else sec.default
                if found is not None:
                    return found
        return self.default

    @property
    def is_bitwise(self) -> bool:
        """Whether every part of the spec is bitwise."""
        parts = [self.default]
        for _, sec in self.sections:
            parts += [t for _, t in sec.per_key]
            if sec.default is not None:
                parts.append(sec.default)
        return all(t.kind == "bitwise" for t in parts)


def _parse_single(value: Any, where: str) -> Tolerance | None:
    """Parse a single tolerance value, or return None if ``value`` is a per-key map."""
    if isinstance(value, Tolerance):
        return value
    if isinstance(value, str):
        if value == "bitwise":
            return BITWISE
        if value == "close":
            return CLOSE
        if value == "noise":
            raise ToleranceError(
                f"{where}: 'noise' judges the whole record against one measured floor: give it as the whole "
                "tolerance (tolerance='noise' or cross_env='noise', or pytest_repro.noise(k=...)), not per section"
            )
        raise ToleranceError(f"{where}: unknown tolerance {value!r}; accepted: {ACCEPTED_FORMS}")
    if isinstance(value, Mapping):
        keys = set(value)
        if keys and keys <= {"atol", "rtol", "equal_nan"}:
            numbers: dict[str, float] = {}
            for name in ("atol", "rtol"):
                raw = value.get(name, 0.0)
                if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                    raise ToleranceError(f"{where}.{name}: expected a number >= 0, got {raw!r}")
                if not math.isfinite(raw) or raw < 0:
                    raise ToleranceError(f"{where}.{name}: expected a finite number >= 0, got {raw!r}")
                numbers[name] = float(raw)
            equal_nan = value.get("equal_nan", False)
            if not isinstance(equal_nan, bool):
                raise ToleranceError(f"{where}.equal_nan: expected true or false, got {equal_nan!r}")
            return Tolerance("explicit", numbers["atol"], numbers["rtol"], equal_nan)
        return None
    raise ToleranceError(f"{where}: expected a tolerance, got {value!r}; accepted: {ACCEPTED_FORMS}")


def _parse_section(value: Any, where: str) -> SectionTolerance:
    single = _parse_single(value, where)
    if single is not None:
        return SectionTolerance(default=single)
    per_key: list[tuple[str, Tolerance]] = []
    default: Tolerance | None = None
    for key, sub in value.items():
        if not isinstance(key, str):
            raise ToleranceError(f"{where}: keys must be strings, got {key!r}")
        tol = _parse_single(sub, f"{where}.{key}")
        if tol is None:
            raise ToleranceError(f"{where}.{key}: expected a tolerance, got a nested map {sub!r}")
        if key == "default":
            default = tol
        else:
            per_key.append((key, tol))
    return SectionTolerance(default=default, per_key=tuple(per_key))


def parse_tolerance(value: Any, where: str = "tolerance") -> ToleranceSpec:
    """Parse a marker/ini tolerance value into a ToleranceSpec; raise ToleranceError on bad input."""
    if value is None:
        return ToleranceSpec()
    if isinstance(value, ToleranceSpec):
        return value
    if isinstance(value, Statistical):
        return ToleranceSpec(statistical=value)
    if isinstance(value, Noise):
        return ToleranceSpec(default=CLOSE, noise=value)
    if value == "noise":
        return ToleranceSpec(default=CLOSE, noise=Noise())
    if isinstance(value, Mapping) and value.get("mode") is not None:
        if value["mode"] == "noise":
            return ToleranceSpec(default=CLOSE, noise=_parse_noise(value, where))
        if value["mode"] != "statistical":
            raise ToleranceError(
                f"{where}.mode: unknown mode {value['mode']!r}; the modes are 'statistical' and 'noise'"
            )
        return ToleranceSpec(statistical=_parse_statistical(value, where))
    single = _parse_single(value, where)
    if single is not None:
        return ToleranceSpec(default=single)
    unknown = [k for k in value if k not in (*SECTIONS, "default")]
    if unknown:
        import difflib

        hints = [
            f"did you mean {close[0]!r} for {k!r}?"
            for k in unknown
            if (close := difflib.get_close_matches(str(k), [*SECTIONS, "default"], n=1, cutoff=0.6))
        ]
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise ToleranceError(
            f"{where}: unknown section(s) {', '.join(map(repr, unknown))}{hint}; "
            f"expected one of {', '.join(SECTIONS)} or 'default'; accepted: {ACCEPTED_FORMS}"
        )
    default = BITWISE
    sections: list[tuple[str, SectionTolerance]] = []
    for key, sub in value.items():
        if key == "default":
            parsed = _parse_single(sub, f"{where}.default")
            if parsed is None:
                raise ToleranceError(f"{where}.default: expected a single tolerance, got {sub!r}")
            default = parsed
        else:
            sections.append((key, _parse_section(sub, f"{where}.{key}")))
    return ToleranceSpec(default=default, sections=tuple(sections))


_KEY_NOUNS = {"weights": "weight", "metrics": "metric", "outputs": "output"}


def unmatched_keys(spec: ToleranceSpec, keys: Mapping[str, set[str]]) -> list[str]:
    """Say which per-key entries of ``spec`` name no key the job returned (``keys``: section -> its keys)."""
    import difflib

    problems = []
    for section, sec in spec.sections:
        names = sorted(keys.get(section, set()))
        for pattern, _ in sec.per_key:
            if section == "losses":
                problems.append(
                    f"losses: {pattern!r} names nothing: the loss trace takes one tolerance, e.g. "
                    '{"losses": {"atol": 1e-6}}, not a map of keys'
                )
                continue
            if any(fnmatch.fnmatchcase(name, pattern) for name in names):
                continue
            close = difflib.get_close_matches(pattern, names, n=1, cutoff=0.6)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            returned = ", ".join(names[:12]) + (f" … and {len(names) - 12} more" if len(names) > 12 else "") or "none"
            problems.append(
                f"{section}: {pattern!r} names no {_KEY_NOUNS[section]} the job returned{guess}; "
                f"the job returned {section}: {returned}"
            )
    return problems
