"""MLflow tracking: every check logged as an MLflow run at the end of the session, and the history read back.

Only the main process logs (under xdist the controller, which has every worker's outcomes), so workers
never write to the store at the same time. MLflow is imported only inside the functions that log or
read; this module itself imports nothing but the standard library.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import os
import re
import shlex
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest
    from mlflow.tracking import MlflowClient

    from ..session import ReproSession

LOCAL_STORE = "mlruns"  # folder in the rootdir holding the embedded store
LOCAL_DB = "mlflow.db"
_ON = ("", "1", "true", "yes", "on", "local")
_OFF = ("0", "false", "no", "off")
_PASSING = ("passed", "passed-cross-env", "unchanged", "written")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")
_PARAM_LIMIT = 500  # the value length every MLflow server version accepts
_TAG_LIMIT = 5000


def local_uri(rootdir: Path) -> str:
    """Return the embedded default store: a SQLite file in <rootdir>/mlruns."""
    return "sqlite:///" + str((rootdir / LOCAL_STORE / LOCAL_DB).resolve())


def switch_option(
    cli: str | None, ini: str, flag: str, ini_name: str, on: Sequence[str] = _ON
) -> tuple[str | None, str]:
    """(value, where it came from) of an off/on/value option: None when off, "" when on without a value."""
    if cli is not None:
        value, where = cli.strip(), flag + (f"={cli}" if cli else "")
    else:
        value, where = str(ini or "").strip(), f"{ini_name} = {ini}"
        if value.lower() in ("", *_OFF):
            return None, where
    if value.lower() in _OFF:
        return None, where
    return ("" if value.lower() in on else value), where


def tracking_uri(
    cli: str | None, ini: str, rootdir: Path, environ: Mapping[str, str] = os.environ
) -> tuple[str | None, str]:
    """Return (tracking URI or None when off, where it came from) from --repro-mlflow, ini repro_mlflow, env."""
    value, where = switch_option(cli, ini, "--repro-mlflow", "repro_mlflow")
    if value == "":
        env = environ.get("MLFLOW_TRACKING_URI", "").strip()
        return (env, "MLFLOW_TRACKING_URI") if env else (local_uri(rootdir), where)
    return value, where


def installed(module: str) -> bool:
    """Whether a top-level module can be imported here (found, not imported: costs nothing)."""
    return importlib.util.find_spec(module) is not None


def uri_problem(uri: str, where: str) -> str | None:
    """Say what is wrong with a tracking URI or with what it needs installed; None when it can be used."""
    if not _SCHEME.match(uri) and uri != "databricks":
        return (
            f"{where}: {uri!r} is not a tracking URI; give one such as http://mlflow.example:5000 or "
            "sqlite:///path/mlflow.db with '=' (a bare --repro-mlflow followed by a test path takes the path as the "
            "URI), or a bare --repro-mlflow for the local store in the rootdir"
        )
    if not installed("mlflow"):
        return f"{where} needs MLflow, which is not installed for this Python; {extra_install('mlflow')}"
    if uri.startswith("sqlite:"):
        missing = [m for m in ("sqlalchemy", "alembic") if not installed(m)]
        if missing:
            needs = " and ".join(missing)
            return f"{where}: the SQLite store needs {needs}, which are not installed; {extra_install('mlflow')}"
    return None


def extra_install(extra: str) -> str:
    """The pip command that adds pytest-repro's ``extra`` the way pytest-repro is installed here."""
    direct_url = _own_direct_url()
    checkout = Path(__file__).resolve().parent.parent
    if direct_url is None and (checkout / "pyproject.toml").is_file():
        # Running from a source tree whose metadata pip did not record (e.g. a stray .egg-info shadows it).
        direct_url = {"url": checkout.as_uri(), "dir_info": {"editable": True}}
    return extra_install_for(extra, direct_url)


