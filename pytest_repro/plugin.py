"""pytest hooks only: options, the ``reproducible`` marker, the ``repro`` fixture, and the summary.

Nothing heavy is imported here: torch and friends load only when a reproducible test runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .settings import INI_LISTS, INI_OPTIONS, MARKER, SettingsError

if TYPE_CHECKING:
    from .fixture import Repro
    from .session import ReproSession

session_key = pytest.StashKey["ReproSession"]()
repro_key = pytest.StashKey["Repro"]()
skipped_key = pytest.StashKey[int]()  # reproducible tests skipped because --repro is off
_CLI = (
    "repro_runs",
    "repro_seed",
    "repro_device",
    "repro_deterministic",
    "repro_timeout",
    "repro_isolation",
    "repro_parallel_runs",
    "repro_threads",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("repro", "reproducibility (pytest-repro)")
    group.addoption(
        "--repro",
        action="store_true",
        default=False,
        help="run tests marked @pytest.mark.reproducible (skipped otherwise)",
    )
    # No argparse choices: pytest's early parse would reject `--repro-regen tests/` before we can fix the args.
    group.addoption(
        "--repro-regen",
        nargs="?",
        const="all",
        default=None,
        metavar="all|missing",
        help="write references: all (default) rewrites changed ones, missing writes only absent ones",
    )
    group.addoption(
        "--repro-regen-force",
        action="store_true",
        default=False,
        help="allow --repro-regen when the CI environment variable is set",
    )
    group.addoption(
        "--repro-diagnose",
        action="store_true",
        default=False,
        help="when runs diverge, rerun them tracing every parameter and gradient per optimizer step "
        "and report the first tensor that differs",
    )
    group.addoption(
        "--repro-report",
        default=None,
        metavar="PATH",
        help="write every reproducibility check's outcome as JSON (schema: pytest_repro/report.schema.json)",
    )
    group.addoption(
        "--repro-unused",
        default=None,
        choices=("report", "fail", "delete"),
        help="after a full run, report (or fail on, or delete) reference folders no collected test owns",
    )
    group.addoption(
        "--repro-unused-force",
        action="store_true",
        default=False,
        help="check unused references even though the run was filtered (-k, -m, --lf, paths)",
    )
    group.addoption(
        "--repro-html",
        default=None,
        metavar="PATH",
        help="write a self-contained HTML report: loss curves, difference tables, environment drift",
    )
    group.addoption("--repro-runs", default=None, help="runs per test (ini repro_runs)")
    group.addoption("--repro-seed", default=None, help="base seed (ini repro_seed)")
    group.addoption("--repro-device", default=None, help="auto, cpu, cuda or cuda:N (ini repro_device)")
    group.addoption(
        "--repro-deterministic",
        default=None,
        choices=("true", "false"),
        help="torch deterministic mode (ini repro_deterministic)",
    )
    group.addoption(
        "--repro-threads",
        default=None,
        help="CPU threads of job processes, 0 = torch's default (ini repro_threads, default 1)",
    )
    group.addoption("--repro-timeout", default=None, help="seconds per run before it is killed (ini repro_timeout)")
    group.addoption(
        "--repro-parallel-runs",
        default=None,
        metavar="N|auto",
        help="runs of one check side by side: auto or N, 1 = one after the other (ini repro_parallel_runs)",
    )
    group.addoption(
        "--repro-isolation",
        default=None,
        choices=("auto", "fork", "spawn"),
        help="fork: warm worker forks a child per run; spawn: fresh interpreter per run",
    )
    group.addoption(
        "--repro-bundle-dir",
        default=None,
        metavar="DIR",
        help="write a self-describing bundle (.tar.gz) of every failing check, and of every reference --repro-regen "
        "wrote (for pytest-repro accept), into DIR, e.g. for CI artifacts",
    )
    group.addoption(
        "--repro-mlflow",
        nargs="?",
        const="",
        default=None,
        metavar="TRACKING_URI",
        help="log every check as an MLflow run (ini repro_mlflow); without a URI: MLFLOW_TRACKING_URI, "
        "else a local SQLite store in <rootdir>/mlruns. Needs pip install 'pytest-repro[mlflow]'",
    )
    group.addoption(
        "--repro-wandb",
        nargs="?",
        const="",
        default=None,
        metavar="PROJECT",
        help="log every check as a W&B run (ini repro_wandb), offline into <rootdir>/wandb unless WANDB_MODE=online; "
        "without a project: WANDB_PROJECT, else the project's name. Needs pip install 'pytest-repro[wandb]'",
    )
    for name, (help_text, default) in INI_OPTIONS.items():
        parser.addini(name, help_text, default=default)
    for name, (help_text, default_list) in INI_LISTS.items():
        parser.addini(name, help_text, type="linelist", default=default_list)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    # ``--repro-regen`` takes an optional value; keep it from swallowing a following test path.
    for i, arg in enumerate(args):
        if arg == "--repro-regen" and (i + 1 == len(args) or args[i + 1] not in ("all", "missing")):
            args[i] = "--repro-regen=all"


def _ci_is_set() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(tolerance=..., cross_env=..., runs=N, seed=S, deterministic=True, timeout=SECONDS, device=...): "
        "a reproducibility test, run with --repro (see pytest-repro's README)",
    )
    regen = config.getoption("repro_regen")
    if regen not in (None, "all", "missing"):
        raise pytest.UsageError(f"--repro-regen={regen}: expected all or missing (e.g. --repro-regen=missing)")
    if not (config.getoption("repro") or regen):
        return
    if regen and _ci_is_set() and not config.getoption("repro_regen_force"):
        raise pytest.UsageError(
            "pytest-repro refuses to regenerate references because the CI environment variable is set "
            f"(CI={os.environ.get('CI')!r}): references must change in a reviewed commit, not in a CI run. "
            "Regenerate locally with `pytest --repro --repro-regen`, or add --repro-regen-force to do it here anyway."
        )
    from ._publish.registry import start_up_problems
    from .session import ReproSession
    from .settings import base_settings

    problems = start_up_problems(config)  # every publisher's options: usable, and what they need importable
    if problems:
        raise pytest.UsageError(f"pytest-repro: {problems[0]}")

    ini = {name: config.getini(name) for name in (*INI_OPTIONS, *INI_LISTS)}
    cli = {name: config.getoption(name) for name in _CLI}
    cli["repro_regen"] = regen
    cli["repro_diagnose"] = config.getoption("repro_diagnose")
    try:
        settings = base_settings(ini, cli, Path(config.rootpath))
    except SettingsError as exc:
        raise pytest.UsageError(f"pytest-repro: {exc}") from None
    if settings.device.startswith("cuda"):
        from .session import DeviceUnavailableError, resolve_device

        try:
            resolve_device(settings.device)
        except DeviceUnavailableError as exc:
            raise pytest.UsageError(f"pytest-repro: {exc}") from None
    session = ReproSession(settings, Path(config.rootpath), ["pytest", *config.invocation_params.args])
    config.stash[session_key] = session
    if not hasattr(config, "workerinput"):  # the xdist controller cleans for its workers: said once
        from .scratch import clean_stale_scratch

        session.notes += clean_stale_scratch()
    config.pluginmanager.register(_OutcomeCollector(session), "repro-outcomes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if session_key in config.stash:
        return
    skip = pytest.mark.skip(reason=f"reproducibility test: run with `pytest --repro` (marked @pytest.mark.{MARKER})")
    marked = [item for item in items if item.get_closest_marker(MARKER) is not None]
    for item in marked:
        item.add_marker(skip)
    config.stash[skipped_key] = len(marked)


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    # Start the warm worker now: its imports (seconds) overlap with collection.
    repro = session.config.stash.get(session_key, None)
    xdist_controller = bool(getattr(session.config.option, "numprocesses", None)) and not hasattr(
        session.config, "workerinput"
    )
    if repro is not None and not session.config.option.collectonly and not xdist_controller:
        # With what earlier sessions learned jobs import (pytest's cache), and, once collected, what the
        # reproducible tests' modules import.
        repro.warm_up(getattr(session.config, "cache", None))
        from ._exec.preload import CollectionScan

        session.config.pluginmanager.register(CollectionScan(repro), "repro-preload-scan")


@pytest.fixture
def repro(request: pytest.FixtureRequest) -> Repro:
    """Run a training job reproducibly and check it against its stored reference.

    Example::

        @pytest.mark.reproducible(tolerance={"metrics": {"accuracy": {"atol": 0.01}}})
        def test_training(repro):
            result = repro.check(train, config={"lr": 1e-3, "steps": 8})
            assert result.metrics["accuracy"] > 0.5
    """
    from .fixture import Repro
    from .settings import apply_marker

    marker = request.node.get_closest_marker(MARKER)
    if marker is None:
        pytest.fail(f"the repro fixture needs the marker: decorate the test with @pytest.mark.{MARKER}", pytrace=False)
    session = request.config.stash.get(session_key, None)
    if session is None:
        pytest.skip("reproducibility test: run with `pytest --repro`")
    cli = {name: request.config.getoption(name) for name in _CLI}
    try:
        settings = apply_marker(session.settings, dict(marker.kwargs), cli, tuple(marker.args))
    except SettingsError as exc:
        problem = str(exc)
    else:
        fixture = Repro(session, settings, request.node)
        request.node.stash[repro_key] = fixture
        return fixture
    pytest.fail(f"{request.node.nodeid}: {problem}", pytrace=False)


def _phase_outcome(report: pytest.TestReport) -> tuple[str, str]:
    """Pytest's outcome of one phase and a one-line reason (the exception) when it did not pass."""
    if hasattr(report, "wasxfail"):
        return ("xfailed" if report.skipped else "xpassed"), ""
    if report.passed:
        return "passed", ""
    why = report.longreprtext.strip().splitlines()
    return report.outcome, (why[-1][:300] if why else "")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """After the test's last phase: let its checks commit or discard references and publish their outcomes."""
    fixture = item.stash.get(repro_key, None)
    failure = None
    if fixture is not None and call.when == "teardown":
        # What pytest reports: the final setup/call reports as logged (after every plugin's wrapper,
        # subtests included; see _OutcomeCollector.pytest_runtest_logreport).
        phases = item.config.stash[session_key].logged.pop(item.nodeid, {})
        outcome, why = phases.get("call", ("error", "the test did not run"))
        setup = phases.get("setup", ("passed", ""))
        if setup[0] != "passed":
            outcome, why = "error", setup[1]
        elif call.excinfo is not None:
            outcome, why = "error", call.excinfo.exconly()[:300]
        failure = fixture.finish(outcome, why)
        item.user_properties += fixture.properties()
    report: pytest.TestReport = yield
    if fixture is not None and call.when == "teardown":
        report.repro_outcomes = [o.to_dict() for o in fixture.outcomes]  # type: ignore[attr-defined]
        if failure is not None and report.passed:
            report.outcome = "failed"
            report.longrepr = failure
    return report


