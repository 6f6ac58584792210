"""Checkpoints for resume checks: model, optimizer, scheduler, scaler, RNG states. Safetensors + JSON, no pickle.

Usage inside a job::

    from pytest_repro import checkpoint

    if ctx.resume_from is not None:
        start = checkpoint.load(ctx.resume_from, model=model, optimizer=opt, scheduler=sched)["step"]
    ...
    checkpoint.save(ctx.checkpoint_dir, step=end, model=model, optimizer=opt, scheduler=sched)
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "checkpoint.json"
COMPONENTS = ("model", "optimizer", "scheduler", "scaler")
SCHEMA = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read."""


def _flatten(value: Any, path: str, tensors: dict[str, Any]) -> Any:
    """Return a JSON skeleton of ``value``; tensors go to ``tensors`` under their path."""
    import torch

    if isinstance(value, torch.Tensor):
        key = path or "_"
        tensors[key] = value.detach().to("cpu")
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {"__dict__": [[k, _flatten(v, f"{path}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    import numpy as np

    if isinstance(value, np.ndarray):
        wide = value.astype(np.float64 if value.dtype.kind == "f" else np.int64)
        return _flatten(torch.from_numpy(wide), path, tensors) | {"__numpy__": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    raise CheckpointError(
        f"{path or 'value'}: cannot store a {type(value).__name__} in a checkpoint (tensors, numbers, strings, "
        "lists, tuples and dicts only); convert it, or leave it out of extra="
    )


def _unflatten(skeleton: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            tensor = tensors[skeleton["__tensor__"]]
            return tensor.numpy().astype(skeleton["__numpy__"]) if skeleton.get("__numpy__") else tensor
        if "__dict__" in skeleton:
            return {k: _unflatten(v, tensors) for k, v in skeleton["__dict__"]}
        if "__tuple__" in skeleton:
            return tuple(_unflatten(v, tensors) for v in skeleton["__tuple__"])
        raise CheckpointError(f"malformed checkpoint entry {sorted(skeleton)}")
    if isinstance(skeleton, list):
        return [_unflatten(v, tensors) for v in skeleton]
    return skeleton


def rng_states() -> dict[str, Any]:
    """The RNG states of Python, NumPy (global), torch CPU and every initialised CUDA device."""
    import numpy as np
    import torch

    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what rng_states() returned."""
    import numpy as np
    import torch

    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(states["cuda"]))


def _dedupe(tensors: dict[str, Any]) -> dict[str, Any]:
    """Give tensors that share storage (tied weights) their own copy: safetensors refuses shared memory."""
    seen: set[int] = set()
    out = {}
    for key, t in tensors.items():
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        out[key] = t.clone() if ptr and ptr in seen else t
        if ptr:
            seen.add(ptr)
    return out


def save(
    path: str | os.PathLike[str],
    *,
    step: int,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    extra: Any = None,
) -> Path:
    """Write a checkpoint folder: the given components' state dicts, the RNG states, step and extra."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Any] = {}
    given = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    state: dict[str, Any] = {
        "schema": SCHEMA,
        "step": int(step),
        "given": [k for k, v in given.items() if v is not None],
    }
    for name, obj in given.items():
        if obj is not None:
            state[name] = _flatten(obj.state_dict(), name, tensors)
    state["rng"] = _flatten(rng_states(), "rng", tensors)
    state["extra"] = _flatten(extra, "extra", tensors)
    save_file(_dedupe(tensors), str(folder / TENSORS_FILE))
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
    return folder


def given(path: str | os.PathLike[str]) -> list[str]:
    """The components a checkpoint was given (model, optimizer, scheduler, scaler)."""
    try:
        return list(json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))["given"])
    except (OSError, ValueError, KeyError):
        return []


def load(
    path: str | os.PathLike[str],
    *,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
) -> dict[str, Any]:
    """Restore the given components and the RNG states from a checkpoint; return {"step": ..., "extra": ...}."""
    from safetensors.torch import load_file

    folder = Path(path)
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / TENSORS_FILE))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: not a readable pytest-repro checkpoint ({exc})") from exc
    wanted = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    for name, obj in wanted.items():
        if obj is None:
            continue
        if name not in state:
            raise CheckpointError(f"{folder}: the checkpoint holds no {name} state; pass {name}= to checkpoint.save")
        obj.load_state_dict(_unflatten(state[name], tensors))
    set_rng_states(_unflatten(state["rng"], tensors))
    return {"step": int(state["step"]), "extra": _unflatten(state["extra"], tensors)}
