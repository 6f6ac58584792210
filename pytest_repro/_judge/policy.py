"""Pure decisions over run records: results usable, runs agree, reference matches, what to write.

No pytest, no processes, no file I/O: each function takes records (and what storage found) and
returns a Decision, so every policy is unit-testable on hand-made records.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..record import Record, is_empty
from . import messages
from .compare import compare_records, section_max_abs
from .difference import Comparison
from .finite import find_non_finite
from .tolerances import SectionTolerance, Tolerance, ToleranceSpec, unmatched_keys
from .verdict import Verdict

# Cross-environment limits for half-precision models: (rtol, atol) of tensors by the model's dtype,
# and of its losses and metrics (see cross_env_spec).
HALF_CROSS_ENV = {"bfloat16": (1.6e-2, 5e-2), "float16": (1e-3, 3e-2)}
HALF_SCALARS = (1e-3, 1e-5)


@dataclass
class Decision:
    """What a check concluded, with everything the reports need to show why."""

    verdict: Verdict
    detail: str = ""
    message: str = ""  # the failure text (empty for a pass)
    details: list[str] = field(default_factory=list)
    differences: list[dict[str, Any]] = field(default_factory=list)
    context: list[str] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)
    compared_with: str | None = None
    reference: Path | None = None  # the reference folder used or to be written
    write: bool = False  # stage this run as the reference of ``reference``
    reference_losses: list[float] | None = None
    reference_statistical: dict[str, Any] | None = None
    max_abs: dict[str, float] = field(default_factory=dict)
    noise: dict[str, Any] | None = None  # a noise-aware comparison: k, the floor, ratios, resolution
    origin: str = ""  # where the difference starts (module, op, backward, piece of state), when it was traced


@dataclass
class Found:
    """What storage found for one check: this environment's reference, or others, or a problem."""

    env_key: str
    target: Path
    here: Any = None  # storage.Reference
    problem: tuple[str, str] | None = None  # ("corrupt" | "blocked" | "unreadable", description)
    others: list[tuple[str, Any]] = field(default_factory=list)  # (env key, storage.Reference)
    unusable: list[str] = field(default_factory=list)


@dataclass
class Facts:
    """The check's own facts that decisions and messages need."""

    nodeid: str
    regen: str | None
    strategy: Any  # check.Strategy: how this check's runs are judged against a reference
    cross_env: ToleranceSpec
    config: dict[str, Any]
    effective: dict[str, dict[str, Any]]
    manifest: dict[str, Any]
    audit: list[str] = field(default_factory=list)
    shown: Callable[[Path], str] = str
    digests: bool = False  # run 1 recorded module digests (a regeneration writes them beside the reference)


def cross_env_spec(spec: ToleranceSpec, record: Record) -> tuple[ToleranceSpec, str]:
    """The cross-environment tolerance for this record, and how to describe it.

    The plain "close" default is dtype-aware per stored tensor; for a half-precision model (whose
    adapters, logits and losses are often stored as float32) it is widened to the model's precision:
    measured across CPU kernels (benchmarks/results-cross-cpu.md), float32 limits fail such models by
    up to 1400x while these pass with a 3.5x margin or more.
    """
    dtype = record.meta.get("dtype")
    if spec.statistical is not None:
        return spec, spec.statistical.describe()
    if dtype not in HALF_CROSS_ENV or spec.default.kind != "close" or spec.sections:
        return spec, spec.default.describe()
    rtol, atol = HALF_CROSS_ENV[dtype]
    tensors = Tolerance("explicit", atol=atol, rtol=rtol)
    scalars = Tolerance("explicit", atol=HALF_SCALARS[1], rtol=HALF_SCALARS[0])
    half = ToleranceSpec(
        default=tensors,
        sections=(("losses", SectionTolerance(default=scalars)), ("metrics", SectionTolerance(default=scalars))),
    )
    return half, f"close for a {dtype} model: tensors {tensors.describe()}; losses and metrics {scalars.describe()}"


def compare(expected: Record, actual: Record, spec: ToleranceSpec) -> Comparison:
    """Compare two records value by value."""
    return compare_records(expected, actual, spec)


def headline(cmp: Comparison, prefix: str = "") -> str:
    """Say where a comparison first failed, e.g. "at step 3" or "in weights['w']"."""
    steps = [d for d in cmp.differences if d.section == "losses" and d.kind == "value" and d.step is not None]
    # the earliest step first (on several ranks the first rank to move is the cause, not rank 0)
    d = min(steps, key=lambda d: (d.step or 0, d.rank or 0)) if steps else cmp.differences[0]
    rank = "" if d.rank is None else f" on rank {d.rank}"
    if d.section == "losses" and d.kind == "value":
        return f"{prefix} at step {d.step}{rank}".strip()
    where = d.section if d.key is None else f"{d.section}[{d.key!r}]"
    return f"{prefix} in {where}{rank}".strip()


