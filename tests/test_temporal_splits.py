"""Temporal splits: train before validation before test, with the temporal leakage check (hypothesis)."""

from __future__ import annotations

import itertools
import json
import random
from datetime import date, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_repro.splits import SplitError, load_split, make_split

FRACTIONS = {"train": 0.6, "validation": 0.2, "test": 0.2}  # not alphabetical: the order is the listed one
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(times: list[object]) -> list[dict[str, object]]:
    return [{"id": f"ex{i:03d}", "text": f"text {i}", "when": t} for i, t in enumerate(times)]


# Times as JSON carries them: numbers, ISO dates, naive ISO datetimes, ISO datetimes with an offset.
KINDS = {
    "number": st.integers(0, 50) | st.floats(0, 50, allow_nan=False),
    "date": st.integers(0, 40).map(lambda d: (date(2024, 1, 1) + timedelta(days=d)).isoformat()),
    "datetime": st.integers(0, 60).map(lambda m: f"2024-03-01T10:{m % 60:02d}:00"),
    "aware": st.sampled_from(["2024-03-01T10:00:00Z", "2024-03-01T12:00:00+02:00", "2024-03-01T09:30:00+00:00"]),
}
times_of_one_kind = st.sampled_from(sorted(KINDS)).flatmap(lambda k: st.lists(KINDS[k], min_size=1, max_size=40))
fractions = st.lists(st.integers(1, 5), min_size=1, max_size=4).map(
    lambda ws: {name: w / sum(ws) for name, w in zip(["train", "validation", "test", "holdout"], ws, strict=False)}
)


def _key(value: object) -> object:
    from pytest_repro.splits import time_value

    return time_value(value)[1]


@PROPERTY
@given(times=times_of_one_kind, fracs=fractions, seed=st.integers(0, 10))
def test_a_temporal_split_partitions_and_orders_in_time(
    tmp_path: Path, times: list[object], fracs: dict[str, float], seed: int
) -> None:
    rows = _rows(times)
    src = _write(tmp_path / "data.jsonl", rows)
    data = make_split(src, tmp_path / "split.json", fracs, seed=0, by_time="when")
    splits, when = data["splits"], {r["id"]: _key(r["when"]) for r in rows}
    # a partition: every id exactly once
    assert sorted(i for ids in splits.values() for i in ids) == sorted(when)
    assert data["order"] == list(fracs) and data["method"] == "temporal:when"
    # ordering invariant: nothing in an earlier split is later than anything in a later one
    names = [n for n in fracs if splits[n]]
    for a, b in itertools.pairwise(names):
        assert max(when[i] for i in splits[a]) <= min(when[i] for i in splits[b])  # type: ignore[type-var]
    # ties broken by id: the cut is the sorted (time, id) sequence, independent of row order and seed
    ordered = [i for _, i in sorted((t, i) for i, t in when.items())]  # type: ignore[type-var]
    assert [i for n in fracs for i in sorted(splits[n], key=ordered.index)] == ordered
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    again = make_split(_write(tmp_path / "shuffled.jsonl", shuffled), tmp_path / "s2.json", fracs, seed, by_time="when")
    assert again["splits"] == splits
    assert sum(len(v) for v in load_split(tmp_path / "split.json", src).splits.values()) == len(rows)


@PROPERTY
@given(times=st.lists(st.integers(0, 1000), min_size=3, max_size=40, unique=True), pick=st.data())
def test_the_leakage_check_catches_a_later_example_in_an_earlier_split(
    tmp_path: Path, times: list[int], pick: st.DataObject
) -> None:
    src = _write(tmp_path / "data.jsonl", _rows(times))
    out = tmp_path / "split.json"
    data = make_split(src, out, {"train": 0.5, "test": 0.5}, seed=0, by_time="when")
    train, test = data["splits"]["train"], data["splits"]["test"]
    a = pick.draw(st.sampled_from(train))
    b = pick.draw(st.sampled_from(test))
    data["splits"]["train"] = sorted([*(i for i in train if i != a), b])
    data["splits"]["test"] = sorted([*(i for i in test if i != b), a])
    out.write_text(json.dumps(data))
    with pytest.raises(SplitError, match=rf"temporal leakage: 'train' example {b!r} \(when \d+\) is later than 'test'"):
        load_split(out, src)


def test_validation_is_checked_against_test_too(tmp_path: Path) -> None:
    src = _write(tmp_path / "data.jsonl", _rows([f"2024-01-{d:02d}" for d in range(1, 11)]))
    out = tmp_path / "split.json"
    data = make_split(src, out, FRACTIONS, seed=0, by_time="when")
    assert data["splits"] == {
        "train": ["ex000", "ex001", "ex002", "ex003", "ex004", "ex005"],
        "validation": ["ex006", "ex007"],
        "test": ["ex008", "ex009"],
    }
    data["splits"]["validation"], data["splits"]["test"] = ["ex006", "ex009"], ["ex007", "ex008"]
    out.write_text(json.dumps(data))
    with pytest.raises(SplitError) as err:
        load_split(out, src)
    assert str(err.value).endswith(
        "temporal leakage: 'validation' example 'ex009' (when '2024-01-10') is later than 'test' example 'ex007' "
        "(when '2024-01-08')"
    )
    data["order"] = ["train", "test"]
    out.write_text(json.dumps(data))
    with pytest.raises(SplitError, match="does not list the splits"):
        load_split(out, src)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"id": "ex003", "text": "t"}, "row 'ex003' has no field 'when' to split by time; give every row one"),
        ({"id": "ex003", "when": "last tuesday"}, "'last tuesday' is not an ISO 8601 date or datetime"),
        ({"id": "ex003", "when": True}, "True is a bool, not a number or an ISO 8601 string"),
        ({"id": "ex003", "when": None}, "None is a NoneType, not a number"),
        ({"id": "ex003", "when": [2024, 1, 1]}, "is a list, not a number"),
        ({"id": "ex003", "when": 5}, "mixes kinds of time that do not sort together: row 'ex000' has '2024-01-01'"),
        ({"id": "ex003", "when": "2024-01-04T00:00:00Z"}, "(aware ISO datetime), row 'ex000' has '2024-01-01' (naive"),
    ],
)
def test_bad_times_are_refused_naming_the_row(tmp_path: Path, bad: dict[str, object], message: str) -> None:
    rows = _rows([f"2024-01-{d:02d}" for d in range(1, 7)])
    rows[3] = bad
    src = _write(tmp_path / "data.jsonl", rows)
    with pytest.raises(SplitError) as err:
        make_split(src, tmp_path / "split.json", FRACTIONS, seed=0, by_time="when")
    assert message in str(err.value)
    if "no field" not in message:
        assert "by_time accepts either numbers (e.g. Unix timestamps) or ISO 8601" in str(err.value)
    assert not (tmp_path / "split.json").exists()


def test_non_finite_numbers_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "data.jsonl"
    src.write_text('{"id": "a", "when": 1}\n{"id": "b", "when": NaN}\n')
    with pytest.raises(SplitError, match="row 'b': when nan is not a finite number"):
        make_split(src, tmp_path / "split.json", {"train": 0.5, "test": 0.5}, seed=0, by_time="when")


def test_by_time_and_stratify_by_cannot_be_combined(tmp_path: Path) -> None:
    src = _write(tmp_path / "data.jsonl", _rows([1, 2, 3]))
    with pytest.raises(SplitError, match="by_time='when' and stratify_by='text' cannot be combined"):
        make_split(src, tmp_path / "split.json", FRACTIONS, seed=0, stratify_by="text", by_time="when")
