"""A run against a reference under a noise tolerance: the Match, its wording, and what the reports keep."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from ..record import Record
from .compare import compare_records
from .difference import Difference
from .noise import NoiseFloor, NoiseJudgement, Ratio, exceeds, judge, resolution
from .policy import Match, headline
from .tolerances import CLOSE, Noise, ToleranceSpec


def _g(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.3g}"


def _times(r: Ratio) -> str:
    """'0.41 x the noise floor' (inf: the floor is zero and the values differ)."""
    return "NaN" if math.isnan(r.ratio) else f"{r.ratio:.2g} x the noise floor"


def _difference(r: Ratio, k: float) -> Difference:
    return Difference(
        r.section,
        r.key,
        "value",
        f"{k:g} x the noise floor",
        step=r.step,
        max_abs=r.diff,
        first_step_abs=r.diff if r.section == "losses" else None,
        detail=f"{_g(r.ratio)} x its noise floor {_g(r.floor)}",
        rank=r.rank,
    )


def summary(j: NoiseJudgement, floor: NoiseFloor) -> dict[str, Any]:
    """What the reports keep of a noise-aware comparison: k, the floor, the largest and first ratio, resolution."""
    largest, first = j.largest, j.first_beyond
    return {
        "k": j.k,
        "floor": floor.to_dict(),
        "largest": largest.to_dict() if largest else None,
        "first_beyond": first.to_dict() if first else None,
        "beyond": sum(1 for r in j.all if exceeds(r, j.k)),
        "compared": len(j.all),
        "resolution": resolution(floor.floor, j.k),
    }


def match_noise(stored: Record, record: Record, tol: Noise, floor: NoiseFloor, label: str) -> Match:
    """Compare a run with a reference in units of the measured noise floor; structure must match exactly."""
    structure = [
        d for d in compare_records(stored, record, ToleranceSpec(default=CLOSE)).differences if d.kind != "value"
    ]
    if structure:
        return Match(
            False,
            headline_of(structure),
            [d.describe(label, "this run") for d in structure],
            [asdict(d) for d in structure],
        )
    j = judge(stored, record, floor, tol.k)
    kept = summary(j, floor)
    seen = f"resolution: this comparison detects a change of {', '.join(kept['resolution'])}"
    made = f"noise floor: {floor.describe()}"
    largest = j.largest
    if largest is None:
        return Match(False, "in nothing comparable", ["nothing to compare: the records hold no values"], noise=kept)
    first = j.first_beyond
    if first is None:
        lines = [f"largest difference {_times(largest)}, {largest.where()} (limit {tol.k:g} x)", made, seen]
        return Match(True, "", lines, noise=kept)
    beyond = [r for r in j.all if exceeds(r, tol.k)]
    lines = [
        f"{first.where()}: differs by {_g(first.diff)} = {_times(first)} {_g(first.floor)} (limit {tol.k:g} x)",
        f"{len(beyond)} of {len(j.all)} compared values are beyond {tol.k:g} x their noise floor; the largest is "
        f"{_times(largest)}, {largest.where()}",
        made,
        seen,
    ]
    return Match(False, first.where(), lines, [asdict(_difference(r, tol.k)) for r in beyond[:50]], noise=kept)


def headline_of(differences: list[Difference]) -> str:
    """Where the first structural difference is."""
    from .difference import Comparison

    return headline(Comparison(tuple(differences)))
