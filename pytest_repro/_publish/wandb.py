"""Weights & Biases tracking: every check logged as one W&B run at the end of the session, offline by default.

A Publisher in ``registry.PUBLISHERS``, like MLflow: options checked at start-up, runs logged by the
main process only (under xdist the controller). Runs are written offline into ``<rootdir>/wandb`` unless
the user set ``WANDB_MODE=online`` themselves; W&B's error reporting (its only network call in offline
mode) is switched off unless ``WANDB_ERROR_REPORTING`` is set. wandb is imported only inside the
functions that log; this module itself imports nothing but the standard library.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import itertools
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import extras
from .base import failed
from .trackers import (
    PASSING,
    check_metrics,
    common_tags,
    drift_text,
    effective_config,
    experiment_name,
    quiet_loggers,
    relative,
)

if TYPE_CHECKING:
    import pytest

    from ..session import ReproSession
    from ..settings import Settings, Switch
    from .base import Publication

RUN_FOLDER = "wandb"  # what wandb itself creates in its dir: <rootdir>/wandb/offline-run-*/
ARTIFACT_FOLDER = "repro-artifact"  # in each run's folder: the files its artifact points at
ARTIFACT_TYPE = "repro-check"
MAX_ARTIFACT_FILE = 64 << 20  # reference files larger than this are listed in the metadata, not copied

_ONLINE = ("online", "run")
_OFFLINE = ("offline", "dryrun")
_BAD_PROJECT = re.compile(r"[/\\#?%:]")  # characters W&B refuses in a project name
_ARTIFACT_NAME = re.compile(r"[^A-Za-z0-9_.-]")
_TAG_LIMIT = 64  # W&B's longest tag


def wandb_project(switch: Switch, rootdir: Path, environ: Mapping[str, str] = os.environ) -> tuple[str | None, str]:
    """Return (project or None when off, where it came from) from --repro-wandb, ini repro_wandb, WANDB_PROJECT."""
    value, where = switch.value, switch.where
    if value == "":
        env = environ.get("WANDB_PROJECT", "").strip()
        return (env, "WANDB_PROJECT") if env else (experiment_name(rootdir, {}), where)
    return value, where


def run_mode(environ: Mapping[str, str] = os.environ) -> str:
    """Return the mode runs are logged in: offline unless WANDB_MODE says online (or disabled)."""
    mode = environ.get("WANDB_MODE", "").strip().lower()
    if mode in _ONLINE:
        return "online"
    if mode == "disabled" or environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes", "on"):
        return "disabled"
    return "offline"


def run_dir(rootdir: Path, environ: Mapping[str, str] = os.environ) -> Path:
    """Return the folder wandb creates its run folders in: <WANDB_DIR or rootdir>/wandb (.wandb if that exists)."""
    root = Path(environ.get("WANDB_DIR") or rootdir).resolve()
    return root / ".wandb" if (root / ".wandb").is_dir() else root / RUN_FOLDER


def project_problem(
    project: str, where: str, args: Sequence[str], environ: Mapping[str, str] = os.environ
) -> str | None:
    """Say what is wrong with a W&B project name or with the W&B set-up; None when it can be used."""
    if _BAD_PROJECT.search(project) or len(project) > 128:
        return (
            f"{where}: {project!r} is not a W&B project name (at most 128 characters, none of / \\ # ? % :); "
            "give one with '=' (a bare --repro-wandb followed by a test path takes the path as the project), "
            "or a bare --repro-wandb after the test paths for the project named in pyproject.toml"
        )
    separate = any(a == "--repro-wandb" and b == project for a, b in itertools.pairwise(args))
    if separate and (project.endswith(".py") or "::" in project or Path(project).exists()):
        return (
            f"{where}: {project!r} looks like a test path, which a bare --repro-wandb takes as the project; "
            f"write --repro-wandb={project} if that is the project's name, or put a bare --repro-wandb after the "
            "test paths"
        )
    if not extras.installed("wandb"):
        return f"{where} needs wandb, which is not installed for this Python; {extras.extra_install('wandb')}"
    if run_mode(environ) == "disabled":
        disabled = environ.get("WANDB_MODE", "").strip().lower() == "disabled"
        set_by = "WANDB_MODE=disabled" if disabled else f"WANDB_DISABLED={environ.get('WANDB_DISABLED')}"
        return (
            f"{where}: {set_by} turns W&B off, so no check would be logged; unset it (runs are then logged offline "
            "into <rootdir>/wandb) or drop the option"
        )
    return None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _artifact_name(o: Mapping[str, Any]) -> str:
    """A W&B artifact name for a check: its node id (and check name) made safe, with a hash for uniqueness."""
    label = str(o["nodeid"]) + (f"[{o['name']}]" if o.get("name") else "")
    digest = hashlib.sha256(label.encode()).hexdigest()[:8]
    return f"repro-{_ARTIFACT_NAME.sub('_', label)[:100]}-{digest}"


def _tags(o: Mapping[str, Any]) -> list[str]:
    tags = [
        f"verdict:{o.get('verdict')}",
        f"env:{o.get('env_key') or '-'}",
        f"device:{o.get('device') or '-'}",
        f"seed:{o.get('seed')}",
    ]
    if o.get("drift"):
        tags.append("drift")
    return [t[:_TAG_LIMIT] for t in tags]


def _history(o: Mapping[str, Any]) -> tuple[dict[int, dict[str, float]], dict[str, float]]:
    """Split a check's metrics: loss traces per step (history rows) and the rest (summary values)."""
    rows: dict[int, dict[str, float]] = {}
    single: dict[str, float] = {}
    for key, value, step in check_metrics(o):
        if key.startswith("loss/"):
            rows.setdefault(step, {})[key] = value
        elif key != "run_seconds":  # a list in the summary instead
            single[key] = value
    return rows, single