def extra_install_for(extra: str, direct_url: Mapping[str, Any] | None) -> str:
    """The pip command that adds pytest-repro's ``extra`` to an install described by PEP 610 ``direct_url``."""
    url = str((direct_url or {}).get("url") or "")
    vcs = (direct_url or {}).get("vcs_info")
    if isinstance(vcs, Mapping) and vcs.get("vcs") == "git":
        at = f"@{vcs['commit_id']}" if vcs.get("commit_id") else ""
        return f"pip install {shlex.quote(f'pytest-repro[{extra}] @ git+{url}{at}')}"
    if url.startswith("file://") and "dir_info" in (direct_url or {}):
        from urllib.parse import unquote, urlparse

        folder = unquote(urlparse(url).path)
        dir_info = (direct_url or {}).get("dir_info")
        editable = "-e " if isinstance(dir_info, Mapping) and dir_info.get("editable") else ""
        return f"pip install {editable}{shlex.quote(f'{folder}[{extra}]')}"
    return f"pip install {shlex.quote(f'pytest-repro[{extra}]')}"


def _own_direct_url() -> Mapping[str, Any] | None:
    """pytest-repro's PEP 610 ``direct_url.json`` (None when installed from an index, or not installed)."""
    import importlib.metadata

    for dist in importlib.metadata.distributions(name="pytest-repro"):  # an .egg-info in the cwd may come first
        try:
            data = json.loads(dist.read_text("direct_url.json") or "null")
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    return None


def report_install() -> str:
    """The command that installs the HTML report's matplotlib, or pytest-repro's ``[report]`` extra."""
    return f"install it with: pip install matplotlib (or pytest-repro's extra: {extra_install('report')})"


def option_problems(config: pytest.Config) -> list[str]:
    """Check --repro-bundle-dir, --repro-html, --repro-mlflow and --repro-wandb at start-up; return the problems."""
    problems = []
    bundle_dir = config.getoption("repro_bundle_dir")
    if bundle_dir:
        from .bundle import bundle_dir_problem

        problem = bundle_dir_problem(bundle_dir)
        if problem:
            problems.append(problem)
    html = config.getoption("repro_html")
    if html and not installed("matplotlib"):
        problems.append(
            f"--repro-html={html} needs matplotlib (it draws the loss curves), which is not installed for this "
            f"Python; {report_install()}"
        )
    uri, where = tracking_uri(config.getoption("repro_mlflow"), config.getini("repro_mlflow"), config.rootpath)
    if uri is not None:
        problem = uri_problem(uri, where)
        if problem:
            problems.append(problem)
    from .wandb import option_problem

    problem = option_problem(config)
    if problem:
        problems.append(problem)
    return problems


def experiment_name(rootdir: Path, environ: Mapping[str, str] = os.environ) -> str:
    """Return the experiment: MLFLOW_EXPERIMENT_NAME, else the project's name in pyproject.toml, else the folder's."""
    if environ.get("MLFLOW_EXPERIMENT_NAME"):
        return environ["MLFLOW_EXPERIMENT_NAME"]
    try:
        import tomllib

        with open(rootdir / "pyproject.toml", "rb") as fh:
            name = tomllib.load(fh).get("project", {}).get("name")
        if isinstance(name, str) and name.strip():
            return name.strip()
    except (ImportError, OSError, ValueError):
        pass
    return rootdir.resolve().name or "pytest-repro"


