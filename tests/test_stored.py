"""Loaded records read their tensors from the verified files on demand, in chunks (bounded memory)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import pickle
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from pytest_repro._judge.compare import compare_records, section_max_abs  # noqa: E402
from pytest_repro._judge.finite import find_non_finite  # noqa: E402
from pytest_repro._judge.tensor_compare import compare_tensor  # noqa: E402
from pytest_repro._judge.tolerances import BITWISE, CLOSE, ToleranceSpec  # noqa: E402
from pytest_repro.record import (  # noqa: E402
    CorruptRecordError,
    Record,
    RecordError,
    close_record,
    load_record,
    release_record,
    save_record,
    user_view,
)
from pytest_repro.tensorfile import StoredTensor  # noqa: E402

DTYPES = [
    *([torch.float8_e8m0fnu] if hasattr(torch, "float8_e8m0fnu") else []),
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.complex64,
]


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if not (dtype.is_floating_point or dtype.is_complex):
        return torch.randint(0, 100, shape, generator=g).to(dtype)
    return torch.randn(shape, generator=g, dtype=torch.complex64 if dtype.is_complex else torch.float32).to(dtype)


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@given(
    shape=st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    chunk=st.integers(1, 40),
)
@settings(max_examples=80, deadline=None)
def test_stored_tensor_reads_back_bitwise_whole_and_in_chunks(
    tmp_path_factory: pytest.TempPathFactory, shape: tuple[int, ...], dtype: torch.dtype, seed: int, chunk: int
) -> None:
    folder = tmp_path_factory.mktemp("rec")
    t = _tensor(shape, dtype, seed)
    save_record(Record(weights={"t": t, "other": torch.ones(3)}), folder)
    stored = load_record(folder).weights["t"]
    assert isinstance(stored, StoredTensor)
    assert stored.shape == tuple(t.shape) and stored.dtype == t.dtype and stored.numel() == t.numel()
    assert stored.load().shape == t.shape and _bytes(stored.load()) == _bytes(t)
    chunks = [c.clone() for c in stored.chunks(chunk)]
    assert all(c.numel() <= chunk for c in chunks)
    joined = torch.cat(chunks) if chunks else torch.empty(0, dtype=dtype)
    assert _bytes(joined) == _bytes(t)
    if t.numel() > 2:
        assert _bytes(stored.read(1, 2)) == _bytes(t.reshape(-1)[1:3])


@given(
    n=st.integers(1, 300),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 2**16),
    flips=st.lists(st.integers(0, 299), max_size=5),
    scale=st.sampled_from([1e-7, 1e-3, 1.0]),
)
@settings(max_examples=60, deadline=None)
def test_comparing_stored_tensors_finds_what_comparing_in_memory_finds(
    tmp_path_factory: pytest.TempPathFactory,
    n: int,
    dtype: torch.dtype,
    seed: int,
    flips: list[int],
    scale: float,
) -> None:
    a = _tensor((n,), dtype, seed)
    b = a.clone()
    for i in flips:
        if i < n:
            b[i] = (b[i].to(torch.float64) + scale).to(dtype)
    fa, fb = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    save_record(Record(weights={"w": a}), fa)
    save_record(Record(weights={"w": b}), fb)
    sa, sb = load_record(fa).weights["w"], load_record(fb).weights["w"]
    for tol in (BITWISE, CLOSE):
        want = compare_tensor("weights", "w", a, b, tol, chunk_elements=16)
        assert compare_tensor("weights", "w", sa, sb, tol, chunk_elements=16) == want
        assert compare_tensor("weights", "w", sa, b, tol, chunk_elements=16) == want  # one side in memory
        assert compare_tensor("weights", "w", a, sb, tol, chunk_elements=7) == want
    assert section_max_abs(Record(weights={"w": sa}), Record(weights={"w": sb})) == section_max_abs(
        Record(weights={"w": a}), Record(weights={"w": b})
    )


def test_non_finite_values_are_found_in_stored_tensors(tmp_path: Path) -> None:
    w = torch.zeros(3_000_000)
    w[2_500_001] = float("nan")
    w[2_900_000] = float("inf")
    save_record(Record(weights={"w": w.reshape(3, 1_000_000)}), tmp_path)
    (bad,) = find_non_finite(load_record(tmp_path), lambda section, key: False)
    assert (bad.section, bad.key, bad.count, bad.first) == ("weights", "w", 2, "at index (2, 500001)")
    assert bad.value != bad.value  # NaN


def test_a_loaded_record_reads_the_verified_bytes_even_after_its_file_is_replaced(tmp_path: Path) -> None:
    save_record(Record(losses=[1.0], weights={"w": torch.full((1000,), 1.0)}), tmp_path / "ref")
    loaded = load_record(tmp_path / "ref")
    save_record(Record(losses=[2.0], weights={"w": torch.full((1000,), 2.0)}), tmp_path / "new")
    os.replace(tmp_path / "new" / "weights.safetensors", tmp_path / "ref" / "weights.safetensors")
    stored = loaded.weights["w"]
    assert isinstance(stored, StoredTensor)
    assert bool((stored.load() == 1.0).all())  # the file it verified, not the one now at the path
    close_record(loaded)
    assert loaded.weights == {}
    with pytest.raises(RecordError, match="closed"):
        stored.load()


def test_writing_a_loaded_record_copies_its_files_and_a_changed_one_is_serialized(tmp_path: Path) -> None:
    src = Record(losses=[1.0], weights={"b": torch.arange(5.0), "a": torch.ones(2, 2)}, outputs={"o": torch.zeros(3)})
    save_record(src, tmp_path / "src")
    loaded = load_record(tmp_path / "src")
    save_record(loaded, tmp_path / "copy")
    for name in ("weights.safetensors", "outputs.safetensors"):
        assert (tmp_path / "copy" / name).read_bytes() == (tmp_path / "src" / name).read_bytes()
    # a subset of the tensors, or tensors moved to another section: serialized again, still equal
    save_record(Record(weights={"b": loaded.weights["b"]}, outputs=dict(loaded.weights)), tmp_path / "mixed")
    again = user_view(load_record(tmp_path / "mixed"))
    assert list(again.weights) == ["b"] and torch.equal(again.weights["b"], torch.arange(5.0))
    assert list(again.outputs) == ["b", "a"] and torch.equal(again.outputs["a"], torch.ones(2, 2))
    assert compare_records(load_record(tmp_path / "copy"), src, ToleranceSpec(default=BITWISE)).ok


def test_the_record_a_test_gets_holds_plain_dicts_of_tensors_read_on_first_use(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_record(Record(weights={"w": torch.arange(4.0)}, ranks={1: Record(weights={"w": torch.ones(2)})}), tmp_path)
    loaded = load_record(tmp_path)
    view = user_view(loaded)
    assert "weights" not in vars(view)  # nothing read yet
    assert type(view.weights) is dict and isinstance(view.weights["w"], torch.Tensor)
    assert view.weights is view.weights and view.outputs == {}
    assert torch.equal(view.ranks[1].weights["w"], torch.ones(2))
    view.weights["extra"] = torch.zeros(1)  # a plain, mutable state dict
    save_file(view.weights | {}, str(tmp_path / "mine.safetensors"))
    fresh = user_view(loaded)
    for copied in (pickle.loads(pickle.dumps(fresh)), copy.deepcopy(fresh)):  # before first use, too
        assert type(copied.weights) is dict and torch.equal(copied.weights["w"], torch.arange(4.0))
    assert dataclasses.asdict(user_view(loaded))["weights"]["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert dataclasses.replace(user_view(loaded), losses=[9.0]).weights["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = view.nope


def test_a_released_record_reopens_its_file_only_if_it_is_still_the_verified_one(tmp_path: Path) -> None:
    save_record(Record(weights={"w": torch.full((10,), 1.0)}), tmp_path / "ref")
    loaded = load_record(tmp_path / "ref")
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    release_record(loaded)
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds - 1
    stored = loaded.weights["w"]
    assert isinstance(stored, StoredTensor) and bool((stored.load() == 1.0).all())  # reopened
    release_record(loaded)
    save_record(Record(weights={"w": torch.full((10,), 2.0)}), tmp_path / "new")
    os.replace(tmp_path / "new" / "weights.safetensors", tmp_path / "ref" / "weights.safetensors")
    with pytest.raises(CorruptRecordError, match="changed after it was verified"):
        stored.load()


def test_a_released_file_edited_in_place_with_its_mtime_restored_is_refused(tmp_path: Path) -> None:
    save_record(Record(weights={"w": torch.full((10,), 1.0)}), tmp_path)
    loaded = load_record(tmp_path)
    release_record(loaded)
    path = tmp_path / "weights.safetensors"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    with open(path, "r+b") as fh:  # same inode, same size
        fh.write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as rsync -t or touch -r would
    with pytest.raises(CorruptRecordError, match="changed after it was verified"):
        loaded.weights["w"].load()  # type: ignore[union-attr]


def test_a_released_file_that_is_gone_says_why(tmp_path: Path) -> None:
    save_record(Record(weights={"w": torch.ones(3)}), tmp_path)
    loaded = load_record(tmp_path)
    release_record(loaded)
    (tmp_path / "weights.safetensors").unlink()
    with pytest.raises(RecordError, match=r"the file is gone .* during the session"):
        user_view(loaded).weights  # noqa: B018


def test_threads_reading_one_record_get_the_right_tensors(tmp_path: Path) -> None:
    import threading

    tensors = {f"t{i}": torch.full((64,), float(i)) for i in range(200)}
    save_record(Record(weights=tensors), tmp_path)
    loaded = load_record(tmp_path)
    view = user_view(loaded)
    seen: list[object] = []
    wrong: list[str] = []
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def read(offset: int) -> None:
        try:
            seen.append(view.weights)
            for i in range(offset, offset + 1000):
                name = f"t{i % 200}"
                stored = loaded.weights[name]
                assert isinstance(stored, StoredTensor)
                if not bool((stored.load() == float(i % 200)).all()):
                    wrong.append(name)
        except Exception as exc:  # reported below
            wrong.append(repr(exc))

    try:
        threads = [threading.Thread(target=read, args=(k * 37,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    assert wrong == []
    assert all(d is seen[0] for d in seen) and torch.equal(view.weights["t3"], tensors["t3"])


def test_the_returned_record_behaves_like_plain_attributes_without_reading_for_repr(tmp_path: Path) -> None:
    save_record(Record(losses=[1.0, 2.0], weights={"w": torch.ones(2)}, metrics={"acc": 0.5}), tmp_path)
    view = user_view(load_record(tmp_path))
    text = repr(view)
    assert "weights=['w']" in text and "<2 steps>" in text and "weights" not in vars(view)
    view.weights = {"mine": torch.zeros(1)}
    del view.weights  # the stored tensors do not come back
    with pytest.raises(AttributeError):
        _ = view.weights
    del view.outputs
    with pytest.raises(AttributeError):
        _ = view.outputs


def test_a_tensor_file_that_cannot_be_opened_is_an_os_error_not_corruption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from pytest_repro import tensorfile as tensorfile_module

    save_record(Record(weights={"w": torch.ones(2)}), tmp_path)

    def no_fds(path: object, *args: object, **kwargs: object) -> object:
        if str(path).endswith(".safetensors"):
            raise OSError(errno.EMFILE, "Too many open files", str(path))
        return open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(tensorfile_module, "open", no_fds, raising=False)
    with pytest.raises(OSError, match="Too many open files") as info:
        load_record(tmp_path)
    assert not isinstance(info.value, CorruptRecordError)


def test_a_dtype_this_torch_lacks_is_a_clear_corrupt_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_repro import tensorfile as tensorfile_module

    # float8 (and unsigned 16-64 bit) dtypes are newer than some supported torch releases: checked at load
    save_record(Record(weights={"w": torch.ones(2).to(torch.float8_e5m2)}), tmp_path)
    monkeypatch.setitem(tensorfile_module._DTYPES, "F8_E5M2", "float8_from_the_future")
    with pytest.raises(
        CorruptRecordError, match=r"'w': holds dtype float8_from_the_future \(safetensors F8_E5M2\), which torch"
    ):
        load_record(tmp_path)


def _one_check(pytester: pytest.Pytester) -> None:
    """A project with one reproducible test (test_it.py::test_it) whose job returns a loss and one tensor."""
    pytester.makepyfile(
        test_it="""
        import pytest, torch

        def job(ctx):
            return {"losses": [1.0], "weights": {"w": torch.ones(3)}}

        @pytest.mark.reproducible
        def test_it(repro):
            repro.check(job)
        """
    )
    pytester.makeini("[pytest]\nrepro_config_audit = off\n")


def test_a_record_file_broken_during_the_check_is_an_error_with_its_fix(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest_repro._judge.policy as policy
        from pytest_repro.record import CorruptRecordError

        def broken(*args, **kwargs):
            raise CorruptRecordError("reference_outputs/x/weights.safetensors", "the file ended while being read")

        policy.compare = broken
        """
    )
    _one_check(pytester)
    result = pytester.runpytest_subprocess("--repro", "--repro-regen=missing", "-p", "no:cacheprovider")
    assert result.ret == 1
    out = result.stdout.str()
    assert "ERROR" in out and "a record became unreadable" in out and "Traceback" not in out
    result.stdout.fnmatch_lines(
        ["*the file ended while being read*", "Nothing was written*rerun: pytest --repro test_it.py::test_it"]
    )
    assert not list(pytester.path.rglob("record.json"))  # nothing written


