"""Stored tensors judged from their bytes, without torch: equal bytes, non-finite elements (vs torch's answers)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from pytest_repro._judge.finite import find_non_finite  # noqa: E402
from pytest_repro._judge.tensor_compare import compare_tensor, max_abs_diff  # noqa: E402
from pytest_repro._judge.tolerances import BITWISE, ToleranceSpec  # noqa: E402
from pytest_repro.record import Record  # noqa: E402
from pytest_repro.tensorfile import StoredTensor, open_tensor_file, write_tensor_file  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64, torch.int32]
SPECIAL = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0]


def _stored(tmp: Path, name: str, tensor: torch.Tensor) -> StoredTensor:
    path = tmp / f"{name}.safetensors"
    digest = write_tensor_file({"t": tensor}, path, "weights")
    return open_tensor_file(path, ["t"], digest)["t"]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(0, 40))
    values = draw(st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=n, max_size=n))
    t = torch.tensor(values, dtype=torch.float64)
    for i in draw(st.lists(st.integers(0, max(0, n - 1)), max_size=4)) if n else []:
        t[i] = draw(st.sampled_from(SPECIAL))
    if dtype == torch.int32:
        return torch.nan_to_num(t, nan=0.0, posinf=7, neginf=-7).to(torch.int32)
    return t.to(dtype)


@settings(max_examples=150, deadline=None)
@given(tensors(), st.integers(-1, 39), st.booleans())
def test_same_bytes_is_bitwise_equality(
    tmp_path_factory: pytest.TempPathFactory, t: torch.Tensor, flip: int, shape: bool
) -> None:
    tmp = tmp_path_factory.mktemp("b")
    other = t.clone()
    if 0 <= flip < t.numel():  # change one element's bits
        other.view(-1).view(torch.uint8)[flip * t.element_size()] ^= 1
    if shape and t.numel() % 2 == 0 and t.numel():
        other = other.reshape(2, -1)
    a, b = _stored(tmp, "a", t), _stored(tmp, "b", other)
    bitwise = t.shape == other.shape and torch.equal(t.view(-1).view(torch.uint8), other.view(-1).view(torch.uint8))
    assert a.same_bytes(b) is bitwise
    assert (compare_tensor("weights", "t", a, b, BITWISE) is None) is bitwise
    if bitwise:  # the figure is the one the torch path gives (a stored tensor against a tensor in memory)
        fast, slow = max_abs_diff(a, b), max_abs_diff(a, other)
        assert fast == slow or (math.isnan(fast) and math.isnan(slow))


@settings(max_examples=150, deadline=None)
@given(tensors())
def test_non_finite_from_bytes_matches_torch(tmp_path_factory: pytest.TempPathFactory, t: torch.Tensor) -> None:
    stored = _stored(tmp_path_factory.mktemp("f"), "t", t)
    fast = stored.non_finite()
    if t.dtype == torch.int32:
        assert fast is None and not stored.floating
        return
    bad = ~t.reshape(-1).isfinite()
    count = int(bad.sum())
    assert fast is not None and fast[0] == count
    if count:
        first = int(bad.nonzero()[0, 0])
        assert fast[1] == first
        expected = complex(t.reshape(-1)[first].to(torch.complex128))
        got = fast[2]
        for x, y in ((got.real, expected.real), (got.imag, expected.imag)):
            assert (math.isnan(x) and math.isnan(y)) or x == y


def test_a_record_with_nan_weights_is_still_found_without_torch(tmp_path: Path) -> None:
    weights = {"w": _stored(tmp_path, "w", torch.tensor([1.0, math.nan, 2.0], dtype=torch.bfloat16))}
    record = Record(losses=[1.0], weights=weights)
    [found] = find_non_finite(record, lambda section, key: False)
    assert (found.section, found.key, found.count) == ("weights", "w", 1)
    assert found.first == "at index (1,)" and math.isnan(found.value)


def test_a_stored_tensor_says_its_dtype_without_importing_torch_until_asked(tmp_path: Path) -> None:
    stored = _stored(tmp_path, "t", torch.zeros(3, dtype=torch.float16))
    assert stored.dtype_code == "F16" and stored._dtype is None and stored.element_size() == 2
    assert stored.dtype == torch.float16
    assert ToleranceSpec  # the spec type is importable alongside (used by the compare tests)
