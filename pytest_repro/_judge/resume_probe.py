"""What a resume did not restore: the uninterrupted run and the resumed run, traced, compared at the boundary.

Both runs are traced by ``_exec.trace.StepTracer`` in probe mode: before each optimizer update it hashes the
parameters, the optimizer state, the learning rate and every RNG, and it hashes the model's inputs of each
step. At step ``at`` (the resumed run's first update) everything the checkpoint should have brought back is
compared; this module only reads the two traces.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._exec.trace import TRACE_FILE

RNGS = ("torch RNG", "CUDA RNG", "NumPy RNG", "Python RNG")


def _at(trace: list[dict[str, Any]], step: int) -> dict[tuple[str, str], str]:
    """(kind, name) -> digest of the step's inputs, parameters before its update, and training state."""
    return {(e["kind"], e["name"]): e["sha256"] for e in trace if e["step"] == step and e["kind"] in KINDS}


KINDS = ("input", "value", "state")


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" and {names[-1]}"


def boundary(full_run: Path, resumed_run: Path, at: int) -> str:
    """One paragraph: what matched and what differed at the resume boundary, and what that means."""
    try:
        full = _at(json.loads((full_run / TRACE_FILE).read_text(encoding="utf-8")), at)
        resumed = _at(json.loads((resumed_run / TRACE_FILE).read_text(encoding="utf-8")), at)
    except (OSError, ValueError) as exc:
        return f"The resume boundary could not be probed ({type(exc).__name__}: {exc})."
    if not any(kind == "state" for kind, _ in full) or not any(kind == "state" for kind, _ in resumed):
        return (
            f"The resume boundary could not be probed: {'the resumed' if any(k == 'state' for k, _ in full) else 'a'} "
            f"run took no optimizer step at step {at} that the probe could see (torch.optim optimizers only)."
        )

    def differing(kind: str) -> list[str]:
        names = [n for k, n in full if k == kind] + [n for k, n in resumed if k == kind and (k, n) not in full]
        return [n for n in names if full.get((kind, n)) != resumed.get((kind, n))]

    params, state, inputs = differing("value"), differing("state"), differing("input")
    rngs = [n for n in state if n in RNGS]
    parts = {
        "parameters": bool(params),
        "optimizer state": "optimizer state" in state,
        "learning rate": "learning rate" in state,
    }
    same = [name for name, moved in parts.items() if not moved] + [
        n for n in RNGS if (("state", n) in full) and n not in rngs
    ]
    moved = [name for name, m in parts.items() if m] + rngs
    head = f"At the resume boundary (step {at}, before its first update), resumed vs uninterrupted: "
    said = []
    if same:
        said.append(f"{_join(same)} match")
    if moved:
        said.append(f"{_join(moved)} differ{'s' if len(moved) == 1 else ''}")
    batch = (
        f"the input batch at step {at} differs ({_join(inputs[:4])})"
        if inputs
        else f"the input batch at step {at} matches"
    )
    said.append(batch)
    causes = []
    if params:
        causes.append(f"the model's parameters are not the ones after step {at - 1} (first: `{params[0]}`)")
    if parts["optimizer state"]:
        causes.append("the checkpoint does not restore the optimizer state (save and load optimizer.state_dict())")
    if parts["learning rate"] and not parts["optimizer state"]:
        causes.append("the learning rate is not restored (save and load the LR scheduler's state_dict())")
    if rngs:
        so = f", so the batch drawn at step {at} differs" if inputs else ""
        causes.append(
            f"the checkpoint does not restore the {_join(rngs)} state{so} (save and restore the RNG states, as "
            "pytest_repro.checkpoint.save does)"
        )
    elif inputs:
        causes.append(
            "every RNG matched but the batch differs: the checkpoint does not restore the data position (save the "
            "sampler's or the loader's state, or the step the data restarts from)"
        )
    if not causes:
        causes.append(
            "everything the probe sees matched: the difference comes from state it does not see (a counter or buffer "
            "kept by the job, a module attribute, a data iterator)"
        )
    return head + "; ".join(said) + ": " + "; ".join(causes) + "."
