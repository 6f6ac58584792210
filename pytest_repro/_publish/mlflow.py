"""MLflow tracking: every check logged as an MLflow run at the end of the session (--repro-mlflow).

Only the main process logs (under xdist the controller, which has every worker's outcomes), so workers
never write to the store at the same time. MLflow is imported only inside the functions that log or
read; this module itself imports nothing but the standard library.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import extras
from .base import failed
from .trackers import (
    PASSING,
    TAG_LIMIT,
    check_metrics,
    clip,
    common_tags,
    drift_text,
    effective_config,
    experiment_name,
    quiet_loggers,
    relative,
    safe_key,
)

if TYPE_CHECKING:
    import pytest
    from mlflow.tracking import MlflowClient

    from ..session import ReproSession
    from ..settings import Settings, Switch
    from .base import Publication

LOCAL_STORE = "mlruns"  # folder in the rootdir holding the embedded store
LOCAL_DB = "mlflow.db"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_PARAM_LIMIT = 500  # the value length every MLflow server version accepts


def local_uri(rootdir: Path) -> str:
    """Return the embedded default store: a SQLite file in <rootdir>/mlruns."""
    return "sqlite:///" + str((rootdir / LOCAL_STORE / LOCAL_DB).resolve())


def tracking_uri(switch: Switch, rootdir: Path, environ: Mapping[str, str] = os.environ) -> tuple[str | None, str]:
    """Return (tracking URI or None when off, where it came from) from --repro-mlflow, ini repro_mlflow, env."""
    value, where = switch.value, switch.where
    if value == "":
        env = environ.get("MLFLOW_TRACKING_URI", "").strip()
        return (env, "MLFLOW_TRACKING_URI") if env else (local_uri(rootdir), where)
    return value, where


def uri_problem(uri: str, where: str) -> str | None:
    """Say what is wrong with a tracking URI or with what it needs installed; None when it can be used."""
    if not _SCHEME.match(uri) and uri != "databricks":
        return (
            f"{where}: {uri!r} is not a tracking URI; give one such as http://mlflow.example:5000 or "
            "sqlite:///path/mlflow.db with '=' (a bare --repro-mlflow followed by a test path takes the path as the "
            "URI), or a bare --repro-mlflow for the local store in the rootdir"
        )
    if not extras.installed("mlflow"):
        return f"{where} needs MLflow, which is not installed for this Python; {extras.extra_install('mlflow')}"
    if uri.startswith("sqlite:"):
        missing = [m for m in ("sqlalchemy", "alembic") if not extras.installed(m)]
        if missing:
            needs = " and ".join(missing)
            return f"{where}: the SQLite store needs {needs}, which are not installed; {extras.extra_install('mlflow')}"
    return None


class _Logger:
    """Logs a session's checks to one experiment through MlflowClient (no global MLflow state is touched)."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None) -> None:
        from mlflow.tracking import MlflowClient

        self.client: MlflowClient = MlflowClient(tracking_uri=uri)
        self.experiment_id = self._experiment(experiment, artifact_location)

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(name, artifact_location=artifact_location))
        except MlflowException:  # created meanwhile by another process
            again = self.client.get_experiment_by_name(name)
            if again is None:
                raise
            return str(again.experiment_id)

    def log(self, o: Mapping[str, Any], common: Mapping[str, str], rootdir: Path, extra: Sequence[Path]) -> str:
        """Log one check as a run; return its run id."""
        from mlflow.entities import Metric, Param, RunTag

        reference = Path(o["path"]) if o.get("path") else None
        from .bundle import read_yaml

        provenance = read_yaml(reference / "provenance.yaml") if reference else {}
        effective, params_from = effective_config(o, provenance)
        name = o.get("name")
        tags = {
            **common,
            "repro.nodeid": str(o["nodeid"]),
            "repro.check": str(name or ""),
            "repro.verdict": str(o.get("verdict")),
            "repro.test_outcome": str(o.get("test_outcome") or ""),
            "repro.detail": clip(o.get("detail") or "", TAG_LIMIT),
            "repro.seed": str(o.get("seed")),
            "repro.device": str(o.get("device") or ""),
            "repro.environment_key": str(o.get("env_key") or ""),
            "repro.compared_with": str(o.get("compared_with") or ""),
            "repro.reference": relative(reference, rootdir),
            "repro.drift": clip("\n".join(o.get("drift") or []), TAG_LIMIT),
            "repro.params_from": params_from,
            "mlflow.note.content": clip(drift_text(o), TAG_LIMIT),
        }
        run_name = str(o["nodeid"]) + (f" [{name}]" if name else "")
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name[:250])
        run_id = run.info.run_id
        params = []
        for key, entry in sorted(effective.items()):
            entry = entry if isinstance(entry, Mapping) else {"value": entry, "source": ""}
            params.append(Param(safe_key(key), clip(entry.get("value"), _PARAM_LIMIT)))
            tags[f"repro.source.{safe_key(key)}"[:250]] = str(entry.get("source") or "")
        source_tags = [RunTag(k, v) for k, v in tags.items() if k.startswith("repro.source.")]
        now_ms = int(time.time() * 1000)
        metrics = [Metric(key, value, now_ms, step) for key, value, step in check_metrics(o)]
        # MLflow's limits per batch: 100 params, 100 tags, 1000 entities in all.
        batches = max(-(-len(params) // 100), -(-len(source_tags) // 100), -(-len(metrics) // 800))
        for k in range(batches):
            self.client.log_batch(
                run_id,
                metrics=metrics[k * 800 : (k + 1) * 800],
                params=params[k * 100 : (k + 1) * 100],
                tags=source_tags[k * 100 : (k + 1) * 100],
            )
        with tempfile.TemporaryDirectory(prefix="pytest-repro-mlflow-") as tmp:
            folder = Path(tmp)
            (folder / "drift.txt").write_text(drift_text(o), encoding="utf-8")
            (folder / "outcome.json").write_text(json.dumps(dict(o), indent=2, sort_keys=True, default=str) + "\n")
            if reference is not None:
                for file in ("manifest.yaml", "provenance.yaml"):
                    if (reference / file).is_file():
                        (folder / "reference").mkdir(exist_ok=True)
                        (folder / "reference" / file).write_bytes((reference / file).read_bytes())
            html_note = _write_check_html(folder / "report.html", o, rootdir)
            if html_note:
                self.client.set_tag(run_id, "repro.html", html_note)
            for path in extra:
                (folder / path.name).write_bytes(path.read_bytes())
            self.client.log_artifacts(run_id, str(folder))
        self.client.set_terminated(run_id, "FINISHED" if o.get("verdict") in PASSING else "FAILED")
        return str(run_id)


def _write_check_html(path: Path, o: Mapping[str, Any], rootdir: Path) -> str:
    """Write the HTML report of one check; return a note when it could not be written."""
    from .report import build_report

    try:
        from .report_html import write_html

        write_html(path, build_report([o], rootdir, 0 if o.get("verdict") in PASSING else 1))
    except ModuleNotFoundError as exc:
        return f"no report.html: {exc.name} is not installed ({extras.extra_install('report')})"
    return ""


def quiet() -> contextlib.AbstractContextManager[None]:
    """Raise MLflow's and Alembic's loggers to WARNING for a while (store creation logs INFO lines)."""
    return quiet_loggers("mlflow", "alembic")


def log_session(
    outcomes: Sequence[Mapping[str, Any]],
    uri: str,
    rootdir: Path,
    common: Mapping[str, str],
    artifacts: Mapping[tuple[str, str | None], Path] | None = None,
) -> tuple[list[str], str, float, float]:
    """Log every check as an MLflow run; return (run ids, experiment, seconds to connect, seconds to log)."""
    import warnings

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # a test run must not phone home
    started = time.perf_counter()
    experiment = experiment_name(rootdir)
    artifact_location = None
    if uri == local_uri(rootdir):
        store = rootdir / LOCAL_STORE
        store.mkdir(parents=True, exist_ok=True)
        artifact_location = (store / "artifacts").resolve().as_uri()
    with warnings.catch_warnings(), quiet():  # MLflow's deprecation warnings and INFO lines are not the user's
        warnings.simplefilter("ignore")
        logger = _Logger(uri, experiment, artifact_location)
        setup = time.perf_counter() - started
        ids = []
        for o in outcomes:
            key = (str(o["nodeid"]), o.get("name"))
            extra = [artifacts[key]] if artifacts and key in artifacts else []
            ids.append(logger.log(o, common, rootdir, extra))
    return ids, experiment, setup, time.perf_counter() - started - setup


def _publish_mlflow(
    session: ReproSession, uri: str, common: dict[str, str], bundles: Mapping[tuple[str, str | None], Path]
) -> bool:
    """Log every check to MLflow and say so in the summary; False when that failed."""
    commit = common["repro.git_commit"]
    if commit:
        common["mlflow.source.git.commit"] = commit
    try:
        ids, experiment, setup, seconds = log_session(session.outcomes, uri, session.rootdir, common, bundles)
    except Exception as exc:  # the tracker is an external service: any failure is reported, never raised
        session.notes.append(
            f"could not log to MLflow at {uri}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}; "
            "check that the tracking server is reachable (or drop the URI for the local store in the rootdir)"
        )
        return False
    per = seconds / len(ids) * 1000 if ids else 0.0
    session.notes.append(
        f"MLflow: {len(ids)} run(s) logged to experiment {experiment!r} at {uri} "
        f"({per:.0f} ms/check, plus {setup:.2f} s to import MLflow and open the store)"
    )
    return True


class MLflow:
    """--repro-mlflow / ini repro_mlflow: the tracking URI checked at start-up, every check logged at the end."""

    def problems(self, settings: Settings, config: pytest.Config) -> list[str]:
        """Whether the tracking URI is one, and MLflow (and the SQLite store's needs) importable."""
        uri, where = tracking_uri(settings.mlflow, config.rootpath)
        problem = uri_problem(uri, where) if uri is not None else None
        return [problem] if problem else []

    def publish(self, run: Publication, exitstatus: int) -> int | None:
        """Log every check as a run (with its bundle, if any, as an artifact); a failure fails a passing run."""
        uri, _ = tracking_uri(run.session.settings.mlflow, run.config.rootpath)
        if uri is None or not run.session.outcomes:
            return None
        common = {**common_tags(run), "mlflow.source.name": "pytest-repro"}
        return None if _publish_mlflow(run.session, uri, common, run.bundles) else failed(exitstatus)
