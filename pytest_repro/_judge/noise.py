"""A measured noise floor, and judging a run against a reference in units of it. No pytest, no I/O.

The floor of a value is how far it moved in this environment under the differences another environment
brings (rounding, other random streams; ``_exec/perturb.py``) and under the runs' own nondeterminism:
per loss step (an envelope: noise grows with the steps and a single crossing must not make it zero),
per metric, and per tensor as the norm of the difference (element-wise differences of trained weights
reach 100 % across hardware; their norms do not). It never goes below 4 ulps of a loss or metric
(float32), nor below the norm of one ulp of every element of a tensor (in its dtype).
A difference passes when it is within ``k`` times its floor; ``k`` times the floor is the resolution:
the smallest change the comparison could have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..record import Record
from ..tensorfile import TensorLike, flat_chunks

# Measured (README "which bar to choose", benchmarks/RESULTS.md "Noise floor"): the CPU vs H200 differences
# of the six repository tests reach 3.1 x the floor of 2 perturbed CPU runs; K = 6 leaves a 2x margin.
DEFAULT_K = 6.0
DEFAULT_RUNS = 2
MIN_ULPS = 4.0  # a floor never below 4 ulps of the value: the rounding of a different kernel
_EPS = {"float64": 2.0**-52, "float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}
_CHUNK = 1 << 18
SECTIONS = ("losses", "metrics", "weights", "outputs")


def eps_of(dtype: str | None) -> float:
    """The machine epsilon of a dtype name (float32's for anything else)."""
    return _EPS.get(str(dtype).replace("torch.", ""), _EPS["float32"])


@dataclass(frozen=True)
class Floor:
    """The noise floor of one record (one rank): per loss step, per metric, per tensor (norm of a difference)."""

    losses: tuple[float, ...] = ()
    metrics: Mapping[str, float] = field(default_factory=dict)
    weights: Mapping[str, float] = field(default_factory=dict)
    outputs: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "losses": list(self.losses),
            "metrics": dict(self.metrics),
            "weights": dict(self.weights),
            "outputs": dict(self.outputs),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Floor:
        """Read the JSON form back; raise ValueError on anything that is not a floor."""
        if not isinstance(data, Mapping):
            raise ValueError("a noise floor must be a map")

        def number(v: Any, where: str) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{where}: expected a finite number >= 0, got {v!r}")
            return float(v)

        def numbers(name: str) -> dict[str, float]:
            part = data.get(name, {})
            if not isinstance(part, Mapping):
                raise ValueError(f"{name}: expected a map")
            return {str(k): number(v, f"{name}[{k!r}]") for k, v in part.items()}

        losses = data.get("losses", [])
        if not isinstance(losses, list):
            raise ValueError("losses: expected a list")
        steps = tuple(number(v, f"losses[{i}]") for i, v in enumerate(losses))
        return cls(steps, numbers("metrics"), numbers("weights"), numbers("outputs"))


@dataclass(frozen=True)
class NoiseFloor:
    """A check's measured floor: what it is made of, how it was measured, and its values per rank."""

    parts: tuple[str, ...]  # "rounding", "random streams", "run-to-run"
    runs: int  # the perturbed runs it was measured from
    seconds: float  # what measuring it cost
    floor: Floor
    ranks: Mapping[int, Floor] = field(default_factory=dict)
    source: str = "measured in this environment"

    def describe(self) -> str:
        """'rounding + random streams, 2 perturbed runs (3.1 s)'."""
        parts = " + ".join(self.parts) or "none"
        return f"{parts}, {self.runs} perturbed run{'s' * (self.runs != 1)} ({self.seconds:.1f} s), {self.source}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the reports, and the floor stored beside a reference)."""
        out: dict[str, Any] = {
            "parts": list(self.parts),
            "runs": self.runs,
            "seconds": round(self.seconds, 3),
            "source": self.source,
            **self.floor.to_dict(),
        }
        if self.ranks:
            out["ranks"] = {str(r): f.to_dict() for r, f in sorted(self.ranks.items())}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> NoiseFloor:
        """Read the JSON form back (``source`` says where it came from); ValueError if it is not one."""
        if not isinstance(data, Mapping):
            raise ValueError("a noise floor must be a map")
        parts, runs = data.get("parts"), data.get("runs")
        if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
            raise ValueError("parts: expected a list of names")
        if isinstance(runs, bool) or not isinstance(runs, int) or runs < 2:
            raise ValueError(f"runs: a floor needs at least 2 perturbed runs, got {runs!r}")
        ranks_raw = data.get("ranks", {})
        if not isinstance(ranks_raw, Mapping):
            raise ValueError("ranks: expected a map")
        ranks = {int(r): Floor.from_dict(f) for r, f in ranks_raw.items()}
        seconds = data.get("seconds", 0.0)
        seconds = float(seconds) if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) else 0.0
        return cls(tuple(parts), runs, seconds, Floor.from_dict(data), ranks, source)