def _result_keys(records: Sequence[Record]) -> dict[str, set[str]]:
    """Every run's and rank's keys, by section."""
    keys: dict[str, set[str]] = {"weights": set(), "metrics": set(), "outputs": set()}
    for record in records:
        for part in (record, *record.ranks.values()):
            for section, found in keys.items():
                found.update(getattr(part, section))
    return keys


def tolerance_keys(
    records: Sequence[Record], spec: ToleranceSpec, nodeid: str, argument: str = "tolerance"
) -> Decision | None:
    """Refuse per-key tolerances (the marker's ``argument``) that name nothing the job returned."""
    unmatched = unmatched_keys(spec, _result_keys(records))
    if not unmatched:
        return None
    problem = f"@pytest.mark.reproducible({argument}=…) {unmatched[0]}"
    return Decision(Verdict.ERROR, problem, messages.tolerance_keys(nodeid, unmatched, argument))


def invalid_results(records: Sequence[Record], spec: ToleranceSpec, nodeid: str) -> Decision | None:
    """Refuse empty results and NaN/inf anywhere (unless the key's tolerance sets equal_nan)."""
    for run, record in enumerate(records, start=1):
        for rank, part in [(None, record), *sorted(record.ranks.items())]:
            if is_empty(part):
                where = f"run {run}" + ("" if rank is None else f" (rank {rank})")
                return Decision(Verdict.ERROR, f"{where} returned nothing to compare", messages.empty(nodeid, where))
    unmatched = tolerance_keys(records, spec, nodeid)
    if unmatched is not None:
        return unmatched
    stat = spec.statistical
    if stat is not None and stat.metrics:
        missing = [m for m in stat.metrics if any(m not in r.metrics for r in records)]
        if missing:
            problem = (
                f"statistical(metrics={list(stat.metrics)}): the job returned no metric {missing[0]!r} "
                f"(it returned: {', '.join(sorted(records[0].metrics)) or 'no metrics'})"
            )
            return Decision(Verdict.ERROR, problem, messages.usage(nodeid, problem + "; name metrics the job returns"))

    def allowed(section: str, key: str | None) -> bool:
        if spec.statistical is not None:
            return False
        return spec.for_key(section, key).equal_nan

    found = [
        (run, record.seed, bad)
        for run, record in enumerate(records, start=1)
        for bad in find_non_finite(record, allowed)
    ]
    if not found:
        return None
    problems = [(run, seed, bad.describe()) for run, seed, bad in found]
    run, seed, first = problems[0]
    section = found[0][2].section.rpartition(": ")[2]  # "rank 1: weights" -> weights
    return Decision(
        Verdict.NON_FINITE,
        f"run {run} (seed {seed}): {first}",
        messages.non_finite(nodeid, problems, section, found[0][2].key),
    )


def run_to_run(
    records: Sequence[Record],
    spec: ToleranceSpec,
    nodeid: str,
    deterministic: bool,
    diagnose: Callable[[], str] | None = None,
) -> Decision | None:
    """Compare every run with run 1; None when all agree."""
    first = records[0]
    for k, other in enumerate(records[1:], start=2):
        cmp = compare(first, other, spec)
        if cmp.ok:
            continue
        head = headline(cmp, f"runs 1 and {k} diverge")
        origin = ""
        if diagnose is not None:
            origin = diagnose()
            diagnosis = (
                "Diagnosis (two more runs, tracing the model's inputs, every module's inputs and output, the loss, "
                "every parameter and gradient): "
                f"{origin}\n"
            )
        else:
            diagnosis = (
                "Rerun with --repro-diagnose to find the first step and tensor (input batch, module, loss, "
                "parameter or gradient) that diverge.\n"
            )
        text = messages.diverged(
            nodeid,
            head,
            cmp.describe("run 1", f"run {k}"),
            int(first.seed or 0),
            str(first.device),
            deterministic,
            diagnosis,
        )
        return Decision(Verdict.DIVERGED, head, text, differences=[asdict(d) for d in cmp.differences], origin=origin)
    return None