def _git_commit(rootdir: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=rootdir, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def runner_name(identity: str, environ: Mapping[str, str] = os.environ) -> str:
    """Name the machine: the CI runner's name when set, else the hostname as repro_manifest_identity says."""
    for var in ("RUNNER_NAME", "CI_RUNNER_DESCRIPTION", "BUILDKITE_AGENT_NAME", "NODE_NAME"):
        if environ.get(var):
            return environ[var]
    import hashlib
    import platform

    host = platform.node()
    if identity == "plain":
        return host
    if identity == "omit":
        return ""
    return "sha256:" + hashlib.sha256(host.encode()).hexdigest()[:16]


def _key(text: str) -> str:
    return _KEY.sub("_", text)[:250] or "_"


def _clip(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _curve_label(label: str) -> str:
    return _key(label.replace(" ", "_"))


def check_metrics(o: Mapping[str, Any]) -> Iterator[tuple[str, float, int]]:
    """Yield (key, value, step) for a check: losses per step of every run and the reference, means, max diffs."""
    import math
    import statistics

    for label, losses in (o.get("curves") or {}).items():
        for step, value in enumerate(losses or []):
            if isinstance(value, (int, float)):
                yield f"loss/{_curve_label(label)}", float(value), step
    for section, value in (o.get("max_abs") or {}).items():
        if isinstance(value, (int, float)):
            yield f"max_abs/{_key(section)}", float(value), 0
    for run, seconds in enumerate(o.get("seconds") or [], start=1):
        yield "run_seconds", float(seconds), run
    stat = o.get("statistical") or {}
    for prefix, values in (("mean", stat), ("reference_mean", stat.get("reference") or {})):
        for name, per_seed in (values.get("metrics") or {}).items():
            numbers = [float(v) for v in per_seed if isinstance(v, (int, float)) and math.isfinite(v)]
            if numbers:
                yield f"stat/{prefix}/{_key(name)}", statistics.fmean(numbers), 0
        traces = [t for t in (values.get("losses") or []) if t]
        for step in range(min((len(t) for t in traces), default=0)):
            column = [float(t[step]) for t in traces if isinstance(t[step], (int, float))]
            if column:
                yield f"loss/{prefix}", statistics.fmean(column), step


def _effective_config(o: Mapping[str, Any], provenance: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """This run's effective config when the outcome carries it, else the reference's (and say which)."""
    if isinstance(o.get("effective_config"), dict):
        return o["effective_config"], "this run"
    effective = provenance.get("effective_config")
    if isinstance(effective, dict) and effective:
        return effective, "the reference's provenance.yaml (the outcome does not carry this run's config)"
    return {}, "none (no reference with a provenance.yaml)"


def _drift_text(o: Mapping[str, Any]) -> str:
    parts = [f"{o.get('nodeid')}{' [' + str(o['name']) + ']' if o.get('name') else ''}: {o.get('verdict')}"]
    parts.append(f"  {o.get('detail') or ''}")
    for title, key in (
        ("environment drift since the reference (numerics-relevant)", "drift"),
        ("what changed since the reference", "context"),
        ("details", "details"),
        ("warnings", "warnings"),
    ):
        lines = o.get(key) or []
        parts.append(f"{title}:" + ("" if lines else " none"))
        parts += [f"  {line}" for line in lines]
    return "\n".join(parts) + "\n"


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
        effective, params_from = _effective_config(o, provenance)
        name = o.get("name")
        tags = {
            **common,
            "repro.nodeid": str(o["nodeid"]),
            "repro.check": str(name or ""),
            "repro.verdict": str(o.get("verdict")),
            "repro.test_outcome": str(o.get("test_outcome") or ""),
            "repro.detail": _clip(o.get("detail") or "", _TAG_LIMIT),
            "repro.seed": str(o.get("seed")),
            "repro.device": str(o.get("device") or ""),
            "repro.environment_key": str(o.get("env_key") or ""),
            "repro.compared_with": str(o.get("compared_with") or ""),
            "repro.reference": _relative(reference, rootdir),
            "repro.drift": _clip("\n".join(o.get("drift") or []), _TAG_LIMIT),
            "repro.params_from": params_from,
            "mlflow.note.content": _clip(_drift_text(o), _TAG_LIMIT),
        }
        run_name = str(o["nodeid"]) + (f" [{name}]" if name else "")
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name[:250])
        run_id = run.info.run_id
        params = []
        for key, entry in sorted(effective.items()):
            entry = entry if isinstance(entry, Mapping) else {"value": entry, "source": ""}
            params.append(Param(_key(key), _clip(entry.get("value"), _PARAM_LIMIT)))
            tags[f"repro.source.{_key(key)}"[:250]] = str(entry.get("source") or "")
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
            (folder / "drift.txt").write_text(_drift_text(o), encoding="utf-8")
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
        self.client.set_terminated(run_id, "FINISHED" if o.get("verdict") in _PASSING else "FAILED")
        return str(run_id)


def _relative(path: Path | None, rootdir: Path) -> str:
    if path is None:
        return ""
    try:
        return str(path.resolve().relative_to(rootdir.resolve()))
    except ValueError:
        return str(path)


def _write_check_html(path: Path, o: Mapping[str, Any], rootdir: Path) -> str:
    """Write the HTML report of one check; return a note when it could not be written."""
    from .report import build_report

    try:
        from .report_html import write_html

        write_html(path, build_report([o], rootdir, 0 if o.get("verdict") in _PASSING else 1))
    except ModuleNotFoundError as exc:
        return f"no report.html: {exc.name} is not installed ({extra_install('report')})"
    return ""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Raise MLflow's and Alembic's loggers to WARNING for a while (store creation logs INFO lines)."""
    import logging

    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


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
    with warnings.catch_warnings(), _quiet():  # MLflow's deprecation warnings and INFO lines are not the user's
        warnings.simplefilter("ignore")
        logger = _Logger(uri, experiment, artifact_location)
        setup = time.perf_counter() - started
        ids = []
        for o in outcomes:
            key = (str(o["nodeid"]), o.get("name"))
            extra = [artifacts[key]] if artifacts and key in artifacts else []
            ids.append(logger.log(o, common, rootdir, extra))
    return ids, experiment, setup, time.perf_counter() - started - setup


def publish(session: ReproSession, config: pytest.Config) -> bool:
    """Before the reports: bundle failing checks and written references, log to MLflow and W&B; False on failure."""
    from .wandb import wandb_project

    bundle_dir = config.getoption("repro_bundle_dir")
    uri, _ = tracking_uri(config.getoption("repro_mlflow"), config.getini("repro_mlflow"), config.rootpath)
    project, _ = wandb_project(config.getoption("repro_wandb"), config.getini("repro_wandb"), config.rootpath)
    if not bundle_dir and uri is None and project is None:
        return True
    ok = True
    bundles: dict[tuple[str, str | None], Path] = {}
    if bundle_dir:
        from .._cli.accept import bundle_written
        from .bundle import bundle_failing

        bundles, problems = bundle_failing(session.outcomes, Path(bundle_dir), session.rootdir)
        written, more = bundle_written(session.outcomes, Path(bundle_dir), session.rootdir)
        session.notes += problems + more
        ok = not (problems or more)
        if bundles:
            session.notes.append(f"{len(bundles)} bundle(s) of failing checks written to {bundle_dir}:")
            session.notes += [f"  {path}" for path in bundles.values()]
        if written:
            session.notes.append(
                f"{len(written)} bundle(s) of the references this run wrote (install them elsewhere with "
                f"pytest-repro accept) written to {bundle_dir}:"
            )
            session.notes += [f"  {path}" for path in written.values()]
        if not bundles and not written:
            session.notes.append(f"no failing checks: no bundles written to {bundle_dir}")
    if (uri is None and project is None) or not session.outcomes:
        return ok
    from .. import __version__

    commit = _git_commit(session.rootdir)
    common = {
        "repro.plugin_version": __version__,
        "repro.git_commit": commit,
        "repro.runner": runner_name(session.settings.identity),
        "repro.command": _clip(" ".join(session.invocation), _TAG_LIMIT),
    }
    if uri is not None:
        ok = _publish_mlflow(session, uri, {**common, "mlflow.source.name": "pytest-repro"}, bundles) and ok
    if project is not None:
        from .wandb import publish_wandb

        ok = publish_wandb(session, project, bundles, common) and ok
    return ok


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


# ---------------------------------------------------------------------------------------------- history


def _final(metrics: Mapping[str, float], *keys: str) -> float | None:
    for key in keys:
        if key in metrics:
            return metrics[key]
    return None


def read_history(
    uri: str, experiment: str, nodeid: str, name: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """Return the logged runs of one check, oldest first (the latest ``limit``), read through MlflowClient."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    with _quiet():
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no experiment {experiment!r}")
    # MLflow's filter syntax has no escape for quotes: such node ids are filtered here instead.
    filter_string = "" if "'" in nodeid else f"tags.`repro.nodeid` = '{nodeid}'"
    runs = []
    token = None
    while True:
        page = client.search_runs(
            [exp.experiment_id],
            filter_string=filter_string,
            order_by=["attributes.start_time DESC"],
            max_results=min(limit, 1000) if filter_string else 1000,
            page_token=token,
        )
        runs += [r for r in page if r.data.tags.get("repro.nodeid") == nodeid]
        token = page.token
        if not token or len(runs) >= limit:
            break
    out = []
    for run in runs[:limit]:
        tags, metrics = run.data.tags, run.data.metrics
        check = tags.get("repro.check") or None
        if name is not None and check != name:
            continue
        runs_final = {k[len("loss/") :]: v for k, v in metrics.items() if k.startswith("loss/run_")}
        out.append(
            {
                "run_id": run.info.run_id,
                "start_time": run.info.start_time,
                "check": check,
                "verdict": tags.get("repro.verdict", ""),
                "detail": tags.get("repro.detail", ""),
                "environment_key": tags.get("repro.environment_key", ""),
                "device": tags.get("repro.device", ""),
                "runner": tags.get("repro.runner", ""),
                "git_commit": tags.get("repro.git_commit", ""),
                "final_loss": _final(metrics, "loss/run_1", "loss/mean"),
                "final_loss_reference": _final(metrics, "loss/reference", "loss/reference_mean"),
                "final_loss_runs": runs_final,
            }
        )
    out.sort(key=lambda r: (r["start_time"] or 0, r["run_id"]))
    return out


def format_history(rows: Sequence[Mapping[str, Any]], nodeid: str, experiment: str, uri: str) -> list[str]:
    """Render the history table and a line saying since when (and where) the check drifts."""
    from datetime import datetime, timezone

    from .._judge.verdict import parse_verdict

    def when(row: Mapping[str, Any]) -> str:
        ms = row.get("start_time") or 0
        return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")

    def loss(value: Any) -> str:
        return f"{value:.8g}" if isinstance(value, (int, float)) else "-"

    checks = any(r["check"] for r in rows)
    header = ["started (UTC)", "verdict", "environment", "device", "runner", "commit", "final loss", "reference"]
    if checks:
        header.insert(1, "check")
    table = []
    for r in rows:
        cells = [
            when(r),
            parse_verdict(r["verdict"]).label if r["verdict"] else "?",
            r["environment_key"] or "-",
            r["device"] or "-",
            (r["runner"] or "-")[:23],
            (r["git_commit"] or "-")[:8],
            loss(r["final_loss"]),
            loss(r["final_loss_reference"]),
        ]
        if checks:
            cells.insert(1, r["check"] or "-")
        table.append(cells)
    widths = [max(len(str(row[i])) for row in [header, *table]) for i in range(len(header))]
    lines = [f"{nodeid}: {len(rows)} run(s) in experiment {experiment!r} at {uri}, oldest first"]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *table]]
    lines += _drift_summary(rows, when)
    return lines


