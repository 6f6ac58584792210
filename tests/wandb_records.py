"""Read an offline W&B run back from its ``run-<id>.wandb`` file, as wandb's own protobuf records.

wandb 0.31 ships no Python reader of its transaction log any more (the Go service reads it for
``wandb sync``), so this walks the log's framing: a 7-byte header (``:W&B``, magic 0xBEE1, version 0),
then 32 KiB blocks of chunks, each with a CRC-32 (seeded with the chunk type), a length and a type
(full, first, middle, last), as LevelDB's log format. Every complete record is parsed with
``wandb.proto.wandb_internal_pb2.Record``; a bad header, checksum or length is an error, never skipped.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_HEADER = struct.Struct("<4sHB")
_CHUNK = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    """Every record of a .wandb file, in order, as wandb_internal_pb2.Record messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = _HEADER.unpack_from(data, 0)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B transaction log"
    out, pending, pos = [], b"", _HEADER.size
    while pos < len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _CHUNK.size:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        crc, length, kind = _CHUNK.unpack_from(data, pos)
        if crc == length == kind == 0:  # zero padding at a block's end
            pos += room
            continue
        chunk = data[pos + _CHUNK.size : pos + _CHUNK.size + length]
        assert len(chunk) == length, f"{path}: truncated chunk at byte {pos}"
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at byte {pos}"
        pos += _CHUNK.size + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


@dataclass
class OfflineRun:
    """What one offline run holds: its run record, config, summary, history rows, artifacts and exit code."""

    folder: Path
    run: Any = None
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[Any] = field(default_factory=list)
    exit_code: int | None = None

    def series(self, key: str) -> list[tuple[int, Any]]:
        """(step, value) of one history key, in step order."""
        return sorted((row["_step"], row[key]) for row in self.history if key in row)


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_run(folder: Path) -> OfflineRun:
    """Read one offline-run-* folder back through its .wandb file."""
    (log,) = folder.glob("run-*.wandb")
    out = OfflineRun(folder)
    for record in records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.run = record.run
            out.config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            out.config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "summary":
            out.summary.update({_key(u): json.loads(u.value_json) for u in record.summary.update})
        elif kind == "history":
            out.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "artifact":
            out.artifacts.append(record.artifact)
        elif kind == "exit":
            out.exit_code = record.exit.exit_code
    return out


def read_runs(wandb_dir: Path) -> list[OfflineRun]:
    """Every offline run in a wandb folder, oldest first."""
    return [read_run(f) for f in sorted(wandb_dir.glob("offline-run-*"))]