def changes(
    stored: Any, record: Record, effective: Mapping[str, Mapping[str, Any]], manifest: Mapping[str, Any]
) -> list[str]:
    """What changed between the reference's run and this one: config, settings, environment."""
    from .drift import diff_manifests

    lines: list[str] = []
    old_eff = stored.provenance.get("effective_config")
    if isinstance(old_eff, dict):
        old_values = {path: entry.get("value") for path, entry in old_eff.items() if isinstance(entry, dict)}
        new_values = {path: entry["value"] for path, entry in effective.items()}
        for d in diff_manifests(old_values, new_values)[:12]:
            top = d.path.split(".", 1)[0] if d.path not in new_values else d.path
            source = effective.get(d.path, effective.get(top, {})).get("source")
            tag = f" ({source})" if source else ""
            lines.append("config {}: reference {}, this run {}".format(d.path, *d.values()) + tag)
    for key in ("seed", "device", "deterministic", "dtype"):
        old, new = stored.record.meta.get(key), record.meta.get(key)
        if old != new:
            shown = [repr(meta[key]) if key in meta else "(absent)" for meta in (stored.record.meta, record.meta)]
            lines.append(f"{key}: reference {shown[0]}, this run {shown[1]}")
    if getattr(stored, "manifest_problem", None):
        lines.append(messages.drift_unknown(stored.manifest_problem))
    elif stored.manifest and manifest:
        drift = [d for d in diff_manifests(stored.manifest, manifest) if d.category != "cosmetic"]
        lines += [d.describe() for d in drift[:12]]
        if len(drift) > 12:
            lines.append(f"… and {len(drift) - 12} more environment changes")
    return lines


def env_drift(stored: Any, manifest: Mapping[str, Any]) -> list[str]:
    """Numeric environment drift since a stored reference; one 'drift unknown' line when its manifest is unreadable."""
    from .drift import numeric_drift

    if getattr(stored, "manifest_problem", None):
        return [messages.drift_unknown(stored.manifest_problem)]
    return [d.describe() for d in numeric_drift(stored.manifest, manifest)] if stored.manifest else []


@dataclass
class Match:
    """How a run compared with a stored reference: agreed or not, where it first differs, the lines to show."""

    ok: bool
    where: str
    lines: list[str]
    differences: list[dict[str, Any]] = field(default_factory=list)
    noise: dict[str, Any] | None = None  # a noise-aware comparison's figures (noise_verdict.summary)


def match_values(stored: Record, record: Record, spec: ToleranceSpec, label: str) -> Match:
    """Compare a run with a stored reference value by value."""
    cmp = compare(stored, record, spec)
    if cmp.ok:
        return Match(True, "", [])
    return Match(False, headline(cmp), [cmp.describe(label, "this run")], [asdict(d) for d in cmp.differences])


def against_reference(found: Found, record: Record, facts: Facts) -> Decision:
    """Decide the reference part of a check: compare, cross-compare, or (on --repro-regen) write."""
    nodeid, regen, target = facts.nodeid, facts.regen, found.target
    if found.problem is not None:
        kind, problem = found.problem
        if kind == "corrupt" and regen == "all":  # only an explicit full regeneration replaces a broken one
            return Decision(Verdict.WRITTEN, f"replaced a corrupt reference ({problem})", reference=target, write=True)
        if kind == "corrupt":
            return Decision(Verdict.CORRUPT, problem, messages.corrupt(nodeid, problem), reference=target)
        if kind == "unreadable":
            return Decision(Verdict.ERROR, problem, messages.reference_unreadable(nodeid, problem), reference=target)
        return Decision(Verdict.ERROR, problem, messages.blocked(nodeid, problem), reference=target)
    stored = found.here
    if stored is None:
        if regen in ("all", "missing"):
            return Decision(Verdict.WRITTEN, f"environment {found.env_key}", reference=target, write=True)
        return _cross_env(found, record, facts)
    m = facts.strategy.against(stored.record, record, "reference", nodeid)
    if isinstance(m, Decision):
        if regen == "all":
            return Decision(Verdict.WRITTEN, f"reference updated ({m.detail})", reference=target, write=True)
        return m
    common: dict[str, Any] = {
        "reference": target,
        "max_abs": section_max_abs(stored.record, record),
        "differences": m.differences,
        "reference_losses": stored.record.losses,
        "reference_statistical": stored.record.meta.get("statistical"),
        "noise": m.noise,
    }
    if regen == "all" and not m.ok:
        return Decision(Verdict.WRITTEN, f"reference updated ({m.where})", write=True, **common)
    if regen == "all" and stored.manifest_problem:
        why = f"same values; manifest.yaml rewritten (it was unreadable: {stored.manifest_problem})"
        return Decision(Verdict.WRITTEN, why, write=True, **common)
    if regen == "all" and facts.digests and getattr(stored, "digests", None) is None:
        why = "same values; digests.json recorded (module digests of the first steps: where a later change starts)"
        return Decision(Verdict.WRITTEN, why, write=True, **common)
    if regen == "all" and stored.provenance.get("config") != facts.config:
        return Decision(Verdict.WRITTEN, "same values; provenance updated for the changed config", write=True, **common)
    drift = env_drift(stored, facts.manifest)
    if m.ok:
        verdict = Verdict.UNCHANGED if regen == "all" else Verdict.PASSED
        return Decision(verdict, "", details=m.lines, drift=drift, **common)
    context = changes(stored, record, facts.effective, facts.manifest)
    return Decision(
        Verdict.DIFFERS,
        f"differs from the reference {m.where}",
        messages.differs(nodeid, facts.shown(target), context, "\n".join(m.lines), facts.audit),
        details=m.lines,
        context=context,
        drift=[line for line in drift if line.startswith(messages.DRIFT_UNKNOWN)],
        **common,
    )


