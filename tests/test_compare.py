"""Properties of the pure comparison and of tolerance parsing (hypothesis)."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from pytest_repro.compare import compare_losses, compare_records, compare_tensor  # noqa: E402
from pytest_repro.record import Record  # noqa: E402
from pytest_repro.tolerances import (  # noqa: E402
    BITWISE,
    CLOSE,
    Tolerance,
    ToleranceError,
    ToleranceSpec,
    parse_tolerance,
)

finite = st.floats(allow_nan=False, allow_infinity=False, width=32, min_value=-1e6, max_value=1e6)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def records(draw: st.DrawFn) -> Record:
    losses = draw(st.lists(finite, min_size=1, max_size=12))
    n_weights = draw(st.integers(1, 4))
    weights = {}
    for i in range(n_weights):
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
        dtype = draw(st.sampled_from(DTYPES))
        seed = draw(st.integers(0, 2**16))
        weights[f"layer{i}.weight"] = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    metrics = draw(st.dictionaries(st.sampled_from(["acc", "loss", "f1"]), finite, max_size=3))
    return Record(losses=losses, weights=weights, metrics=metrics, outputs={"logits": torch.arange(6.0).reshape(2, 3)})


def clone(r: Record) -> Record:
    return Record(
        losses=list(r.losses),
        weights={k: v.clone() for k, v in r.weights.items()},
        metrics=dict(r.metrics),
        outputs={k: v.clone() for k, v in r.outputs.items()},
    )


@given(records())
@settings(max_examples=60, deadline=None)
def test_record_matches_itself_bitwise(r: Record) -> None:
    assert compare_records(r, clone(r), ToleranceSpec()).ok


@given(records(), st.data())
@settings(max_examples=80, deadline=None)
def test_single_weight_change_is_found_and_located(r: Record, data: st.DataObject) -> None:
    names = list(r.weights)
    pos = data.draw(st.integers(0, len(names) - 1))
    name = names[pos]
    other = clone(r)
    flat = other.weights[name].reshape(-1)
    idx = data.draw(st.integers(0, flat.numel() - 1))
    old = flat[idx].item()
    new = data.draw(finite.filter(lambda v: v != old))
    flat[idx] = new
    assume(flat[idx].item() != old)  # the dtype may round the new value back to the old one
    cmp = compare_records(r, other, ToleranceSpec())
    assert not cmp.ok
    diffs = [d for d in cmp.differences if d.section == "weights"]
    assert len(diffs) == 1
    d = diffs[0]
    assert d.key == name and d.position == pos and d.n_diff == 1
    expected_index = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), r.weights[name].shape))
    assert d.index == expected_index
    assert d.max_abs == pytest.approx(abs(flat[idx].double().item() - old), rel=1e-12)


@given(st.lists(finite, min_size=1, max_size=20), st.data())
def test_single_loss_change_is_found_at_its_step(losses: list[float], data: st.DataObject) -> None:
    step = data.draw(st.integers(0, len(losses) - 1))
    changed = list(losses)
    changed[step] = data.draw(finite.filter(lambda v: v != losses[step]))
    diffs = compare_losses(losses, changed, BITWISE)
    assert len(diffs) == 1 and diffs[0].step == step and diffs[0].n_diff == 1


@given(
    st.lists(finite, min_size=1, max_size=8),
    st.lists(finite, min_size=1, max_size=8),
    st.floats(0, 10),
    st.floats(0, 10),
    st.floats(0, 1),
)
def test_tolerance_is_monotone(a: list[float], b: list[float], atol: float, extra: float, rtol: float) -> None:
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    tight = Tolerance("explicit", atol, rtol)
    loose = Tolerance("explicit", atol + extra, rtol)
    if not compare_losses(a, b, tight):
        assert not compare_losses(a, b, loose)
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    if compare_tensor("weights", "w", ta, tb, tight) is None:
        assert compare_tensor("weights", "w", ta, tb, loose) is None


def test_nan_handling_is_explicit() -> None:
    nan = float("nan")
    # bitwise: identical bits (NaN included) match
    assert not compare_losses([1.0, nan], [1.0, nan], BITWISE)
    # close: NaN never equals NaN unless equal_nan is set
    assert compare_losses([1.0, nan], [1.0, nan], CLOSE)[0].step == 1
    assert not compare_losses([1.0, nan], [1.0, nan], Tolerance("explicit", 0.1, 0.0, equal_nan=True))
    t = torch.tensor([1.0, nan])
    assert compare_tensor("weights", "w", t, t.clone(), BITWISE) is None
    assert compare_tensor("weights", "w", t, t.clone(), CLOSE) is not None
    assert compare_tensor("weights", "w", t, t.clone(), Tolerance("explicit", 0, 0, equal_nan=True)) is None
    d = compare_tensor("weights", "w", t, torch.tensor([1.0, 2.0]), BITWISE)
    assert d is not None and d.index == (1,) and math.isnan(d.max_abs)


def test_bitwise_distinguishes_signed_zero_and_close_does_not() -> None:
    a, b = torch.tensor([0.0]), torch.tensor([-0.0])
    assert compare_tensor("outputs", "x", a, b, BITWISE) is not None
    assert compare_tensor("outputs", "x", a, b, CLOSE) is None


@pytest.mark.parametrize(
    ("dtype", "rtol", "atol"),
    [("float32", 1.3e-6, 1e-5), ("bfloat16", 1.6e-2, 1e-5), ("float16", 1e-3, 1e-5), ("float64", 1e-7, 1e-7)],
)
def test_close_defaults_match_torch_testing(dtype: str, rtol: float, atol: float) -> None:
    assert CLOSE.limits(dtype) == (atol, rtol)
    expected = torch.randn(64, generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
    for scale in (0.0, 0.3, 0.9, 1.5, 4.0):
        step = scale * (atol + rtol * expected.double().abs())
        actual = (expected.double() + step).to(expected.dtype)
        try:
            torch.testing.assert_close(actual, expected)
            torch_ok = True
        except AssertionError:
            torch_ok = False
        assert (compare_tensor("w", "x", expected, actual, CLOSE) is None) == torch_ok, scale


def test_shape_dtype_missing_and_extra_are_reported() -> None:
    a = Record(weights={"w": torch.zeros(2), "only_a": torch.zeros(1)})
    b = Record(weights={"w": torch.zeros(3), "only_b": torch.zeros(1)})
    kinds = {(d.key, d.kind) for d in compare_records(a, b, ToleranceSpec()).differences}
    assert kinds == {("w", "shape"), ("only_a", "missing"), ("only_b", "extra")}
    c = Record(weights={"w": torch.zeros(2, dtype=torch.float64)})
    assert compare_records(Record(weights={"w": torch.zeros(2)}), c, ToleranceSpec()).differences[0].kind == "dtype"
    assert compare_losses([1.0, 2.0], [1.0], BITWISE)[0].kind == "length"


def test_tolerance_spec_parsing_and_lookup() -> None:
    spec = parse_tolerance(
        {
            "losses": "bitwise",
            "weights": {"*.lora_A.*": "close", "default": {"atol": 1e-3}},
            "metrics": {"accuracy": {"atol": 0.01}},
            "default": "close",
        }
    )
    assert spec.for_key("losses") == BITWISE
    assert spec.for_key("weights", "layers.0.lora_A.default.weight") == CLOSE
    assert spec.for_key("weights", "layers.0.lora_B.default.weight") == Tolerance("explicit", 1e-3, 0.0)
    assert spec.for_key("metrics", "accuracy") == Tolerance("explicit", 0.01, 0.0)
    assert spec.for_key("metrics", "loss") == CLOSE
    assert spec.for_key("outputs", "logits") == CLOSE
    assert parse_tolerance("bitwise").is_bitwise and not spec.is_bitwise


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("exact", "unknown tolerance 'exact'"),
        ({"atol": -1}, "tolerance.atol: expected a finite number >= 0"),
        ({"atol": "1e-3"}, "tolerance.atol: expected a number >= 0"),
        ({"weight": "close"}, "unknown section(s) 'weight'"),
        ({"metrics": {"acc": {"x": {"atol": 1}}}}, "tolerance.metrics.acc: expected a tolerance"),
        (3, "expected a tolerance, got 3"),
    ],
)
def test_bad_tolerances_are_rejected_with_their_path(value: object, message: str) -> None:
    with pytest.raises(ToleranceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_tolerance(value)