def test_records_a_session_keeps_hold_no_open_files(pytester: pytest.Pytester) -> None:
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd (Linux) to count open files")
    pytester.makepyfile(
        test_keep="""
        import os, pytest, torch

        KEPT = []

        def job(ctx):
            w = torch.full((4,), float(ctx.config["i"]))
            return {"losses": [1.0], "weights": {"w": w}, "outputs": {"o": torch.ones(2)}}

        @pytest.mark.reproducible
        @pytest.mark.parametrize("i", range(12))
        def test_keep(repro, i):
            KEPT.append(repro.check(job, config={"i": i}))
            if i == 0:
                KEPT.append(len(os.listdir("/proc/self/fd")))
            if i == 11:
                assert len(os.listdir("/proc/self/fd")) <= KEPT[1] + 2
                assert KEPT[0].weights["w"].tolist() == [0.0] * 4 and KEPT[-1].weights["w"].tolist() == [11.0] * 4
        """
    )
    pytester.makeini("[pytest]\nrepro_config_audit = off\n")
    result = pytester.runpytest_subprocess("--repro", "--repro-regen=missing", "-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str()
    result = pytester.runpytest_subprocess("--repro", "-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str()


def _write_raw(path: Path, header: dict[str, object], data: bytes, pad: bytes = b"") -> None:
    body = json.dumps(header).encode() + pad
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


@pytest.mark.parametrize(
    ("header", "data", "problem"),
    [
        ({"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "malformed entry"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "4 bytes for shape"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "malformed entry"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "8 data bytes"),
        (
            {
                "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "v": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            },
            b"\0" * 4,
            "overlaps or leaves gaps",
        ),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"a": 1}}, b"\0" * 4, "meta"),
        ({"w": "F32"}, b"", "malformed entry"),
    ],
)
def test_malformed_safetensors_headers_are_corrupt_not_trusted(
    tmp_path: Path, header: dict[str, object], data: bytes, problem: str
) -> None:
    save_record(Record(weights={"w": torch.zeros(1)}), tmp_path)
    path = tmp_path / "weights.safetensors"
    _write_raw(path, header, data)
    index = json.loads((tmp_path / "record.json").read_text())
    index["tensors"]["weights"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    index["tensors"]["weights"]["keys"] = [k for k in header if k != "__metadata__"]
    (tmp_path / "record.json").write_text(json.dumps(index))
    with pytest.raises(CorruptRecordError, match=problem):
        load_record(tmp_path)


def test_a_header_longer_than_the_file_is_corrupt(tmp_path: Path) -> None:
    save_record(Record(weights={"w": torch.zeros(1)}), tmp_path)
    path = tmp_path / "weights.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    index = json.loads((tmp_path / "record.json").read_text())
    index["tensors"]["weights"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "record.json").write_text(json.dumps(index))
    with pytest.raises(CorruptRecordError, match="header length"):
        load_record(tmp_path)


def test_a_reference_the_system_will_not_open_is_an_error_that_names_the_limit(pytester: pytest.Pytester) -> None:
    _one_check(pytester)
    assert pytester.runpytest_subprocess("--repro", "--repro-regen=missing", "-p", "no:cacheprovider").ret == 0
    files = sorted(pytester.path.glob("reference_outputs/**/*.safetensors"))
    before = [f.read_bytes() for f in files]
    pytester.makeconftest(
        """
        import errno
        import pytest_repro.tensorfile as tensorfile

        def no_fds(path, *args, **kwargs):
            if "reference_outputs" in str(path) and str(path).endswith(".safetensors"):
                raise OSError(errno.EMFILE, "Too many open files", str(path))
            return open(path, *args, **kwargs)

        tensorfile.open = no_fds
        """
    )
    for regen in ([], ["--repro-regen=missing"]):
        result = pytester.runpytest_subprocess("--repro", *regen, "-p", "no:cacheprovider")
        assert result.ret == 1
        out = result.stdout.str()
        assert "cannot be read" in out and "Too many open files" in out and "ulimit -n" in out, out
        assert "corrupt" not in out.lower() and "Traceback" not in out
    assert [f.read_bytes() for f in files] == before
