"""A noise floor stored beside a reference (``pytest-repro calibrate --store``): checked, then combined.

A stored floor is never trusted as it is: it must be a floor (``NoiseFloor.from_dict``), fit the reference it
stands beside (its loss steps and keys), and be plausible next to the floor measured here. Then the verdict
uses the larger of the two, value by value, and says so.
"""

from __future__ import annotations

from typing import Any

from ..record import Record
from .noise import NoiseFloor, larger


def with_stored(measured: NoiseFloor, stored: NoiseFloor) -> NoiseFloor:
    """Value by value the larger of this environment's floor and the one stored beside the reference."""
    parts = tuple(dict.fromkeys([*measured.parts, *stored.parts]))
    ranks = {r: larger(f, stored.ranks[r]) if r in stored.ranks else f for r, f in measured.ranks.items()}
    source = f"{measured.source}, and the one {stored.source} ({stored.runs} runs): the larger of the two per value"
    return NoiseFloor(parts, measured.runs, measured.seconds, larger(measured.floor, stored.floor), ranks, source)


# A stored floor this many times the one measured here (the same parts) was not measured on this job: natural
# spreads of default GPU modes measured ~10-100 x a rounding floor; a crafted one hides every change.
IMPLAUSIBLE = 1000.0


def stored_floor_problem(stored: NoiseFloor, record: Record) -> str | None:
    """Why a stored floor does not describe ``record`` (the reference it is stored beside): its shape, per value."""
    f = stored.floor
    if len(f.losses) != len(record.losses):
        return f"it has a floor for {len(f.losses)} loss steps, the reference has {len(record.losses)}"
    for section in ("metrics", "weights", "outputs"):
        mine, theirs = set(getattr(f, section)), set(getattr(record, section))
        if mine != theirs:
            extra, missing = sorted(mine - theirs), sorted(theirs - mine)
            return f"its {section} are not the reference's (extra: {extra[:3]}, missing: {missing[:3]})"
    return None


def implausible(stored: NoiseFloor, measured: NoiseFloor) -> str | None:
    """A stored value over IMPLAUSIBLE x the floor measured here for the same value (a crafted or foreign floor)."""
    a, b = stored.floor, measured.floor
    pairs = [(f"the step-{t} loss", x, y) for t, (x, y) in enumerate(zip(a.losses, b.losses, strict=False))]
    for section in ("metrics", "weights", "outputs"):
        mine, here = getattr(a, section), getattr(b, section)
        pairs += [(f"{section}[{k!r}]", v, here[k]) for k, v in mine.items() if k in here]
    for name, x, y in pairs:
        if y > 0 and x > IMPLAUSIBLE * y:
            return f"its floor of {name} is {x:.3g}, {x / y:.3g} x the {y:.3g} measured here"
    return None


def read_stored_floor(stored: Any, env_key: str) -> tuple[NoiseFloor | None, str | None]:
    """The floor stored beside a reference (``storage.Reference``), checked: (floor, None), (None, why), or none."""
    problem: str | None = getattr(stored, "floor_problem", None)
    data: Any = getattr(stored, "floor", None)
    if problem is not None or data is None:
        return None, problem
    try:
        floor = NoiseFloor.from_dict(data, f"stored beside the {env_key} reference")
    except (ValueError, TypeError) as exc:
        return None, f"it is not a noise floor ({exc})"
    problem = stored_floor_problem(floor, stored.record)
    return (floor, None) if problem is None else (None, problem)
