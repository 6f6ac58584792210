"""The job process's side: seed, run the job once, write its record. Depends only on context/record/seeding."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..context import JobContext, JobRef, RunSpec, TrackedConfig

RECORD_DIR = "record"
ERROR_FILE = "error.json"
RUN_MANIFEST_FILE = "manifest.json"  # this run's environment manifest (a reference keeps storage.MANIFEST_FILE)
LOG_FILE = "output.log"
IMPORTS_FILE = "imports.json"  # modules the run imported beyond those its process started with
PEAK_FILE = "device.json"  # a GPU run's peak device memory, for running later runs of the job side by side


def _new_imports(before: set[str]) -> list[str]:
    """Modules imported since ``before`` was taken, in import order, the standard library left out."""
    skip = set(sys.stdlib_module_names) | set(sys.builtin_module_names)
    return [name for name in list(sys.modules) if name not in before and name.partition(".")[0] not in skip]


def _resolve_job(ref: JobRef) -> Callable[..., Any]:
    try:
        obj: Any = importlib.import_module(ref.module)
    except ImportError:
        if not ref.file or not Path(ref.file).exists():
            raise
        name = f"_pytest_repro_job_{abs(hash(ref.file))}"
        spec = importlib.util.spec_from_file_location(name, ref.file)
        if spec is None or spec.loader is None:
            raise
        obj = importlib.util.module_from_spec(spec)
        sys.modules[name] = obj
        spec.loader.exec_module(obj)
    for part in ref.qualname.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[no-any-return]


def _main_dtype(weights: Mapping[str, Any], config: Mapping[str, Any]) -> str | None:
    if isinstance(config.get("dtype"), str):
        return str(config["dtype"])
    counts: dict[str, int] = {}
    for t in weights.values():
        if t.dtype.is_floating_point:
            name = str(t.dtype).replace("torch.", "")
            counts[name] = counts.get(name, 0) + t.numel()
    return max(counts, key=lambda k: counts[k]) if counts else None


def _write_error(workdir: Path, stage: str, exc: BaseException, config: TrackedConfig | None) -> None:
    error: dict[str, Any] = {
        "stage": stage,
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": traceback.format_exc(),
    }
    if config is not None:  # what the job had read when it failed: names a misspelt key behind a KeyError
        with contextlib.suppress(Exception):
            error["config_audit"] = config.audit()
    (workdir / ERROR_FILE).write_text(json.dumps(error), encoding="utf-8")


def execute(spec: RunSpec, rank: int | None = None) -> int:
    """Run one job in this (fresh) process and write its record to ``spec.workdir``; return an exit code.

    A job on several ranks (``spec.nproc > 1``) forks one process per rank, each of which runs here
    with its ``rank`` and torch.distributed initialised around the job.
    """
    if spec.nproc > 1 and rank is None:
        from .distributed import launch

        return launch(spec, execute)
    workdir = Path(spec.workdir)
    modules_before = set(sys.modules)  # forked: what the warm worker had preloaded
    workdir.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(workdir / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    stage = "setup"
    config: TrackedConfig | None = None
    try:
        os.chdir(spec.cwd)
        for entry in reversed(spec.sys_path):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        from ..manifest import collect_manifest
        from ..record import dump_json, normalize_result, save_record
        from ..seeding import determinism_flags, seed_everything

        hash_seed = os.environ.get("PYTHONHASHSEED")
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads and threads.isdigit() and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(threads))  # the worker imported torch before this run's env
        seed_everything(spec.seed, deterministic=spec.deterministic, transformers=False)
        stage = "import"
        job = _resolve_job(spec.job)
        transformers = sys.modules.get("transformers")
        if transformers is not None:  # the job uses transformers: seed it the way it expects, too
            transformers.set_seed(spec.seed)
        config = TrackedConfig(spec.config)
        ctx = JobContext(
            seed=spec.seed,
            device=spec.device,
            config=config,
            workdir=workdir / "job",
            run_index=spec.run_index,
            deterministic=spec.deterministic,
            config_dir=Path(spec.config_dir) if spec.config_dir else None,
            stop_at=spec.stop_at,
            resume_from=Path(spec.resume_from) if spec.resume_from else None,
            checkpoint_dir=workdir / "checkpoint",
        )
        ctx.workdir.mkdir(exist_ok=True)
        ctx.checkpoint_dir.mkdir(exist_ok=True)  # type: ignore[union-attr]
        tracer = None
        if spec.digest_steps and not spec.diagnose:
            from .trace import StepTracer

            tracer = StepTracer(digest_steps=spec.digest_steps).install()
        if spec.diagnose:
            from .trace import StepTracer

            resumed_at = spec.probe_resume_at if spec.resume_from else None
            tracer = StepTracer(resumed_at=resumed_at, ops_step=spec.ops_step).install()
            if spec.probe_resume_at is not None:
                tracer.probe = True  # the uninterrupted run of a probe: the state too, steps from 0
        stage = "job"
        with contextlib.ExitStack() as stack:
            if rank is not None:
                from .distributed import process_group

                group = stack.enter_context(process_group(spec, rank))
                ctx.rank, ctx.local_rank, ctx.world_size, ctx.device = rank, rank, spec.nproc, group["device"]
            perturbation: dict[str, int] | None = None
            if spec.perturb is not None:
                from .perturb import perturbed

                perturbation = stack.enter_context(perturbed(spec.perturb, spec.perturb_parts))
            started = time.perf_counter()
            result = job(ctx)
            wall = time.perf_counter() - started
        stage = "record"  # from here on a failure is the result's (or ours), not the job's
        os.chdir(spec.cwd)  # the job may have changed directory
        if tracer is not None:
            tracer.save(workdir)
        flags = determinism_flags()
        flags["PYTHONHASHSEED"] = hash_seed
        flags["transformers_set_seed"] = transformers is not None
        meta: dict[str, Any] = {
            "seed": spec.seed,
            "device": spec.device,
            "deterministic": spec.deterministic,
            "run_index": spec.run_index,
            "job": spec.job.name,
            "flags": flags,
            "wall_s": round(wall, 4),
        }
        if perturbation is not None:
            meta["perturbation"] = perturbation
        if rank is not None:
            meta["distributed"] = {"rank": rank, "world_size": spec.nproc, "backend": group["backend"]}
        torch = sys.modules.get("torch")
        if torch is not None:
            meta["torch_threads"] = torch.get_num_threads()
        meta["config_audit"] = config.audit()
        record = normalize_result(result, meta)
        record.meta["dtype"] = _main_dtype(record.weights, spec.config)
        save_record(record, workdir / RECORD_DIR)
        if torch is not None and torch.cuda.is_initialized():
            with contextlib.suppress(Exception):
                peak = {"peak_bytes": int(torch.cuda.max_memory_reserved()), "device": str(torch.cuda.current_device())}
                (workdir / PEAK_FILE).write_text(json.dumps(peak), encoding="utf-8")
        if spec.manifest:
            manifest = collect_manifest(spec.cwd, spec.manifest_packages, spec.identity)
            if rank is not None:
                manifest["distributed"] = {"backend": group["backend"], "world_size": spec.nproc}
            (workdir / RUN_MANIFEST_FILE).write_text(dump_json(manifest), encoding="utf-8")
        # What the worker lacked, so that it can preload it for the next runs (a report, never required).
        with contextlib.suppress(OSError):
            (workdir / IMPORTS_FILE).write_text(json.dumps(_new_imports(modules_before)), encoding="utf-8")
        return 0
    except BaseException as exc:
        _write_error(workdir, stage, exc, config)
        return 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()


def main(argv: list[str]) -> int:
    """Entry point of a spawned job process: ``python -m pytest_repro._exec.child SPEC.json``."""
    if len(argv) != 1:
        print("usage: python -m pytest_repro._exec.child SPEC.json", file=sys.stderr)
        return 2
    return execute(RunSpec.from_dict(json.loads(Path(argv[0]).read_text(encoding="utf-8"))))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
