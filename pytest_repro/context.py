"""What a job sees: its context (seed, device, config, work dir), how a child finds it, and config tracking.

This module is imported in the job's own process: it depends on nothing else in the package.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class JobReferenceError(ValueError):
    """A job that cannot be run in a separate process (not an importable top-level function)."""


@dataclass(frozen=True)
class JobRef:
    """How a child process finds a job: module, qualified name, and the file as a fallback."""

    module: str
    qualname: str
    file: str | None = None
    preload: tuple[str, ...] = ()

    @classmethod
    def from_callable(cls, job: Callable[..., Any] | str) -> JobRef:
        """Describe a top-level function (or a "module:function" string) for a child process."""
        if isinstance(job, str):
            module, sep, qualname = job.partition(":")
            if not sep or not module or not qualname:
                raise JobReferenceError(f"job {job!r}: expected 'package.module:function'")
            return cls(module, qualname)
        if not callable(job):
            raise JobReferenceError(f"job {job!r} is not callable")
        mod_name: str | None = getattr(job, "__module__", None)
        qual: str | None = getattr(job, "__qualname__", None)
        if not mod_name or not qual or "<locals>" in qual or "<lambda>" in qual:
            raise JobReferenceError(
                f"job {job!r} must be an importable top-level function (defined at module level, "
                "not a lambda or a nested function) so that a fresh process can import it"
            )
        if mod_name == "__main__":
            raise JobReferenceError(f"job {qual!r} is defined in __main__; move it into an importable module")
        code = getattr(job, "__code__", None)
        file = getattr(code, "co_filename", None) or getattr(sys.modules.get(mod_name), "__file__", None)
        preload = tuple(getattr(job, "__repro_preload__", ()))
        return cls(mod_name, qual, file, preload)

    @property
    def name(self) -> str:
        """Return the job's 'module:qualname' form."""
        return f"{self.module}:{self.qualname}"


@dataclass(frozen=True)
class RunSpec:
    """Everything a child process needs to run one job once."""

    job: JobRef
    config: dict[str, Any]
    seed: int
    device: str
    deterministic: bool
    run_index: int
    workdir: str
    cwd: str
    sys_path: tuple[str, ...] = ()
    manifest: bool = False
    config_dir: str | None = None
    manifest_packages: tuple[str, ...] = ()
    identity: str = "hash"
    diagnose: bool = False
    stop_at: int | None = None
    resume_from: str | None = None
    nproc: int = 1
    perturb: int | None = None  # a noise-floor run: the seed of its perturbation (_exec/perturb.py)
    perturb_parts: tuple[str, ...] = ("rounding", "streams")
    probe_resume_at: int | None = None  # a traced run that also hashes the training state (resume probe)
    digest_steps: int | None = None  # record module digests of the first steps (a reference's digests.json)
    ops_step: int | None = None  # a diagnosis run that also hashes every aten op of this step

    def to_json(self) -> str:
        """Serialize for the worker protocol."""
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSpec:
        """Rebuild from the JSON form."""
        d = dict(data)
        job = d.pop("job")
        job["preload"] = tuple(job.get("preload", ()))
        d["sys_path"] = tuple(d.get("sys_path", ()))
        d["manifest_packages"] = tuple(d.get("manifest_packages", ()))
        if "perturb_parts" in d:
            d["perturb_parts"] = tuple(d["perturb_parts"])
        return cls(job=JobRef(**job), **d)


