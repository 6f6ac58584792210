"""The run record (losses, weights, metrics, outputs, meta) and its pickle-free on-disk form."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .tensorfile import (
    RECORD_FILE,
    CorruptRecordError,
    RecordError,
    StoredTensor,
    TensorFile,
    TensorLike,
    materialize,
    open_tensor_file,
    write_tensor_file,
)

if TYPE_CHECKING:
    import torch

# The recording machine's noise floor beside a reference (pytest-repro calibrate --store); a regeneration
# drops it, as it no longer describes the new reference.
NOISE_FILE = "noise_floor.json"
# Module digests of the reference run's first steps (written at regen): where a later difference starts.
DIGESTS_FILE = "digests.json"

__all__ = [
    "DIGESTS_FILE",
    "JOB_KEYS",
    "NOISE_FILE",
    "OPTIONAL_JOB_KEYS",
    "RECORD_FILE",
    "RECORD_SCHEMA",
    "TENSOR_SECTIONS",
    "CheckedRecord",
    "CorruptRecordError",
    "Record",
    "RecordError",
    "close_record",
    "dump_json",
    "is_empty",
    "load_record",
    "normalize_result",
    "release_record",
    "save_record",
    "user_view",
    "write_text_atomic",
]

TENSOR_SECTIONS = ("weights", "outputs")
RECORD_SCHEMA = 1
JOB_KEYS = ("losses", "weights", "metrics", "outputs")
OPTIONAL_JOB_KEYS = ("meta",)  # JSON-serializable facts about the run (e.g. a split file's hash)


@dataclass
class Record:
    """What one run of a job produced."""

    losses: list[float] = field(default_factory=list)
    weights: Mapping[str, TensorLike] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    outputs: Mapping[str, TensorLike] = field(default_factory=dict)
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


class CheckedRecord(Record):
    """Run 1's record as ``repro.check`` returns it: ``.weights``/``.outputs`` become plain dicts on first use."""

    _LAZY = ("weights", "outputs")

    def __getattr__(self, name: str) -> Any:
        pending = self.__dict__.get("_pending", {})
        tensors = pending.get(name)
        if tensors is None:
            if name in self.__dict__:  # another thread read it meanwhile
                return self.__dict__[name]
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value = self.__dict__.setdefault(name, {k: materialize(t) for k, t in tensors.items()})
        pending.pop(name, None)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._LAZY:  # assigned before first use: the stored tensors are not wanted any more
            self.__dict__.get("_pending", {}).pop(name, None)
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        pending = self.__dict__.get("_pending", {})
        if name in self._LAZY and name in pending and name not in self.__dict__:
            del pending[name]
            return
        super().__delattr__(name)

    def __repr__(self) -> str:
        # without reading the tensors (pytest shows it in assertion messages)
        sections = {
            n: list(self.__dict__[n] if n in self.__dict__ else self.__dict__["_pending"][n]) for n in self._LAZY
        }
        return (
            f"CheckedRecord(losses=<{len(self.losses)} steps>, weights={sections['weights']}, "
            f"metrics={self.metrics!r}, outputs={sections['outputs']}, seed={self.seed!r}, device={self.device!r}, "
            f"ranks={sorted(self.ranks)})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # pickle and deepcopy carry the tensors themselves (an open file cannot travel)
        state = {k: v for k, v in self.__dict__.items() if k != "_pending"}
        return state | {name: getattr(self, name) for name in self._LAZY}


def user_view(record: Record) -> Record:
    """The record as a test sees it: ``.weights``/``.outputs`` are dicts of tensors in memory, read on first use."""
    view = CheckedRecord(
        losses=list(record.losses),
        metrics=dict(record.metrics),
        meta=record.meta,
        ranks={rank: user_view(other) for rank, other in record.ranks.items()},
    )
    del view.__dict__["weights"], view.__dict__["outputs"]
    view.__dict__["_pending"] = {"weights": dict(record.weights), "outputs": dict(record.outputs)}
    return view


def release_record(record: Record) -> None:
    """Close the files a loaded record reads from until its tensors are read again (every rank's)."""
    for file in _files(record):
        file.release()


def _files(record: Record) -> list[TensorFile]:
    files = {
        id(t.file): t.file
        for section in TENSOR_SECTIONS
        for t in getattr(record, section).values()
        if isinstance(t, StoredTensor)
    }
    return list(files.values()) + [f for other in record.ranks.values() for f in _files(other)]


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


def _did_you_mean(unknown: list[str]) -> str:
    """E.g. " (did you mean 'losses' for 'loss'?)" for the unknown result keys close to a known one."""
    import difflib

    known = (*JOB_KEYS, *OPTIONAL_JOB_KEYS)
    guesses = [(k, difflib.get_close_matches(str(k), known, n=1, cutoff=0.6)) for k in unknown]
    shown = [f"{close[0]!r} for {k!r}" for k, close in guesses if close]
    return f" (did you mean {', '.join(shown)}?)" if shown else ""


def normalize_result(result: Any, meta: Mapping[str, Any]) -> Record:
    """Turn a job's returned dict into a Record, with a clear error for anything malformed."""
    if not isinstance(result, Mapping):
        raise RecordError(f"a job must return a dict with keys {', '.join(JOB_KEYS)}; got {type(result).__name__}")
    unknown = sorted(set(result) - set(JOB_KEYS) - set(OPTIONAL_JOB_KEYS))
    if unknown:
        allowed = ", ".join((*JOB_KEYS, *OPTIONAL_JOB_KEYS))
        raise RecordError(f"job result has unknown key(s) {unknown}{_did_you_mean(unknown)}; allowed: {allowed}")
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


def is_empty(record: Record) -> bool:
    """Whether a record holds nothing to compare: no losses, metrics, or tensor elements."""
    tensors = [t for section in (record.weights, record.outputs) for t in section.values()]
    return not (record.losses or record.metrics or any(t.numel() for t in tensors))


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
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {}
    for section in TENSOR_SECTIONS:
        tensors: Mapping[str, TensorLike] = getattr(record, section)
        if not tensors:
            continue
        filename = f"{section}.safetensors"
        digest = write_tensor_file(tensors, folder / filename, section)
        index[section] = {
            "file": filename,
            "keys": list(tensors),  # safetensors does not keep insertion (state-dict) order
            "sha256": digest,
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


def close_record(record: Record) -> None:
    """Close the files a loaded record reads its tensors from (every rank's); the record keeps its scalars."""
    for file in _files(record):
        file.close()
    for r in (record, *record.ranks.values()):
        r.weights, r.outputs = {}, {}


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


def _load_tensors(folder: Path, record_path: Path, entry: Any) -> Mapping[str, TensorLike]:
    """Open and verify one tensor file; its tensors are read from it on demand (nothing is held in memory)."""
    try:
        file = folder / str(entry["file"])
        keys = [str(k) for k in entry["keys"]]
        expected_hash = str(entry["sha256"])
    except (KeyError, TypeError) as exc:
        raise CorruptRecordError(record_path, f"malformed tensor index ({exc!r})") from exc
    return open_tensor_file(file, keys, expected_hash)
