"""The statistical strategy's decisions: per-seed values, same-seed spread, equivalence with a reference (TOST)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from ..record import Record
from . import messages
from .noise import DEFAULT_K, NoiseFloor
from .policy import Decision, Match
from .tolerances import Statistical
from .verdict import Verdict


def per_seed(records: Sequence[Record]) -> dict[str, Any]:
    """The per-seed values a statistical reference stores."""
    return {
        "seeds": [r.seed for r in records],
        "metrics": {name: [r.metrics.get(name, math.nan) for r in records] for name in records[0].metrics},
        "losses": [r.losses for r in records],
    }


def same_seed_spread(records: Sequence[Record], stat: Statistical, nodeid: str) -> Decision | None:
    """With ``same_seed``: the spread of each metric and loss step across runs must stay within the margin.

    Without a given margin the runs' spread is itself the noise floor the reference is judged against.
    """
    if stat.margin is None:
        return None
    values_of = per_seed(records)["metrics"]
    problems = []
    for name, values in values_of.items():
        allowed = stat.margin_for(statistics.fmean(values))
        if not max(values) - min(values) <= allowed:
            problems.append(
                f"metrics[{name!r}]: spread {max(values) - min(values):.3g} across {len(values)} runs "
                f"(allowed {allowed:.3g})"
            )
    for step in range(min(len(r.losses) for r in records)):
        values = [r.losses[step] for r in records]
        allowed = stat.margin_for(statistics.fmean(values))
        if not max(values) - min(values) <= allowed:
            problems.append(
                f"losses: spread {max(values) - min(values):.3g} at step {step} (allowed {allowed:.3g}); "
                "first step over the limit"
            )
            break
    if not problems:
        return None
    first = records[0]
    return Decision(
        Verdict.DIVERGED,
        f"runs with the same seed spread beyond the margin ({problems[0].split(':')[0]})",
        messages.spread(nodeid, len(records), int(first.seed or 0), str(first.device), problems),
    )


def match_statistical(
    stored: Record,
    record: Record,
    stat: Statistical,
    label: str,
    nodeid: str,
    floor: NoiseFloor | None = None,
) -> Match | Decision:
    """Compare a run's per-seed values with a stored reference's (TOST); a Decision when that is impossible.

    Without a given margin, each metric's and loss step's margin is k x its measured noise ``floor``.
    """
    from .stats import TooFewSeedsError, compare_statistical

    ref_stats, new_stats = stored.meta.get("statistical"), record.meta.get("statistical")
    if not isinstance(ref_stats, dict) or not isinstance(new_stats, dict):
        return Decision(
            Verdict.ERROR, f"the {label} holds no per-seed values", messages.no_per_seed_values(nodeid, label)
        )
    try:
        measured = None
        if floor is not None:
            f = floor.floor
            measured = ({k: DEFAULT_K * v for k, v in f.metrics.items()}, [DEFAULT_K * v for v in f.losses])
        results, band = compare_statistical(ref_stats, new_stats, stat, measured)
    except (TooFewSeedsError, KeyError) as exc:
        problem = str(exc).strip("'\"")
        return Decision(Verdict.ERROR, problem, messages.statistical_problem(nodeid, problem))
    lines = [f"  {r.describe()}" for r in results]
    if floor is not None:
        lines.append(f"  margins: {DEFAULT_K:g} x the noise floor of each value ({floor.describe()})")
    if band is not None:
        lines.append(f"  {band.describe()}")
    unresolved = [r for r in results if r.unresolved]
    if unresolved and all(r.equivalent or r.unresolved for r in results) and band is None:
        problem = f"the margin of metrics[{unresolved[0].name!r}] is below what these seeds can resolve"
        text = messages.unresolvable_margin(nodeid, [r.explain_resolution() for r in unresolved], lines)
        return Decision(Verdict.ERROR, problem, text, details=lines)
    failed = [r for r in results if not r.equivalent]
    where = f"in metrics[{failed[0].name!r}]" if failed else (f"at step {band.step}" if band else "")
    return Match(not failed and band is None, where, lines)
