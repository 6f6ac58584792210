"""Pure comparison of two tensors: bitwise or within a tolerance, chunk by chunk in bounded memory.

No I/O of its own: tensors of loaded records (``StoredTensor``) are read chunk by chunk as compared.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..tensorfile import StoredTensor, TensorLike, flat_chunks
from .difference import Difference, describe_nan_both
from .tolerances import Tolerance

if TYPE_CHECKING:
    import torch

# Elements per chunk (half that for complex): one chunk at a time is upcast to float64/complex128, into
# ~5 reused buffers (~10 MB). The element-wise work runs in numpy: single-threaded, so it neither pays
# a thread-pool hand-off per operation nor oversubscribes cores shared with training jobs.
CHUNK_ELEMENTS = 1 << 18


def _bits(t: torch.Tensor) -> torch.Tensor:
    import torch

    int_of_size = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    size = t.element_size()
    if t.dtype.is_complex:
        t = torch.view_as_real(t)
        size //= 2
    return t.view(int_of_size[size]) if t.dim() else t.reshape(1).view(int_of_size[size])


def _wide(*dtypes: torch.dtype) -> torch.dtype:
    import torch

    return torch.complex128 if any(d.is_complex for d in dtypes) else torch.float64


def _plain(t: TensorLike) -> TensorLike:
    """Detach, and materialise a lazy conjugate or negation (no copy for ordinary tensors)."""
    return t if isinstance(t, StoredTensor) else t.detach().resolve_conj().resolve_neg()


def _on_cpu(*tensors: TensorLike) -> bool:
    return all(isinstance(t, StoredTensor) or t.device.type == "cpu" for t in tensors)


def _chunk_size(dtype: torch.dtype, chunk_elements: int | None) -> int:
    n = chunk_elements or CHUNK_ELEMENTS
    return max(1, n // 2) if dtype.is_complex else n


def _chunk_pairs(
    expected: TensorLike, actual: TensorLike, n: int, base: int = 0
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (flat offset, 1-D chunk of expected, same chunk of actual) in row-major order, at most n elements each.

    Contiguous tensors are sliced without copying, stored tensors read a chunk at a time; otherwise at most
    one chunk is copied at a time.
    """
    if isinstance(expected, StoredTensor) or isinstance(actual, StoredTensor):
        offsets = range(base, base + expected.numel(), n)
        yield from zip(offsets, flat_chunks(expected, n), flat_chunks(actual, n), strict=True)
        return
    if expected.dim() == 0:
        yield base, expected.reshape(1), actual.reshape(1)
        return
    if expected.is_contiguous() and actual.is_contiguous():
        ef, af = expected.view(-1), actual.view(-1)
        for s in range(0, ef.numel(), n):
            yield base + s, ef[s : s + n], af[s : s + n]
        return
    rows = expected.shape[0]
    row = expected.numel() // rows
    if row > n:
        for r in range(rows):
            yield from _chunk_pairs(expected[r], actual[r], n, base + r * row)
        return
    per = n // row
    for r in range(0, rows, per):
        yield base + r * row, expected[r : r + per].reshape(-1), actual[r : r + per].reshape(-1)