_RANK = {"passed": 0, "xpassed": 1, "skipped": 2, "xfailed": 3, "error": 4, "failed": 5}


class _OutcomeCollector:
    """Gathers every check's outcome from the test reports, which reach the main process also under xdist."""

    def __init__(self, session: ReproSession) -> None:
        self.session = session

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "teardown":
            self.session.outcomes += getattr(report, "repro_outcomes", None) or []
            return
        # The test's final setup/call outcome: the worst of all its logged reports (failed subtests included).
        phases = self.session.logged.setdefault(report.nodeid, {})
        outcome, previous = _phase_outcome(report), phases.get(report.when)
        if previous is None or _RANK.get(outcome[0], 5) > _RANK.get(previous[0], 5):
            phases[report.when] = outcome

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.session.not_collected.append(f"{report.nodeid or '.'} (collection error)")
        elif report.skipped:
            self.session.not_collected.append(f"{report.nodeid or '.'} (skipped while collecting)")

    @pytest.hookimpl(wrapper=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> Any:
        before = [i.nodeid for i in items if i.get_closest_marker(MARKER) is not None]
        result = yield
        after = {i.nodeid for i in items}
        dropped = [n for n in before if n not in after and n not in set(self.session.deselected_reproducible)]
        if dropped:
            self.session.not_collected.append(
                f"{len(dropped)} reproducible test(s) removed from the run by a plugin or conftest, e.g. {dropped[0]}"
            )
        return result

    @pytest.hookimpl(wrapper=True)
    def pytest_ignore_collect(self, collection_path: Path, config: pytest.Config) -> Any:
        ignored = yield
        if ignored and _could_hold_tests(collection_path, config):
            self.session.not_collected.append(f"{collection_path} (ignored)")
        return ignored


def _could_hold_tests(path: Path, config: pytest.Config) -> bool:
    """Whether an ignored path is one that would otherwise hold tests (not a venv, cache or excluded folder)."""
    import fnmatch

    if path.name == "__pycache__" or path.name.startswith("."):
        return False
    if path.is_dir():
        if (path / "pyvenv.cfg").exists() or (path / "conda-meta").is_dir():
            return False
        return not any(fnmatch.fnmatch(path.name, pattern) for pattern in config.getini("norecursedirs"))
    return path.suffix == ".py" and any(fnmatch.fnmatch(path.name, p) for p in config.getini("python_files"))


def pytest_deselected(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker(MARKER) is not None:
            repro = item.config.stash.get(session_key, None)
            if repro is not None:
                repro.deselected_reproducible.append(item.nodeid)


def pytest_collection_finish(session: pytest.Session) -> None:
    repro = session.config.stash.get(session_key, None)
    if repro is not None:
        repro.owned_nodeids += [i.nodeid for i in session.items if i.get_closest_marker(MARKER) is not None]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist controller: merge what each worker collected, for the unused-reference check."""
    repro = node.config.stash.get(session_key, None)
    output = getattr(node, "workeroutput", None) or {}
    if repro is not None and "repro_owned" in output:
        repro.owned_nodeids += list(output["repro_owned"])
        repro.deselected_reproducible += list(output["repro_deselected"])
        repro.not_collected += list(output.get("repro_not_collected", []))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    repro = config.stash.get(session_key, None)
    if repro is None:
        return
    repro.save_preloads(getattr(config, "cache", None))  # for the next session's warm-up
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None:  # xdist worker: hand what it saw to the controller
        workeroutput["repro_owned"] = sorted(set(repro.owned_nodeids))
        workeroutput["repro_deselected"] = sorted(set(repro.deselected_reproducible))
        workeroutput["repro_not_collected"] = sorted(set(repro.not_collected))
        return
    from ._publish.registry import publish_all  # unused references, bundles, trackers, then the reports

    session.exitstatus = publish_all(repro, config, session.exitstatus)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    session = config.stash.get(session_key, None)
    if session is None:
        skipped = config.stash.get(skipped_key, 0)
        if skipped:
            terminalreporter.write_line(
                f"reproducibility: {skipped} reproducibility test(s) skipped: run them with `pytest --repro`",
                yellow=True,
            )
        return
    from ._publish.report import write_summary

    write_summary(terminalreporter, session)


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(session_key, None)
    if session is not None:
        session.close()
        del config.stash[session_key]
