"""``--repro-calibrate`` (``pytest-repro calibrate``): a check's noise floor per value, what it resolves, and
storing it beside this environment's reference for later cross-environment checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._judge.noise import DEFAULT_K, NoiseFloor, resolution
from ._judge.policy import Decision
from .record import NOISE_FILE, dump_json, write_text_atomic


def suggested(floor: NoiseFloor, k: float = DEFAULT_K) -> dict[str, Any]:
    """Explicit tolerances that the floor resolves (k x the floor): the loss trace's largest and each metric's."""
    f = floor.floor
    out: dict[str, Any] = {}
    if f.losses:
        out["losses"] = {"atol": float(f"{k * max(f.losses):.2g}")}
    if f.metrics:
        out["metrics"] = {name: {"atol": float(f"{k * v:.2g}")} for name, v in f.metrics.items()}
    return out


def calibrate(
    floor: NoiseFloor, decision: Decision, here: Path | None, staged: str | None, store: bool
) -> dict[str, Any]:
    """The calibration the reports show; with ``store``, the floor written beside this environment's reference.

    It is stored only beside a reference that this check matched or wrote (a floor of a job that no longer
    matches its reference would describe something else).
    """
    measured = floor.to_dict()
    result: dict[str, Any] = {
        "floor": measured,
        "k": DEFAULT_K,
        "resolution": resolution(floor.floor, DEFAULT_K),
        "suggested": suggested(floor),
        "stored": None,
        "not_stored": None,
    }
    if not store:
        return result
    try:
        NoiseFloor.from_dict(measured, "check")  # what a later check would refuse is never stored
    except ValueError as exc:
        result["not_stored"] = f"the floor is not storable ({exc})"
        return result
    data = dump_json({**measured, "source": "measured on the machine that recorded this reference"})
    try:
        if decision.write and staged is not None:  # a reference written now: the floor goes with it, if it lands
            write_text_atomic(Path(staged) / NOISE_FILE, data)
            result["stored"] = str(Path(str(decision.reference)) / NOISE_FILE) + " (with the reference written now)"
            return result
        if here is not None and decision.verdict.ok and decision.compared_with is None:
            write_text_atomic(here / NOISE_FILE, data)
            result["stored"] = str(here / NOISE_FILE)
            return result
    except OSError as exc:
        result["not_stored"] = f"it could not be written: {exc}"
        return result
    if here is None:
        result["not_stored"] = "there is no reference for this environment: record one with --repro-regen=missing"
    else:
        result["not_stored"] = f"the check did not match this environment's reference ({decision.verdict.label})"
    return result