class _Work:
    """Chunk-sized numpy buffers reused across the chunks of one comparison, and bit-level probes."""

    def __init__(self, dtype: torch.dtype, wide: torch.dtype, n: int) -> None:
        import torch

        self.n = n
        self.wide = wide
        self._arrays: dict[str, Any] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        self._native: dict[torch.dtype, bool] = {}
        real = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}
        part = real.get(dtype, dtype)
        self.floating = part.is_floating_point
        self.inf_bits: int | None = None  # bits of +inf: magnitude bits above are NaN, equal are inf
        self.mask = 0
        if self.floating:
            inf = torch.tensor(math.inf).to(part)
            if bool(inf.double().isinf()):  # IEEE-like; float8 formats without inf use isnan() instead
                self.inf_bits = int(_bits(inf)[0])
                self.mask = (1 << (8 * inf.element_size() - 1)) - 1

    def array(self, name: str, shape: tuple[int, ...], dtype: Any) -> Any:
        """Return numpy buffer `name` viewed as shape, allocated on first use."""
        import numpy

        size = math.prod(shape)
        buf = self._arrays.get(name)
        if buf is None or buf.dtype != dtype or buf.size < size:
            buf = self._arrays[name] = numpy.empty(max(size, self.n), dtype=dtype)
        return buf[:size].reshape(shape)

    def widened(self, name: str, chunk: torch.Tensor) -> Any:
        """Return the chunk upcast to float64 (complex128) in buffer `name`, as a numpy array."""
        import numpy
        import torch

        t = self._tensors.get(name)
        if t is None:
            t = self._tensors[name] = self._new_tensor()
        out = t[: chunk.numel()]
        if chunk.dtype == torch.bfloat16:  # the top half of a float32: widen the bits in numpy
            u = self.array("bf16", (chunk.numel(),), numpy.uint32)
            numpy.copyto(u, _bits(chunk).numpy().view(numpy.uint16))
            numpy.left_shift(u, 16, out=u)
            numpy.copyto(out.numpy(), u.view(numpy.float32))
            return out.numpy()
        native = self._native.get(chunk.dtype)
        if native is None:
            try:
                chunk[:0].numpy()
                native = True
            except TypeError:  # float8, complex32: torch converts
                native = False
            self._native[chunk.dtype] = native
        if native:
            numpy.copyto(out.numpy(), chunk.numpy())
        else:
            out.copy_(chunk)
        return out.numpy()

    def _new_tensor(self) -> torch.Tensor:
        import torch

        return torch.empty(self.n, dtype=self.wide)

    def equal(self, be: Any, ba: Any) -> bool:
        """Whether two numpy bit views are identical."""
        import numpy

        return bool(numpy.equal(be, ba, out=self.array("eq", be.shape, bool)).all())

    def _max_magnitude(self, be: Any) -> int:
        import numpy

        return int(numpy.bitwise_and(be, self.mask, out=self.array("and", be.shape, be.dtype)).max())

    def has_nan(self, chunk: torch.Tensor, be: Any) -> bool:
        """Whether a chunk (with numpy bit view be) holds a NaN."""
        import numpy

        if not self.floating:
            return False
        if self.inf_bits is None:
            return bool(numpy.isnan(self.widened("e", chunk)).any())
        return self._max_magnitude(be) > self.inf_bits

    def has_non_finite(self, chunk: torch.Tensor, be: Any) -> bool:
        """Whether a chunk (with numpy bit view be) holds a NaN or an infinity."""
        import numpy

        if not self.floating:
            return False
        if self.inf_bits is None:
            return not bool(numpy.isfinite(self.widened("e", chunk)).all())
        return self._max_magnitude(be) >= self.inf_bits

    def abs_diff(self, a: Any, e: Any) -> Any:
        """Return |a - e| (float64) in buffer d."""
        import numpy

        d = self.array("d", e.shape, numpy.float64)
        if e.dtype.kind == "c":  # complex: as torch computes it ((inf+NaNj) - NaNj is NaN+NaNj in torch)
            import torch

            sub = torch.from_numpy(self.array("sub", e.shape, e.dtype))
            torch.sub(torch.from_numpy(a), torch.from_numpy(e), out=sub)
            return _modulus(sub.numpy(), d)
        return numpy.abs(numpy.subtract(a, e, out=d), out=d)


def _modulus(x: Any, out: Any) -> Any:
    """Write |x| of a numpy array into out; complex moduli as torch computes them."""
    import numpy

    if x.dtype.kind != "c":
        return numpy.abs(x, out=out)
    import torch

    torch.abs(torch.from_numpy(x), out=torch.from_numpy(out))
    return out