class TrackedConfig(dict[str, Any]):
    """A config dict that remembers which keys the job read, and which absent keys it asked for.

    Copies count as reads: ``dict(cfg)``, ``{**cfg}``, ``cfg.copy()``, ``json.dumps(cfg)`` and
    ``copy.deepcopy(cfg)`` read every key (overriding ``__iter__`` moves CPython off its fast dict path).
    """

    def __init__(
        self, data: Mapping[str, Any] | None = None, prefix: str = "", log: dict[str, set[str]] | None = None
    ) -> None:
        super().__init__(data or {})
        self._prefix = prefix
        self._log = log if log is not None else {"read": set(), "undeclared": set()}

    def _path(self, key: Any) -> str:
        return f"{self._prefix}{key}"

    def _wrap(self, key: Any, value: Any) -> Any:
        if isinstance(value, dict) and not isinstance(value, TrackedConfig):
            value = TrackedConfig(value, f"{self._path(key)}.", self._log)
            super().__setitem__(key, value)
        return value

    def __getitem__(self, key: Any) -> Any:
        if key not in self:
            self._log["undeclared"].add(self._path(key))
        self._log["read"].add(self._path(key))
        return self._wrap(key, super().__getitem__(key))

    def __iter__(self) -> Iterator[Any]:
        return iter(list(dict.keys(self)))

    def get(self, key: Any, default: Any = None) -> Any:
        """Like dict.get, and record the read (a missing key means the job used an undeclared default)."""
        if key not in self:
            self._log["undeclared"].add(self._path(key))
            return default
        return self[key]

    def items(self) -> Any:  # type: ignore[override]
        """Like dict.items; every key counts as read."""
        return [(k, self[k]) for k in dict.keys(self)]

    def values(self) -> Any:  # type: ignore[override]
        """Like dict.values; every key counts as read."""
        return [self[k] for k in dict.keys(self)]

    def copy(self) -> dict[str, Any]:  # type: ignore[override]
        """Return a plain shallow copy; every key counts as read."""
        return dict(self.items())

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (dict, (), None, None, iter(self.items()))

    def audit(self) -> dict[str, list[str]]:
        """Return the undeclared reads and the declared leaf keys the job never read."""
        read = self._log["read"]

        def used(path: str) -> bool:
            # A section read whole and handed on (none of its keys read one by one) counts as used.
            while path not in read:
                if "." not in path:
                    return False
                path = path.rsplit(".", 1)[0]
                if path in read:
                    return not any(r.startswith(path + ".") for r in read)
            return True

        unused = sorted(p for p in _leaf_paths(self) if not used(p))
        return {"undeclared_reads": sorted(self._log["undeclared"]), "unused_keys": unused}


def _leaf_paths(data: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key, value in dict.items(data):  # dict's own items(): walking the tree is not a read
        if isinstance(value, dict) and value:
            out += _leaf_paths(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


@dataclass
class JobContext:
    """What a job receives: seed, device, config, a work dir, seeded generators, and resume/stop points."""

    seed: int
    device: str
    config: dict[str, Any]
    workdir: Path
    run_index: int = 0
    deterministic: bool = True
    config_dir: Path | None = None
    stop_at: int | None = None  # resume checks: stop after this many steps and checkpoint.save(...)
    resume_from: Path | None = None  # resume checks: a folder written by checkpoint.save, to load first
    checkpoint_dir: Path | None = None  # an empty folder for checkpoint.save
    rank: int = 0  # jobs on several ranks (repro.check(job, nproc=N)): torch.distributed is initialised
    local_rank: int = 0
    world_size: int = 1
    _rng: Any = field(default=None, repr=False)

    @property
    def rng(self) -> Any:
        """A numpy.random.Generator seeded with this run's seed."""
        if self._rng is None:
            import numpy as np

            self._rng = np.random.default_rng(self.seed)
        return self._rng

    def generator(self, device: str | None = None) -> Any:
        """Return a torch.Generator on ``device`` (default: the run's device) seeded with this run's seed."""
        import torch

        gen = torch.Generator(device=device or self.device)
        gen.manual_seed(self.seed)
        return gen

    def path(self, value: str | os.PathLike[str]) -> Path:
        """Resolve a path from the config: relative paths are taken from the config file's folder."""
        p = Path(value)
        if p.is_absolute():
            return p
        if self.config_dir is not None and (self.config_dir / p).exists():
            return self.config_dir / p
        return Path.cwd() / p
