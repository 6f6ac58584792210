"""Static, versioned data splits: IDs per split, the source's content hash, and leakage checks."""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

SPLIT_SCHEMA = 1


class SplitError(ValueError):
    """A split file that does not match its data, or that leaks examples between splits."""


@dataclass(frozen=True)
class Split:
    """A loaded, verified split: example rows per split name, plus the split file's own hash."""

    splits: dict[str, list[dict[str, Any]]]
    version: int
    source_sha256: str
    file_sha256: str


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file of objects that each carry a string ``id``."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise SplitError(f"{path}:{n}: every line must be a JSON object with a string 'id'")
        rows.append(row)
    return rows


def _content_hash(row: Mapping[str, Any]) -> str:
    body = {k: v for k, v in row.items() if k != "id"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cut(ids: list[str], fractions: Mapping[str, float]) -> dict[str, list[str]]:
    names = list(fractions)
    out: dict[str, list[str]] = {}
    start = 0
    for i, name in enumerate(names):
        end = len(ids) if i == len(names) - 1 else start + round(fractions[name] * len(ids))
        out[name] = ids[start:end]
        start = end
    return out


TIME_VALUES = (
    "either numbers (e.g. Unix timestamps) or ISO 8601 date/datetime strings ('2024-03-01', '2024-03-01T12:30:00', "
    "'2024-03-01T12:30:00Z'), one kind for every row (with a UTC offset on all of them or on none)"
)


def time_value(value: Any) -> tuple[str, float | datetime]:
    """Return (kind, sortable value) of one ``by_time`` field: a number, or a naive/aware ISO 8601 datetime."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite number")
        return "number", value
    if isinstance(value, str):
        try:  # 'Z' by hand: fromisoformat reads it only from Python 3.11 on
            when = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value)
        except ValueError:
            raise ValueError(f"{value!r} is not an ISO 8601 date or datetime") from None
        return ("aware ISO datetime" if when.utcoffset() is not None else "naive ISO datetime"), when
    raise ValueError(f"{value!r} is a {type(value).__name__}, not a number or an ISO 8601 string")


def _times(rows: Sequence[Mapping[str, Any]], field: str, where: str) -> dict[str, float | datetime]:
    """Every row's ``field`` as a sortable value; SplitError for a missing, bad or mixed value."""
    fix = f"by_time accepts {TIME_VALUES}"
    times: dict[str, float | datetime] = {}
    first_of: dict[str, tuple[str, Any]] = {}
    for r in rows:
        if field not in r:
            raise SplitError(f"{where}: row {r['id']!r} has no field {field!r} to split by time; give every row one")
        try:
            kind, times[r["id"]] = time_value(r[field])
        except ValueError as exc:
            raise SplitError(f"{where}: row {r['id']!r}: {field} {exc}; {fix}") from None
        first_of.setdefault(kind, (r["id"], r[field]))
    if len(first_of) > 1:
        examples = ", ".join(f"row {i!r} has {v!r} ({kind})" for kind, (i, v) in sorted(first_of.items()))
        raise SplitError(f"{where}: field {field!r} mixes kinds of time that do not sort together: {examples}; {fix}")
    return times


def temporal_leakage(splits: Mapping[str, Sequence[Mapping[str, Any]]], field: str, order: Sequence[str]) -> list[str]:
    """Say where an example of an earlier split (in ``order``) is later than one of a later split."""
    every = [r for name in order for r in splits.get(name) or []]
    times = _times(every, field, "the split")  # all at once: one kind of time across every split
    spans: list[tuple[str, tuple[Any, ...], tuple[Any, ...]]] = []  # name, (earliest, id, value), (latest, ...)
    for name in order:
        keyed = sorted((times[r["id"]], r["id"], r[field]) for r in splits.get(name) or [])
        if keyed:
            spans.append((name, keyed[0], keyed[-1]))
    problems = []
    for a, (name_a, _, (late, late_id, late_value)) in enumerate(spans):
        for name_b, (early, early_id, early_value), _ in spans[a + 1 :]:
            if late > early:
                problems.append(
                    f"temporal leakage: {name_a!r} example {late_id!r} ({field} {late_value!r}) is later than "
                    f"{name_b!r} example {early_id!r} ({field} {early_value!r})"
                )
    return problems


def make_split(
    source: Path,
    out: Path,
    fractions: Mapping[str, float],
    seed: int,
    version: int = 1,
    stratify_by: str | None = None,
    by_time: str | None = None,
) -> dict[str, Any]:
    """Cut IDs by ``fractions``: shuffled with ``seed`` (per label of ``stratify_by``), or in time order of ``by_time``.

    With ``by_time`` the splits follow the order ``fractions`` lists them, earliest first (e.g. train, then
    validation, then test); equal times are ordered by ID.
    """
    rows = read_jsonl(source)
    if by_time is not None:
        if stratify_by is not None:
            raise SplitError(
                f"by_time={by_time!r} and stratify_by={stratify_by!r} cannot be combined: a per-label cut in time "
                "would put some labels' training examples after other labels' test examples; pass one of them"
            )
        return _write(
            source, out, fractions, seed, version, f"temporal:{by_time}", _temporal(rows, by_time, fractions, source)
        )
    groups: dict[str, list[str]] = {}
    for r in rows:
        if stratify_by is not None and stratify_by not in r:
            raise SplitError(f"{source}: row {r['id']!r} has no field {stratify_by!r} to stratify by")
        groups.setdefault(str(r[stratify_by]) if stratify_by else "", []).append(r["id"])
    rng = random.Random(seed)
    splits: dict[str, list[str]] = {name: [] for name in fractions}
    for label in sorted(groups):
        ids = groups[label]
        rng.shuffle(ids)
        for name, part in _cut(ids, fractions).items():
            splits[name] += part
    splits = {name: sorted(ids) for name, ids in splits.items()}
    return _write(
        source, out, fractions, seed, version, f"stratified:{stratify_by}" if stratify_by else "random", splits
    )


def _temporal(
    rows: Sequence[Mapping[str, Any]], field: str, fractions: Mapping[str, float], source: Path
) -> dict[str, list[str]]:
    times = _times(rows, field, str(source))
    ordered = [i for _, i in sorted((t, i) for i, t in times.items())]
    return {name: sorted(ids) for name, ids in _cut(ordered, fractions).items()}


def _write(
    source: Path,
    out: Path,
    fractions: Mapping[str, float],
    seed: int,
    version: int,
    method: str,
    splits: dict[str, list[str]],
) -> dict[str, Any]:
    data = {
        "schema": SPLIT_SCHEMA,
        "version": version,
        "source": source.name,
        "source_sha256": _file_hash(source),
        "method": method,
        "seed": seed,
        "fractions": dict(fractions),
        "splits": splits,
    }
    if method.startswith("temporal:"):
        data["order"] = list(fractions)  # the keys are written sorted; this keeps earliest-first
    out.write_text(json.dumps(data, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    return data


def load_split(split_file: Path, source: Path) -> Split:
    """Load a split file against its source; fail on a changed source, leaked IDs or duplicate content."""
    data = json.loads(split_file.read_text(encoding="utf-8"))
    if data.get("schema") != SPLIT_SCHEMA:
        raise SplitError(f"{split_file}: not a split file (schema {SPLIT_SCHEMA} expected)")
    actual = _file_hash(source)
    if actual != data["source_sha256"]:
        raise SplitError(
            f"{source} changed since {split_file.name} was made (sha256 {actual[:12]}…, split file expects "
            f"{data['source_sha256'][:12]}…): make a new split version instead of reusing this one"
        )
    rows = {r["id"]: r for r in read_jsonl(source)}
    owner: dict[str, str] = {}
    content_owner: dict[str, tuple[str, str]] = {}
    problems: list[str] = []
    out: dict[str, list[dict[str, Any]]] = {}
    for name, ids in data["splits"].items():
        out[name] = []
        for ex_id in ids:
            if ex_id in owner:
                problems.append(f"leakage: id {ex_id!r} is in both {owner[ex_id]!r} and {name!r}")
                continue
            owner[ex_id] = name
            if ex_id not in rows:
                problems.append(f"id {ex_id!r} of split {name!r} is not in {source.name}")
                continue
            h = _content_hash(rows[ex_id])
            if h in content_owner and content_owner[h][0] != name:
                other_split, other_id = content_owner[h]
                problems.append(
                    f"duplicate: {ex_id!r} in {name!r} has the same content as {other_id!r} in {other_split!r}"
                )
            content_owner.setdefault(h, (name, ex_id))
            out[name].append(rows[ex_id])
    method = str(data.get("method", ""))
    order = data.get("order")
    if not problems and method.startswith("temporal:") and (not isinstance(order, list) or set(order) != set(out)):
        problems.append(
            f"'order' {order!r} does not list the splits {sorted(out)} earliest first; make the split again"
        )
    elif not problems and method.startswith("temporal:"):
        problems += temporal_leakage(out, method.split(":", 1)[1], order)
    if problems:
        raise SplitError(f"{split_file}: " + "; ".join(problems))
    return Split(out, int(data["version"]), data["source_sha256"], _file_hash(split_file))
