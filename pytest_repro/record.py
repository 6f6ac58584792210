"""The run record (losses, weights, metrics, outputs, meta) and its pickle-free on-disk form."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

RECORD_FILE = "record.json"
TENSOR_SECTIONS = ("weights", "outputs")
RECORD_SCHEMA = 1
JOB_KEYS = ("losses", "weights", "metrics", "outputs")
OPTIONAL_JOB_KEYS = ("meta",)  # JSON-serializable facts about the run (e.g. a split file's hash)


class RecordError(ValueError):
    """A job result or a stored record that is malformed."""


class CorruptRecordError(RecordError):
    """A stored record whose files are unreadable, truncated or do not match their checksums."""

    def __init__(self, path: Path, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(f"{path}: {detail}")


@dataclass
class Record:
    """What one run of a job produced."""

    losses: list[float] = field(default_factory=list)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    ranks: dict[int, Record] = field(default_factory=dict)  # jobs on several ranks: ranks 1..N-1 (this is rank 0)

    @property
    def seed(self) -> int | None:
        """The seed the run used."""
        return self.meta.get("seed")

    @property
    def device(self) -> str | None:
        """The device the run used."""
        return self.meta.get("device")


def _as_float(value: Any, where: str) -> float:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
    return float(value)


def _as_tensor_map(value: Any, where: str) -> dict[str, torch.Tensor]:
    import torch

    if not isinstance(value, Mapping):
        raise RecordError(f"{where}: expected a mapping of name -> tensor, got {type(value).__name__}")
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in value.items():
        if not isinstance(name, str):
            raise RecordError(f"{where}: keys must be strings, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            try:
                tensor = torch.as_tensor(tensor)
            except Exception as exc:
                raise RecordError(f"{where}[{name!r}]: expected a tensor, got {type(tensor).__name__}") from exc
        if tensor.layout != torch.strided:
            raise RecordError(f"{where}[{name!r}]: {tensor.layout} tensors are not supported; return .to_dense()")
        if tensor.is_meta:
            raise RecordError(f"{where}[{name!r}]: a tensor on the meta device holds no data; return a real tensor")
        tensor = tensor.detach().to("cpu").contiguous()
        # Tied weights (an embedding shared with the LM head) share storage, which safetensors refuses
        # to save: store every tensor on its own, under each of its names.
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else 0
        if ptr and ptr in storages:
            tensor = tensor.clone()
        elif ptr:
            storages.add(ptr)
        out[name] = tensor
    return out


def normalize_result(result: Any, meta: Mapping[str, Any]) -> Record:
    """Turn a job's returned dict into a Record, with a clear error for anything malformed."""
    if not isinstance(result, Mapping):
        raise RecordError(f"a job must return a dict with keys {', '.join(JOB_KEYS)}; got {type(result).__name__}")
    unknown = sorted(set(result) - set(JOB_KEYS) - set(OPTIONAL_JOB_KEYS))
    if unknown:
        allowed = ", ".join((*JOB_KEYS, *OPTIONAL_JOB_KEYS))
        raise RecordError(f"job result has unknown key(s) {unknown}; allowed: {allowed}")
    if not any(k in result for k in JOB_KEYS):
        raise RecordError(f"job result is empty; return at least one of {', '.join(JOB_KEYS)}")
    raw_losses = result.get("losses", [])
    if hasattr(raw_losses, "tolist"):
        raw_losses = raw_losses.tolist()
    losses = [_as_float(v, f"losses[{i}]") for i, v in enumerate(raw_losses)]
    metrics_raw = result.get("metrics", {})
    if not isinstance(metrics_raw, Mapping):
        raise RecordError(f"metrics: expected a mapping of name -> number, got {type(metrics_raw).__name__}")
    metrics = {str(k): _as_float(v, f"metrics[{k!r}]") for k, v in metrics_raw.items()}
    meta = dict(meta)
    if "meta" in result:
        try:
            meta["job_meta"] = json.loads(json.dumps(result["meta"], sort_keys=True))
        except (TypeError, ValueError) as exc:
            raise RecordError(f"meta: must be JSON-serializable ({exc})") from None
    return Record(
        losses=losses,
        weights=_as_tensor_map(result.get("weights", {}), "weights"),
        metrics=metrics,
        outputs=_as_tensor_map(result.get("outputs", {}), "outputs"),
        meta=meta,
    )


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
    import torch

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
        tensors: dict[str, torch.Tensor] = getattr(record, section)
        for key, t in tensors.items():
            if not (t.dtype.is_floating_point or t.dtype.is_complex) or allowed(section, key):
                continue
            count, first = _count_non_finite(t)
            if not count:
                continue
            index = tuple(int(i) for i in _unravel(first, tuple(t.shape)))
            item = t.reshape(-1)[first]
            value = complex(item) if t.dtype.is_complex else float(item.to(torch.float64))
            found.append(NonFinite(section, key, count, f"at index {index}", value))  # type: ignore[arg-type]
    return found


