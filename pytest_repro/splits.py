"""Static, versioned data splits: IDs per split, the source's content hash, and leakage checks."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
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


def make_split(
    source: Path,
    out: Path,
    fractions: Mapping[str, float],
    seed: int,
    version: int = 1,
    stratify_by: str | None = None,
) -> dict[str, Any]:
    """Shuffle IDs with ``seed`` and cut them by ``fractions`` (per label of ``stratify_by``); write a split file."""
    rows = read_jsonl(source)
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
    data = {
        "schema": SPLIT_SCHEMA,
        "version": version,
        "source": source.name,
        "source_sha256": _file_hash(source),
        "method": f"stratified:{stratify_by}" if stratify_by else "random",
        "seed": seed,
        "fractions": dict(fractions),
        "splits": splits,
    }
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
    if problems:
        raise SplitError(f"{split_file}: " + "; ".join(problems))
    return Split(out, int(data["version"]), data["source_sha256"], _file_hash(split_file))
