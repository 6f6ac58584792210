"""The decision of a resume check: stop after K steps + resume in a fresh process must be the uninterrupted run."""

from __future__ import annotations

from dataclasses import asdict

from ..record import Record
from . import messages
from .policy import Decision, compare, headline
from .tolerances import ToleranceSpec
from .verdict import Verdict


def resume(
    full: Record,
    stopped: Record,
    resumed: Record,
    at: int,
    spec: ToleranceSpec,
    nodeid: str,
    given: list[str] | None,
    lightning: bool = False,
) -> Decision:
    """Stop after ``at`` steps + resume in a fresh process must give the uninterrupted run, under the tolerance."""
    if len(stopped.losses) != at:
        return Decision(
            Verdict.ERROR,
            f"the stopped run recorded {len(stopped.losses)} losses, expected {at}",
            messages.resume_bad_stop(nodeid, at, len(stopped.losses)),
        )
    combined = Record(
        losses=stopped.losses + resumed.losses,
        weights=resumed.weights,
        metrics=resumed.metrics,
        outputs=resumed.outputs,
        meta=resumed.meta,
    )
    cmp = compare(full, combined, spec)
    if cmp.ok:
        return Decision(Verdict.PASSED, f"stopped after step {at}, resumed in a fresh process: same results")
    first = cmp.first("losses")
    if first is not None and first.kind == "value" and first.step is not None:
        where = f"at step {first.step}"
        if first.step < at:
            headline_text = (
                f"the run told to stop after {at} steps already differs at step {first.step}, before the checkpoint "
                f"(uninterrupted {first.expected!r}, stopped run {first.actual!r})"
            )
        else:
            headline_text = (
                f"first step after the resume that differs: step {first.step} "
                f"(uninterrupted {first.expected!r}, resumed {first.actual!r}, "
                f"abs diff {first.first_step_abs or 0:.3g})"
            )
    else:
        where = headline(cmp)
        headline_text = f"the losses agree, but the final results differ {where}"
    described = cmp.describe("uninterrupted", "stop+resume")
    text = messages.resume_mismatch(nodeid, at, headline_text, described, given, lightning=lightning)
    return Decision(Verdict.DIFFERS, f"resume mismatch {where}", text, differences=[asdict(d) for d in cmp.differences])