_CHUNK = 1 << 20  # elements checked at a time: isfinite's temporaries stay small for a tensor of any size


def _count_non_finite(t: torch.Tensor) -> tuple[int, int]:
    """Return how many elements are NaN/inf and the flat index of the first one (chunked, bounded memory)."""
    import torch

    flat = t.reshape(-1)
    count, first = 0, -1
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK]
        try:
            bad = ~chunk.isfinite()
        except (NotImplementedError, RuntimeError):  # e.g. float8 kernels without isfinite
            bad = ~chunk.to(torch.float32).isfinite()
        n = int(bad.sum())
        if n and first < 0:
            first = start + int(bad.nonzero()[0, 0])
        count += n
    return count, first


def _unravel(flat: int, shape: tuple[int, ...]) -> list[int]:
    out = []
    for size in reversed(shape):
        out.append(flat % size)
        flat //= size
    return list(reversed(out))


def is_empty(record: Record) -> bool:
    """Whether a record holds nothing to compare: no losses, metrics, or tensor elements."""
    tensors = [t for section in (record.weights, record.outputs) for t in section.values()]
    return not (record.losses or record.metrics or any(t.numel() for t in tensors))


def first_non_finite(values: list[float]) -> int | None:
    """Return the index of the first NaN/inf value, or None."""
    for i, v in enumerate(values):
        if not math.isfinite(v):
            return i
    return None


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to ``path`` through a temp file in the same folder and os.replace."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def dump_json(data: Any) -> str:
    """Serialize to JSON with sorted keys, for readable diffs."""
    return json.dumps(data, sort_keys=True, indent=2) + "\n"


def save_record(record: Record, folder: Path) -> None:
    """Write a record into ``folder`` as record.json plus one safetensors file per tensor section."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {}
    for section in TENSOR_SECTIONS:
        tensors: dict[str, torch.Tensor] = getattr(record, section)
        if not tensors:
            continue
        filename = f"{section}.safetensors"
        tmp = folder / f".{filename}.tmp-{os.getpid()}"
        save_file(tensors, str(tmp), metadata={"pytest_repro_section": section})
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / filename)
        index[section] = {
            "file": filename,
            "keys": list(tensors),  # safetensors does not keep insertion (state-dict) order
            "sha256": sha256_file(folder / filename),
        }
    body: dict[str, Any] = {
        "schema": RECORD_SCHEMA,
        "losses": record.losses,
        "metrics": record.metrics,
        "meta": record.meta,
        "tensors": index,
    }
    if record.ranks:
        body["ranks"] = sorted(record.ranks)
        for rank, other in record.ranks.items():
            save_record(other, folder / f"rank{rank}")
    write_text_atomic(folder / RECORD_FILE, dump_json(body))


def load_record(folder: Path) -> Record:
    """Load and verify a record; raise CorruptRecordError for anything unreadable or tampered."""
    path = folder / RECORD_FILE
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptRecordError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(body, dict) or body.get("schema") != RECORD_SCHEMA:
        raise CorruptRecordError(path, f"not a pytest-repro record (expected schema {RECORD_SCHEMA})")
    try:
        losses = [float(v) for v in body["losses"]]
        metrics = {str(k): float(v) for k, v in body["metrics"].items()}
        meta = dict(body["meta"])
        index = dict(body["tensors"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptRecordError(path, f"missing or malformed field ({exc!r})") from exc
    record = Record(losses=losses, metrics=metrics, meta=meta)
    for section, entry in index.items():
        if section not in TENSOR_SECTIONS:
            raise CorruptRecordError(path, f"unknown tensor section {section!r}")
        setattr(record, section, _load_tensors(folder, path, entry))
    try:
        ranks = [int(r) for r in body.get("ranks", [])]
    except (TypeError, ValueError) as exc:
        raise CorruptRecordError(path, f"malformed rank list ({exc!r})") from exc
    for rank in ranks:
        try:
            record.ranks[rank] = load_record(folder / f"rank{rank}")
        except FileNotFoundError as exc:
            raise CorruptRecordError(folder / f"rank{rank}", "the record of this rank is missing") from exc
    return record


def _load_tensors(folder: Path, record_path: Path, entry: Any) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        file = folder / str(entry["file"])
        keys = [str(k) for k in entry["keys"]]
        expected_hash = str(entry["sha256"])
    except (KeyError, TypeError) as exc:
        raise CorruptRecordError(record_path, f"malformed tensor index ({exc!r})") from exc
    if not file.is_file():
        raise CorruptRecordError(file, "tensor file is missing")
    actual = sha256_file(file)
    if actual != expected_hash:
        raise CorruptRecordError(
            file, f"sha256 {actual[:12]}… does not match {expected_hash[:12]}… recorded in {RECORD_FILE}"
        )
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptRecordError(file, f"unreadable safetensors file ({exc})") from exc
    if sorted(tensors) != sorted(keys):
        raise CorruptRecordError(file, "tensor names do not match the record's index")
    return {k: tensors[k] for k in keys}
