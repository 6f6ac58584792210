"""The NaN/inf scan of a record: which section and key holds non-finite values, and where the first one is."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..record import TENSOR_SECTIONS
from ..tensorfile import StoredTensor, TensorLike, flat_chunks

if TYPE_CHECKING:
    from ..record import Record


@dataclass(frozen=True)
class NonFinite:
    """Where a record holds NaN or inf."""

    section: str
    key: str | None
    count: int
    first: str  # the step, or the first element's index
    value: float

    def describe(self) -> str:
        """Return e.g. "weights['w']: 3 NaN/inf values, first at index (0, 1) (nan)"."""
        where = self.section if self.key is None else f"{self.section}[{self.key!r}]"
        return f"{where}: {self.count} non-finite value(s), first {self.first} ({self.value})"


def find_non_finite(record: Record, allowed: Callable[[str, str | None], bool]) -> list[NonFinite]:
    """Return every section/key of a record (every rank's) that holds NaN or inf, except where ``allowed``."""
    found = _non_finite(record, allowed)
    for rank, other in sorted(record.ranks.items()):
        found += [
            NonFinite(f"rank {rank}: {bad.section}", bad.key, bad.count, bad.first, bad.value)
            for bad in _non_finite(other, allowed)
        ]
    return found


def _non_finite(record: Record, allowed: Callable[[str, str | None], bool]) -> list[NonFinite]:
    found: list[NonFinite] = []
    bad = [i for i, v in enumerate(record.losses) if not math.isfinite(v)]
    if bad and not allowed("losses", None):
        i = bad[0]
        shown = ", ".join(f"{v:.6g}" for v in record.losses[max(0, i - 3) : i + 1])
        found.append(
            NonFinite("losses", None, len(bad), f"at step {i}; steps {max(0, i - 3)}..{i}: {shown}", record.losses[i])
        )
    for key, v in record.metrics.items():
        if not math.isfinite(v) and not allowed("metrics", key):
            found.append(NonFinite("metrics", key, 1, "value", v))
    for section in TENSOR_SECTIONS:
        tensors: Mapping[str, TensorLike] = getattr(record, section)
        for key, t in tensors.items():
            floating = t.floating if isinstance(t, StoredTensor) else (t.dtype.is_floating_point or t.dtype.is_complex)
            if not floating or allowed(section, key):
                continue
            fast = t.non_finite() if isinstance(t, StoredTensor) else None  # from the bytes: no torch needed
            count, first, value = fast if fast is not None else _count_non_finite(t)
            if not count:
                continue
            index = tuple(int(i) for i in _unravel(first, tuple(t.shape)))
            is_complex = t.dtype_code == "C64" if isinstance(t, StoredTensor) else t.dtype.is_complex
            number = value if is_complex else value.real
            found.append(NonFinite(section, key, count, f"at index {index}", number))  # type: ignore[arg-type]
    return found


_CHUNK = 1 << 20  # elements checked at a time: isfinite's temporaries stay small for a tensor of any size


def _count_non_finite(t: TensorLike) -> tuple[int, int, complex]:
    """Return how many elements are NaN/inf, the flat index of the first one and its value (chunked, bounded memory)."""
    import torch

    count, first, start = 0, -1, 0
    for chunk in flat_chunks(t, _CHUNK):
        try:
            bad = ~chunk.isfinite()
        except (NotImplementedError, RuntimeError):  # e.g. float8 kernels without isfinite
            bad = ~chunk.to(torch.float32).isfinite()
        n = int(bad.sum())
        if n and first < 0:
            first = start + int(bad.nonzero()[0, 0])
        count += n
        start += chunk.numel()
    if count == 0:
        return 0, -1, 0j
    item = t.read(first, 1)[0] if isinstance(t, StoredTensor) else t.reshape(-1)[first]
    return count, first, complex(item) if t.dtype.is_complex else complex(float(item.to(torch.float64)))


def _unravel(flat: int, shape: tuple[int, ...]) -> list[int]:
    out = []
    for size in reversed(shape):
        out.append(flat % size)
        flat //= size
    return list(reversed(out))