def _norm_diff(a: TensorLike, b: TensorLike) -> float:
    """||a - b||_2 in float64, chunk by chunk (NaN where shapes differ or a value is not finite)."""
    import torch

    if tuple(a.shape) != tuple(b.shape):
        return math.nan
    total = 0.0
    for x, y in zip(flat_chunks(a, _CHUNK), flat_chunks(b, _CHUNK), strict=True):
        d = x.detach().to(torch.float64) - y.detach().to(torch.float64)
        total += float((d * d).sum())
    return math.sqrt(total)


def _norm(a: TensorLike) -> float:
    import torch

    return math.sqrt(sum(float((x.detach().to(torch.float64) ** 2).sum()) for x in flat_chunks(a, _CHUNK)))


def _rms(values: Sequence[float]) -> float:
    """Root mean square (NaN if any is NaN, 0 for none)."""
    if not values:
        return 0.0
    return math.sqrt(sum(v * v for v in values) / len(values))


def _envelope(values: Sequence[float]) -> list[float]:
    """Running maximum: the floor at step t is the largest spread seen up to t (NaN stays NaN)."""
    out: list[float] = []
    top = 0.0
    for v in values:
        top = v if math.isnan(v) or math.isnan(top) else max(top, v)
        out.append(top)
    return out


def _min_scalar(value: float, eps: float) -> float:
    return MIN_ULPS * eps * max(abs(value), 1e-30) if math.isfinite(value) else math.nan


def _tensor_dtype(t: TensorLike) -> str:
    return str(t.dtype).replace("torch.", "")


def floor_of(base: Record, others: Sequence[Record], scalar_dtype: str | None = None) -> Floor:
    """The floor of ``base`` from how far each of ``others`` (perturbed or repeated runs) moved from it."""
    eps = eps_of(scalar_dtype)
    n = len(base.losses)
    steps = [
        _rms([abs(o.losses[t] - base.losses[t]) if len(o.losses) == n else math.nan for o in others]) for t in range(n)
    ]
    losses = tuple(max(v, _min_scalar(b, eps)) for v, b in zip(_envelope(steps), base.losses, strict=True))
    metrics = {
        k: max(_rms([abs(o.metrics[k] - v) if k in o.metrics else math.nan for o in others]), _min_scalar(v, eps))
        for k, v in base.metrics.items()
    }

    def tensors(section: str) -> dict[str, float]:
        out = {}
        for k, t in getattr(base, section).items():
            moved = [_norm_diff(t, getattr(o, section)[k]) if k in getattr(o, section) else math.nan for o in others]
            out[k] = max(_rms(moved), eps_of(_tensor_dtype(t)) * _norm(t))  # an ulp of every element, in norm
        return out

    return Floor(losses, metrics, tensors("weights"), tensors("outputs"))


def _scalar_dtype(base: Record) -> str:
    # Losses and metrics are Python floats, mostly reduced in float32 even for half-precision models (HF
    # upcasts logits for the loss): a bfloat16 minimum would make the floor of a loss ~0.1 and blind.
    return "float32"


def spread(records: Sequence[Record]) -> Floor | None:
    """The floor that the check's own runs show (nondeterminism): None when every run equals run 1 bitwise."""
    differing = [r for r in records[1:] if differs(records[0], r)]
    return floor_of(records[0], differing, _scalar_dtype(records[0])) if differing else None


def larger(a: Floor, b: Floor) -> Floor:
    """Value by value, the larger of two floors of the same record."""

    def most(x: Mapping[str, float], y: Mapping[str, float]) -> dict[str, float]:
        return {k: max(v, y.get(k, v)) for k, v in x.items()}

    steps = tuple(max(x, y) for x, y in zip(a.losses, b.losses, strict=False)) + a.losses[len(b.losses) :]
    return Floor(steps, most(a.metrics, b.metrics), most(a.weights, b.weights), most(a.outputs, b.outputs))


def measure(
    base: Record, perturbed: Sequence[Record], own: Floor | None, parts: Sequence[str], seconds: float
) -> NoiseFloor:
    """The check's floor from its perturbed runs and, where its own runs differed, the larger of both."""
    scalar = _scalar_dtype(base)
    floor = floor_of(base, perturbed, scalar)
    names = list(parts)
    if own is not None:
        floor = larger(floor, own)
        names.append("run-to-run")
    ranks = {
        rank: floor_of(part, [o.ranks[rank] for o in perturbed if rank in o.ranks], scalar)
        for rank, part in sorted(base.ranks.items())
    }
    return NoiseFloor(tuple(names), len(perturbed), seconds, floor, ranks)


def differs(a: Record, b: Record) -> bool:
    """Whether two records differ at all (bitwise)."""
    from .compare import compare_records
    from .tolerances import ToleranceSpec

    return not compare_records(a, b, ToleranceSpec()).ok