def compare_tensor(
    section: str,
    key: str,
    expected: TensorLike,
    actual: TensorLike,
    tol: Tolerance,
    position: int | None = None,
    *,
    chunk_elements: int | None = None,
) -> Difference | None:
    """Compare two tensors under a tolerance, chunk by chunk in bounded memory; return None when they agree."""
    from ..tensorfile import StoredTensor

    if (
        tol.kind == "bitwise"
        and isinstance(expected, StoredTensor)
        and isinstance(actual, StoredTensor)
        and expected.same_bytes(actual)
    ):
        return None  # same dtype, shape and bytes: bitwise equal, decided without torch
    import numpy
    import torch

    dtype = str(expected.dtype).replace("torch.", "")
    tdesc = tol.describe(dtype)
    if expected.shape != actual.shape:
        return Difference(
            section,
            key,
            "shape",
            tdesc,
            position=position,
            detail=f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}",
        )
    if expected.dtype != actual.dtype:
        return Difference(
            section, key, "dtype", tdesc, position=position, detail=f"dtype {actual.dtype}, expected {expected.dtype}"
        )
    numel = expected.numel()
    if numel == 0:
        return None
    expected, actual = _plain(expected), _plain(actual)
    bitwise = tol.kind == "bitwise"
    # Equal bits are bitwise-equal and close, except NaN: never close to NaN unless the tolerance sets equal_nan.
    nan_matters = not bitwise and not tol.equal_nan and (expected.dtype.is_floating_point or expected.dtype.is_complex)
    on_cpu = _on_cpu(expected, actual)
    # on an accelerator, check on the device before copying chunks off it
    if (
        not on_cpu
        and isinstance(expected, torch.Tensor)
        and isinstance(actual, torch.Tensor)
        and torch.equal(_bits(expected), _bits(actual))
        and not (nan_matters and bool(expected.isnan().any()))
    ):
        return None
    atol, rtol = tol.limits(dtype)
    n = _chunk_size(expected.dtype, chunk_elements)
    work = _Work(expected.dtype, _wide(expected.dtype), n)
    f64 = numpy.float64
    n_diff = nan_both = 0
    first: int | None = None
    max_abs = max_rel = 0.0
    abs_nan = rel_nan = False
    with numpy.errstate(all="ignore"):
        for offset, ec, ac in _chunk_pairs(expected, actual, n):
            if not on_cpu:
                ec, ac = ec.cpu(), ac.cpu()
            be, ba = _bits(ec).numpy(), _bits(ac).numpy()
            if work.equal(be, ba) and not (nan_matters and work.has_nan(ec, be)):
                continue
            m = ec.numel()
            e, a = work.widened("e", ec), work.widened("a", ac)
            d = work.abs_diff(a, e)
            t1, t2 = work.array("t1", (m,), bool), work.array("t2", (m,), bool)
            bad = work.array("bad", (m,), bool)
            if bitwise:
                ne = numpy.not_equal(be, ba, out=work.array("ne", be.shape, bool))
                if ne.ndim > 1:  # complex: real/imag pairs
                    ne.any(axis=1, out=bad)
                else:
                    bad = ne
            else:
                thr = _modulus(e, work.array("t", (m,), f64))
                numpy.add(numpy.multiply(thr, rtol, out=thr), atol, out=thr)  # atol + rtol * |e|
                numpy.less_equal(d, thr, out=bad)
                bad |= numpy.equal(a, e, out=t1)
                numpy.logical_not(bad, out=bad)
            nb = int(numpy.count_nonzero(bad))
            if nb and (tol.equal_nan or nan_matters):
                both = numpy.logical_and(numpy.isnan(e, out=t1), numpy.isnan(a, out=t2), out=t1)
                if tol.equal_nan:
                    bad &= numpy.logical_not(both, out=t1)
                    nb = int(numpy.count_nonzero(bad))
                else:
                    nan_both += int(numpy.count_nonzero(both))
            if nb == 0:
                continue
            if first is None:
                first = offset + int(bad.argmax())
            n_diff += nb
            # relative difference |a - e| / |e|; where |e| is not > 0: inf if |a - e| > 0, else 0
            ea = _modulus(e, work.array("t", (m,), f64))
            r = numpy.divide(d, ea, out=work.array("r", (m,), f64))
            not_pos = numpy.logical_not(numpy.greater(ea, 0, out=t1), out=t1)
            if not_pos.any():
                numpy.copyto(r, 0.0, where=not_pos)
                numpy.copyto(r, math.inf, where=numpy.logical_and(numpy.greater(d, 0, out=t2), not_pos, out=t2))
            good = numpy.logical_not(bad, out=t1)
            numpy.copyto(d, 0.0, where=good)  # only differing elements count; 0 never raises a maximum
            numpy.copyto(r, 0.0, where=good)
            big_abs, big_rel = float(d.max()), float(r.max())  # max propagates NaN
            if math.isnan(big_abs):
                abs_nan = True
            else:
                max_abs = max(max_abs, big_abs)
            if math.isnan(big_rel):
                rel_nan = True
            else:
                max_rel = max(max_rel, big_rel)
    if n_diff == 0 or first is None:
        return None
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), expected.shape)) if expected.dim() else ()
    return Difference(
        section,
        key,
        "value",
        tdesc,
        index=index,
        n_diff=n_diff,
        numel=numel,
        max_abs=math.nan if abs_nan else max_abs,
        max_rel=math.nan if rel_nan else max_rel,
        position=position,
        detail=describe_nan_both(nan_both) if nan_both else "",
    )


def max_abs_diff(expected: TensorLike, actual: TensorLike, chunk_elements: int | None = None) -> float:
    """Return max |actual - expected| (float64, complex modulus), NaN if any difference is NaN; chunked."""
    from ..tensorfile import StoredTensor

    if isinstance(expected, StoredTensor) and isinstance(actual, StoredTensor) and expected.same_bytes(actual):
        found = expected.non_finite() if expected.floating else (0, -1, 0j)
        if found is not None:  # decided without torch: equal bits are no difference, except NaN/inf (as below)
            return math.nan if found[0] else 0.0
    import numpy

    expected, actual = _plain(expected), _plain(actual)
    same = expected.dtype == actual.dtype
    n = _chunk_size(_wide(expected.dtype, actual.dtype), chunk_elements)
    work = _Work(expected.dtype, _wide(expected.dtype, actual.dtype), n)
    on_cpu = _on_cpu(expected, actual)
    worst = 0.0
    with numpy.errstate(all="ignore"):
        for _, ec, ac in _chunk_pairs(expected, actual, n):
            if not on_cpu:
                ec, ac = ec.cpu(), ac.cpu()
            be = _bits(ec).numpy()
            if same and work.equal(be, _bits(ac).numpy()):
                if work.has_non_finite(ec, be):  # x - x is 0, except inf - inf and NaN - NaN, which are NaN
                    return math.nan
                continue
            diff = float(work.abs_diff(work.widened("a", ac), work.widened("e", ec)).max())  # max propagates NaN
            if math.isnan(diff):
                return math.nan
            worst = max(worst, diff)
    return worst