def _stage_artifact(folder: Path, o: Mapping[str, Any], extra: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """Copy what the artifact holds into the run's folder; return (files, reference files left out and why)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "drift.txt").write_text(drift_text(o), encoding="utf-8")
    (folder / "outcome.json").write_text(json.dumps(dict(o), indent=2, sort_keys=True, default=str) + "\n")
    left_out = []
    reference = Path(o["path"]) if o.get("path") else None
    if reference is not None and reference.is_dir():
        (folder / "reference").mkdir(exist_ok=True)
        for file in sorted(reference.iterdir()):
            if not file.is_file():
                continue
            size = file.stat().st_size
            if size > MAX_ARTIFACT_FILE:
                left_out.append(f"reference/{file.name} ({size} bytes, over {MAX_ARTIFACT_FILE >> 20} MiB)")
                continue
            shutil.copyfile(file, folder / "reference" / file.name)
    for path in extra:
        shutil.copyfile(path, folder / path.name)
    return sorted(p for p in folder.rglob("*") if p.is_file()), left_out


class _Logger:
    """Logs a session's checks, one wandb run each, through wandb.init / run.log / run.log_artifact."""

    def __init__(self, project: str, mode: str, rootdir: Path, group: str) -> None:
        import wandb

        wandb.setup()  # starts wandb's service process, which every run of the session then uses
        with contextlib.suppress(ImportError):  # what the first wandb.init imports (~1 s): counted as set-up
            importlib.import_module("wandb.sdk.launch.inputs.internal")
        self.wandb = wandb
        self.project, self.mode, self.rootdir, self.group = project, mode, rootdir, group
        self.settings = wandb.Settings(
            console="off",  # the pytest process's output is pytest's
            silent=True,
            x_disable_stats=True,  # no system-metrics sampling; the manifest has the machine
            x_disable_machine_info=True,
            x_save_requirements=False,
            save_code=False,
        )
        self.dir = None if os.environ.get("WANDB_DIR") else str(rootdir.resolve())

    def log(self, o: Mapping[str, Any], common: Mapping[str, str], extra: Sequence[Path]) -> Path:
        """Log one check as a run; return the run's folder."""
        from .bundle import read_yaml

        reference = Path(o["path"]) if o.get("path") else None
        provenance = read_yaml(reference / "provenance.yaml") if reference and reference.is_dir() else {}
        effective, params_from = effective_config(o, provenance)
        config: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for key, entry in sorted(effective.items()):
            entry = entry if isinstance(entry, Mapping) else {"value": entry, "source": ""}
            config[str(key)] = _jsonable(entry.get("value"))
            sources[str(key)] = str(entry.get("source") or "")
        config["repro.sources"] = sources
        config["repro.params_from"] = params_from
        name = o.get("name")
        run = self.wandb.init(
            project=self.project,
            name=str(o["nodeid"]) + (f" [{name}]" if name else ""),
            group=self.group,
            job_type="repro-check",
            tags=_tags(o),
            notes=drift_text(o),
            config=config,
            dir=self.dir,
            mode=self.mode,  # type: ignore[arg-type]
            reinit="create_new",
            settings=self.settings,
        )
        passed = o.get("verdict") in PASSING
        if run.settings.mode == "disabled" or getattr(run, "disabled", False):
            raise RuntimeError(f"wandb.init returned a disabled run (mode {run.settings.mode!r}): nothing is logged")
        try:
            rows, single = _history(o)
            for step in sorted(rows):
                run.log(rows[step], step=step)
            summary = {
                **common,
                "repro.nodeid": str(o["nodeid"]),
                "repro.check": str(name or ""),
                "repro.verdict": str(o.get("verdict")),
                "repro.test_outcome": str(o.get("test_outcome") or ""),
                "repro.detail": str(o.get("detail") or ""),
                "repro.seed": o.get("seed"),
                "repro.device": str(o.get("device") or ""),
                "repro.environment_key": str(o.get("env_key") or ""),
                "repro.compared_with": str(o.get("compared_with") or ""),
                "repro.reference": relative(reference, self.rootdir),
                "repro.drift": list(o.get("drift") or []),
                "repro.context": list(o.get("context") or []),
                "repro.run_seconds": [float(s) for s in o.get("seconds") or []],
                **single,
            }
            run.summary.update(_jsonable(summary))
            folder = Path(run.settings.sync_dir)
            files, left_out = _stage_artifact(folder / ARTIFACT_FOLDER, o, extra)
            artifact = self.wandb.Artifact(
                _artifact_name(o),
                type=ARTIFACT_TYPE,
                description=f"pytest-repro check {run.name}: {o.get('verdict')}",
                metadata=_jsonable(
                    {
                        "nodeid": o["nodeid"],
                        "check": name,
                        "verdict": o.get("verdict"),
                        "environment_key": o.get("env_key"),
                        "reference": relative(reference, self.rootdir),
                        "left_out": left_out,
                    }
                ),
            )
            for file in files:
                # immutable: the artifact points at the copy in the run folder (no staging copy in the home dir)
                artifact.add_file(
                    str(file), name=file.relative_to(folder / ARTIFACT_FOLDER).as_posix(), policy="immutable"
                )
            run.log_artifact(artifact)
        except BaseException:
            run.finish(exit_code=1)
            raise
        run.finish(exit_code=0 if passed else 1)
        if not list(folder.glob("run-*.wandb")):
            raise RuntimeError(f"wandb wrote no run file (run-*.wandb) into {folder}")
        return folder


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Raise wandb's logger to WARNING and hide its warnings for a while (they are not the user's)."""
    import warnings

    with quiet_loggers("wandb"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def log_session(
    outcomes: Sequence[Mapping[str, Any]],
    project: str,
    rootdir: Path,
    common: Mapping[str, str],
    artifacts: Mapping[tuple[str, str | None], Path] | None = None,
    logged: list[Path] | None = None,
) -> tuple[list[Path], float, float]:
    """Log every check as a W&B run; return (run folders, seconds to import and start wandb, seconds to log).

    ``logged`` collects the run folders as they are written, so that a failure part-way can say how many were.
    """
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # wandb-core's crash reports are a network call
    started = time.perf_counter()
    folders = logged if logged is not None else []
    with _quiet():
        from datetime import datetime, timezone

        group = "pytest-repro " + datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        logger = _Logger(project, run_mode(), rootdir, group)
        active = logger.wandb.run  # a run the user's own code has open in this process: left alone
        setup = time.perf_counter() - started
        try:
            for o in outcomes:
                key = (str(o["nodeid"]), o.get("name"))
                extra = [artifacts[key]] if artifacts and key in artifacts else []
                folders.append(logger.log(o, common, extra))
        finally:
            if active is None:
                logger.wandb.teardown()  # stop wandb's service process now, not at interpreter exit
    return folders, setup, time.perf_counter() - started - setup


def publish_wandb(
    session: ReproSession, project: str, bundles: Mapping[tuple[str, str | None], Path], common: Mapping[str, str]
) -> bool:
    """Log every check of the session to W&B and say so in the summary; False when that failed."""
    mode = run_mode()
    where = str(run_dir(session.rootdir))
    logged: list[Path] = []
    try:
        folders, setup, seconds = log_session(session.outcomes, project, session.rootdir, common, bundles, logged)
    except Exception as exc:  # the tracker is an external library and maybe a service: reported, never raised
        done = f"{len(logged)} of {len(session.outcomes)} check(s) were logged before it failed ({where}); "
        fix = (
            "check the W&B settings (WANDB_MODE, WANDB_DIR, WANDB_API_KEY) or run without --repro-wandb"
            if mode == "online"
            else f"check that {where} can be written (WANDB_DIR moves it), or run without --repro-wandb"
        )
        session.notes.append(
            f"could not log to W&B project {project!r} ({mode}): {type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}; {done}{fix}"
        )
        return False
    per = seconds / len(folders) * 1000 if folders else 0.0
    cost = f"({per:.0f} ms/check, plus {setup:.2f} s to import wandb and start its service)"
    elsewhere = sorted({str(f.parent) for f in folders if f.parent.resolve() != run_dir(session.rootdir)})
    if elsewhere:  # wandb falls back to the temp dir when it cannot create its folder
        session.notes.append(
            f"W&B: {len(folders)} run(s) were logged, but into {', '.join(elsewhere)} instead of {where} "
            f"(wandb could not create {where}); make {where} writable (or set WANDB_DIR to a writable folder)"
        )
        return False
    if mode == "offline":
        session.notes.append(
            f"W&B: {len(folders)} run(s) logged offline to project {project!r} in {where} {cost}; "
            f"upload them with: wandb sync {where}"
        )
    else:
        session.notes.append(f"W&B: {len(folders)} run(s) logged online to project {project!r} {cost}")
    return True


class WandB:
    """--repro-wandb / ini repro_wandb: project and W&B set-up checked at start-up, every check logged at the end."""

    def problems(self, settings: Settings, config: pytest.Config) -> list[str]:
        """Whether the project is a W&B project name (not a test path), and wandb importable and not disabled."""
        project, where = wandb_project(settings.wandb, config.rootpath)
        problem = project_problem(project, where, list(config.invocation_params.args)) if project is not None else None
        return [problem] if problem else []

    def publish(self, run: Publication, exitstatus: int) -> int | None:
        """Log every check as a run (with its bundle, if any, in its artifact); a failure fails a passing run."""
        project, _ = wandb_project(run.session.settings.wandb, run.config.rootpath)
        if project is None or not run.session.outcomes:
            return None
        return None if publish_wandb(run.session, project, run.bundles, common_tags(run)) else failed(exitstatus)