@dataclass(frozen=True)
class Ratio:
    """One compared value: where, its difference, its floor, and their ratio."""

    section: str
    key: str | None  # a metric or tensor name; None for a loss step
    step: int | None
    diff: float
    floor: float
    rank: int | None = None

    @property
    def ratio(self) -> float:
        """diff / floor (NaN stays NaN, so it never passes; 0/0 is 0)."""
        if math.isnan(self.diff) or math.isnan(self.floor):
            return math.nan
        if self.diff == 0:
            return 0.0
        return self.diff / self.floor if self.floor > 0 else math.inf

    def where(self) -> str:
        """'at step 17', "in metrics['eval_loss']", "in weights['w'] (norm of the difference)"."""
        rank = "" if self.rank is None else f" on rank {self.rank}"
        if self.section == "losses":
            return f"at step {self.step}{rank}"
        norm = " (norm of the difference)" if self.section in ("weights", "outputs") else ""
        return f"in {self.section}[{self.key!r}]{norm}{rank}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "section": self.section,
            "key": self.key,
            "step": self.step,
            "rank": self.rank,
            "diff": self.diff,
            "floor": self.floor,
            "ratio": self.ratio,
        }


def ratios(expected: Record, actual: Record, floor: Floor, rank: int | None = None) -> Iterator[Ratio]:
    """Every compared value's ratio, in order: loss steps, metrics, weights, outputs (same keys assumed)."""
    for t, (e, a) in enumerate(zip(expected.losses, actual.losses, strict=False)):
        f = floor.losses[t] if t < len(floor.losses) else math.nan
        yield Ratio("losses", None, t, abs(a - e), f, rank)
    for k, e in expected.metrics.items():
        if k in actual.metrics:
            yield Ratio("metrics", k, None, abs(actual.metrics[k] - e), floor.metrics.get(k, math.nan), rank)
    for section in ("weights", "outputs"):
        mine, theirs, floors = getattr(expected, section), getattr(actual, section), getattr(floor, section)
        for k, e in mine.items():
            if k in theirs:
                yield Ratio(section, k, None, _norm_diff(e, theirs[k]), floors.get(k, math.nan), rank)


def exceeds(r: Ratio, k: float) -> bool:
    """Whether a ratio fails at ``k`` (NaN fails)."""
    return not r.ratio <= k


@dataclass(frozen=True)
class NoiseJudgement:
    """Every ratio of one comparison, the first beyond k and the largest."""

    k: float
    all: tuple[Ratio, ...]

    @property
    def first_beyond(self) -> Ratio | None:
        """The first value (in record order) whose difference exceeds k x its floor."""
        return next((r for r in self.all if exceeds(r, self.k)), None)

    @property
    def largest(self) -> Ratio | None:
        """The value with the largest ratio (NaN first)."""
        if not self.all:
            return None
        return max(self.all, key=lambda r: math.inf if math.isnan(r.ratio) else r.ratio)

    @property
    def ok(self) -> bool:
        """Every difference within k x its floor (an empty comparison is not ok)."""
        return bool(self.all) and self.first_beyond is None


def judge(expected: Record, actual: Record, floor: NoiseFloor, k: float) -> NoiseJudgement:
    """Compare ``actual`` with ``expected`` in units of the floor, rank by rank."""
    found = list(ratios(expected, actual, floor.floor, 0 if expected.ranks else None))
    for rank, part in sorted(expected.ranks.items()):
        if rank in actual.ranks:
            found += ratios(part, actual.ranks[rank], floor.ranks.get(rank, Floor()), rank)
    return NoiseJudgement(k, tuple(found))


def resolution(floor: Floor, k: float, steps: Sequence[int] = (1,)) -> list[str]:
    """What the comparison could have seen: k x the floor of each metric, of some loss steps, the largest tensor's."""
    parts = [f"{name} above {k * v:.2g}" for name, v in floor.metrics.items()]
    n = len(floor.losses)
    shown = sorted({s for s in (*steps, n - 1) if 0 <= s < n})
    parts += [f"the step-{s} loss above {k * floor.losses[s]:.2g}" for s in shown]
    for section in ("weights", "outputs"):
        values = getattr(floor, section)
        if values:
            key = max(values, key=lambda name: values[name])
            parts.append(f"{section}[{key!r}] by a norm above {k * values[key]:.2g}")
    return parts


def floor_run_problem(base: Record, perturbed: Sequence[Record], floor: Floor) -> str | None:
    """Why perturbed runs cannot give a floor: another structure than run 1, or NaN/inf where run 1 is finite."""
    from .compare import compare_records
    from .tolerances import CLOSE, ToleranceSpec

    for i, other in enumerate(perturbed, start=1):
        for d in compare_records(base, other, ToleranceSpec(default=CLOSE)).differences:
            if d.kind != "value":
                return f"noise-floor run {i} returned another structure than run 1: {d.describe('run 1', f'run {i}')}"
    for t, v in enumerate(floor.losses):
        if math.isnan(v) and math.isfinite(base.losses[t]):
            return f"a noise-floor run's loss at step {t} is not finite (run 1's is {base.losses[t]!r})"
    for section in ("metrics", "weights", "outputs"):
        for k, v in getattr(floor, section).items():
            if math.isnan(v):
                return f"a noise-floor run's {section}[{k!r}] is not finite where run 1's is (or cannot be compared)"
    return None