def _drift_summary(rows: Sequence[Mapping[str, Any]], when: Any) -> list[str]:
    """Say since when the latest streak of failing verdicts runs, and where environments changed."""
    from .._judge.verdict import parse_verdict

    out = []
    for prev, row in itertools.pairwise(rows):
        if prev["environment_key"] and row["environment_key"] and prev["environment_key"] != row["environment_key"]:
            out.append(
                f"environment changed at {when(row)}: {prev['environment_key']} -> {row['environment_key']} "
                f"(runner {row['runner'] or '-'})"
            )
    failing = 0
    for row in reversed(rows):
        if row["verdict"] in _PASSING:
            break
        failing += 1
    if not rows:
        return out
    if failing == 0:
        out.append("latest run passed")
    elif failing == len(rows):
        out.append(f"failing in all {failing} run(s) shown, since {when(rows[0])} (no passing run shown)")
    else:
        first, last_good = rows[len(rows) - failing], rows[len(rows) - failing - 1]
        label = parse_verdict(first["verdict"]).label
        out.append(
            f"drifting since {when(first)}: {label} on {first['environment_key'] or '-'} "
            f"(runner {first['runner'] or '-'}, commit {(first['git_commit'] or '-')[:8]}): {first['detail']}; "
            f"last passed {when(last_good)} at commit {(last_good['git_commit'] or '-')[:8]}"
        )
    return out