def _cross_env(found: Found, record: Record, facts: Facts) -> Decision:
    """No reference for this environment: compare with the closest other one, under the cross-env tolerance."""
    from .drift import numeric_drift

    nodeid = facts.nodeid
    if not found.others:
        return Decision(
            Verdict.MISSING,
            f"no reference for environment {found.env_key}",
            messages.missing(nodeid, found.env_key, facts.shown(found.target), found.unusable),
            reference=found.target,
        )

    def distance(item: tuple[str, Any]) -> tuple[int, str]:
        key, ref = item
        return (len(numeric_drift(ref.manifest, facts.manifest)) if ref.manifest and facts.manifest else 999, key)

    other_key, stored = min(found.others, key=distance)
    strategy, described = facts.strategy.across_environments(facts.cross_env, record)
    if facts.regen != "all":  # a full regeneration replaces what it finds: a broken stored floor must not block it
        unusable = _with_stored_floor(strategy, stored, other_key, facts)
        if isinstance(unusable, Decision):
            return unusable
        strategy = unusable
    m = strategy.against(stored.record, record, f"reference ({other_key})", nodeid)
    if isinstance(m, Decision):
        m.compared_with, m.reference = other_key, stored.path
        return m
    drift = env_drift(stored, facts.manifest)
    note = (
        f"no reference for environment {found.env_key!r}; compared with the one recorded in {other_key!r} "
        f"under the cross-environment tolerance ({described}), not bitwise"
    )
    if m.ok and m.noise is not None:
        note += f"; {m.lines[0]}; detects a change of {', '.join(m.noise['resolution'])}"
        moved = [line for line in changes(stored, record, facts.effective, {}) if line.startswith("config ")]
        if moved:  # a pass within the noise says nothing about a change smaller than the resolution
            note += f"; the config differs from the reference's ({'; '.join(moved)}): a change below the resolution"
    common: dict[str, Any] = {
        "reference": stored.path,
        "max_abs": section_max_abs(stored.record, record),
        "compared_with": other_key,
        "differences": m.differences,
        "drift": drift,
        "details": m.lines,
        "reference_losses": stored.record.losses,
        "reference_statistical": stored.record.meta.get("statistical"),
        "noise": m.noise,
    }
    if m.ok:
        return Decision(Verdict.PASSED_CROSS_ENV, note, **common)
    context = changes(stored, record, facts.effective, facts.manifest)
    text = messages.differs_cross_env(
        nodeid, found.env_key, other_key, described, context, "\n".join(m.lines), facts.audit
    )
    return Decision(
        Verdict.DIFFERS, f"differs from the {other_key} reference {m.where}", text, context=context, **common
    )


def _with_stored_floor(strategy: Any, stored: Any, env_key: str, facts: Facts) -> Any:
    """The strategy, judging with the floor stored beside the reference too; a Decision when that one is unusable."""
    if not strategy.judges_by_floor:
        return strategy
    from ..record import NOISE_FILE
    from .stored_floor import read_stored_floor

    floor, problem = read_stored_floor(stored, env_key)
    if floor is not None:
        return strategy.with_stored_floor(floor)
    if problem is None:
        return strategy
    where = facts.shown(stored.path / NOISE_FILE)
    return Decision(
        Verdict.ERROR,
        f"the stored noise floor {where} is unusable",
        messages.stored_floor_unusable(facts.nodeid, where, problem),
        reference=stored.path,
    )


def replicas_disagree(record: Record) -> list[str]:
    """Warnings for ranks whose final weights differ from rank 0's (DDP replicas should stay identical)."""
    warnings = []
    for rank, other in sorted(record.ranks.items()):
        if not record.weights or set(other.weights) != set(record.weights):
            continue
        cmp = compare(Record(weights=record.weights), Record(weights=other.weights), ToleranceSpec())
        if not cmp.ok:
            d = cmp.differences[0]
            warnings.append(
                f"rank {rank}'s final weights differ from rank 0's ({d.section}[{d.key!r}], max abs diff "
                f"{d.max_abs:.3g}): under DDP the replicas should stay identical — expected only if the job "
                "shards its model (FSDP, tensor parallel)"
            )
    return warnings
