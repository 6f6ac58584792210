"""Properties of the pure comparison and of tolerance parsing (hypothesis)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from pytest_repro._judge.compare import (  # noqa: E402
    compare_losses,
    compare_metrics,
    compare_records,
    section_max_abs,
)
from pytest_repro._judge.difference import Difference  # noqa: E402
from pytest_repro._judge.tensor_compare import compare_tensor  # noqa: E402
from pytest_repro._judge.tolerances import (  # noqa: E402
    BITWISE,
    CLOSE,
    Tolerance,
    ToleranceError,
    ToleranceSpec,
    parse_tolerance,
)
from pytest_repro.record import Record  # noqa: E402

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


# --- chunked comparison == the whole-tensor reference (the implementation before chunking) ---


def reference_compare(e: torch.Tensor, a: torch.Tensor, tol: Tolerance) -> tuple[object, ...] | None:
    """The pre-chunking compare_tensor, value part: (n_diff, index, max_abs, max_rel) or None."""
    from pytest_repro._judge.tensor_compare import _bits

    numel = e.numel()
    if tol.kind == "bitwise":
        bad = (_bits(e) != _bits(a)).reshape(-1)
        if bad.dim() and bad.numel() != numel:
            bad = bad.reshape(numel, -1).any(dim=1)
    else:
        atol, rtol = tol.limits(str(e.dtype).replace("torch.", ""))
        e_ = e.reshape(-1).to(torch.complex128 if e.dtype.is_complex else torch.float64)
        a_ = a.reshape(-1).to(e_.dtype)
        close = (a_ == e_) | ((a_ - e_).abs() <= atol + rtol * e_.abs())
        if tol.equal_nan:
            close |= e_.isnan() & a_.isnan()
        bad = ~close
    n_diff = int(bad.sum())
    if n_diff == 0:
        return None
    flat_first = int(torch.nonzero(bad)[0, 0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_first), e.shape)) if e.dim() else ()
    e64 = e.reshape(-1)[bad].to(torch.complex128 if e.dtype.is_complex else torch.float64)
    a64 = a.reshape(-1)[bad].to(e64.dtype)
    absdiff = (a64 - e64).abs()
    max_abs = float(absdiff.max()) if not absdiff.isnan().any() else math.nan
    rel = torch.where(e64.abs() > 0, absdiff / e64.abs(), torch.where(absdiff > 0, math.inf, 0.0))
    max_rel = float(rel.max()) if not rel.isnan().any() else math.nan
    return (n_diff, index, max_abs, max_rel)


def figures(d: Difference | None) -> tuple[object, ...] | None:
    return None if d is None else (d.n_diff, d.index, d.max_abs, d.max_rel)


def same_figures(x: tuple[object, ...] | None, y: tuple[object, ...] | None, complex_: bool = False) -> bool:
    """Equal figures, NaN equal to NaN; complex moduli to 1e-15 (torch's vectorised and scalar |z| differ by an ulp)."""
    if x is None or y is None:
        return x is y

    def same(u: object, v: object) -> bool:
        if isinstance(u, float) and isinstance(v, float):
            if math.isnan(u) or math.isnan(v):
                return math.isnan(u) and math.isnan(v)
            return u == v or (complex_ and math.isclose(u, v, rel_tol=1e-15))
        return u == v

    return all(same(u, v) for u, v in zip(x, y, strict=True))


SPECIAL = [0.0, -0.0, math.nan, -math.nan, math.inf, -math.inf, 1.0, -2.5, 1e-7, 3e4]
values = st.one_of(st.sampled_from(SPECIAL), st.floats(-1e4, 1e4, width=32))
ALL_DTYPES = [*DTYPES, torch.complex64, torch.complex128, torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn]
tolerances = st.one_of(
    st.sampled_from([BITWISE, CLOSE]),
    st.builds(
        lambda atol, rtol, nan: Tolerance("explicit", atol, rtol, nan),
        st.sampled_from([0.0, 1e-6, 1e-3, 0.5]),
        st.sampled_from([0.0, 1e-6, 1e-2]),
        st.booleans(),
    ),
)


@st.composite
def tensor_pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    shape = tuple(draw(st.lists(st.integers(1, 5), max_size=3)))
    numel = math.prod(shape)
    dtype = draw(st.sampled_from(ALL_DTYPES))
    width = 2 if dtype.is_complex else 1
    exp = draw(st.lists(values, min_size=numel * width, max_size=numel * width))
    act = []
    for v in exp:
        how = draw(st.sampled_from(["same", "same", "same", "tiny", "other"]))
        act.append(v if how == "same" else v * (1 + 1e-6) + 1e-9 if how == "tiny" else draw(values))

    def make(xs: list[float]) -> torch.Tensor:
        t = torch.tensor(xs, dtype=torch.float64)
        if dtype.is_complex:
            t = torch.view_as_complex(t.reshape(-1, 2))
        elif not dtype.is_floating_point:
            t = torch.nan_to_num(t, nan=0.0, posinf=1e4, neginf=-1e4)
        return t.to(dtype).reshape(shape)

    e, a = make(exp), make(act)
    if len(shape) >= 2 and draw(st.booleans()):  # same values, transposed strides: the copying path
        a = a.transpose(0, 1).contiguous().transpose(0, 1)
    if len(shape) >= 2 and draw(st.booleans()):
        e = e.transpose(0, 1).contiguous().transpose(0, 1)
    return e, a


@given(tensor_pairs(), tolerances, st.integers(1, 7))
@settings(max_examples=400, deadline=None)
def test_chunked_compare_equals_whole_tensor_reference(
    pair: tuple[torch.Tensor, torch.Tensor], tol: Tolerance, chunk: int
) -> None:
    e, a = pair
    ref = reference_compare(e, a, tol)
    for n in (chunk, None):
        got = compare_tensor("weights", "w", e, a, tol, chunk_elements=n)
        assert same_figures(figures(got), ref, e.dtype.is_complex), (n, figures(got), ref)
        if got is not None:
            assert got.numel == e.numel() and got.kind == "value"


@given(tensor_pairs(), st.integers(1, 7))
@settings(max_examples=200, deadline=None)
def test_chunked_section_max_abs_equals_whole_tensor(pair: tuple[torch.Tensor, torch.Tensor], chunk: int) -> None:
    e, a = pair
    wide = torch.complex128 if e.dtype.is_complex else torch.float64
    diff = (a.to(wide) - e.to(wide)).abs().max()
    want = math.nan if diff.isnan() else float(diff)
    for n in (chunk, None):
        got = section_max_abs(Record(weights={"w": e}), Record(weights={"w": a}), chunk_elements=n)["weights"]
        assert same_figures((got,), (want,), e.dtype.is_complex), (n, got, want)


def test_large_tensor_with_one_change_crosses_chunks() -> None:
    e = torch.randn(3, 1000, generator=torch.Generator().manual_seed(1))
    a = e.clone()
    a[2, 17] += 0.5
    for tol in (BITWISE, CLOSE):
        d = compare_tensor("weights", "w", e, a, tol, chunk_elements=64)
        assert d is not None and d.n_diff == 1 and d.index == (2, 17)
        assert same_figures(figures(d), reference_compare(e, a, tol))
    assert compare_tensor("weights", "w", e, e.clone(), CLOSE, chunk_elements=64) is None


def test_nan_in_both_is_explained() -> None:
    nan = math.nan
    e = torch.tensor([1.0, nan, 2.0, nan, nan])
    d = compare_tensor("weights", "w", e, e.clone(), CLOSE, chunk_elements=2)
    assert d is not None and d.n_diff == 3
    assert d.detail == "3 elements are NaN in both (NaN != NaN unless the tolerance sets equal_nan: true)"
    assert d.detail in d.describe()
    one = compare_tensor("weights", "w", e, torch.tensor([1.0, nan, 2.5, 0.0, 0.0]), CLOSE)
    assert one is not None and one.n_diff == 4 and one.detail.startswith("1 element is NaN in both")
    assert compare_tensor("weights", "w", e, e.clone(), Tolerance("explicit", 0, 0, equal_nan=True)) is None
    assert compare_tensor("weights", "w", e, torch.tensor([1.0, nan, 2.5, nan, nan]), BITWISE).detail == ""  # type: ignore[union-attr]
    losses = compare_losses([1.0, nan], [1.0, nan], CLOSE)
    assert "1 step is NaN in both" in losses[0].describe()
    metrics = compare_metrics({"acc": nan}, {"acc": nan}, ToleranceSpec(default=CLOSE))
    assert "NaN in both (NaN != NaN" in metrics[0].describe()
    ok = compare_tensor("weights", "w", torch.tensor([1.0]), torch.tensor([2.0]), CLOSE)
    assert (
        ok is not None
        and ok.detail == ""
        and replace(ok, detail="x").describe().endswith("; x [tolerance: close: atol=1e-05, rtol=1.3e-06]")
    )


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float8_e5m2, torch.float8_e4m3fn, torch.complex64]
)
def test_nan_and_inf_are_seen_in_every_float_dtype(dtype: torch.dtype) -> None:
    t = torch.tensor([1.0, math.nan, 2.0, 3.0]).to(dtype)
    d = compare_tensor("weights", "w", t, t.clone(), CLOSE, chunk_elements=2)
    assert d is not None and (d.n_diff, d.index) == (1, (1,)) and "NaN in both" in d.detail
    assert compare_tensor("weights", "w", t, t.clone(), BITWISE, chunk_elements=2) is None
    finite = Record(weights={"w": t[2:]})
    assert section_max_abs(finite, Record(weights={"w": t[2:].clone()}), chunk_elements=1)["weights"] == 0.0
    assert math.isnan(section_max_abs(Record(weights={"w": t}), Record(weights={"w": t.clone()}))["weights"])


def test_tensors_that_require_grad_are_compared() -> None:
    w = torch.nn.Linear(3, 3).weight
    assert compare_tensor("weights", "w", w, w.detach().clone(), CLOSE) is None
    d = compare_tensor("weights", "w", w, w.detach() + 1.0, BITWISE)
    assert d is not None and d.n_diff == 9
    assert section_max_abs(Record(weights={"w": w}), Record(weights={"w": w.detach() + 1}))["weights"] == pytest.approx(
        1.0
    )
