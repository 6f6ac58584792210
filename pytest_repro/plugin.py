"""pytest hooks only: options, the ``reproducible`` marker, the ``repro`` fixture, and the summary.

Nothing heavy is imported here: torch and friends load only when a reproducible test runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .settings import BY_FIELD, MARKER, OPTIONS, SettingsError

if TYPE_CHECKING:
    from .fixture import Repro
    from .session import ReproSession

session_key = pytest.StashKey["ReproSession"]()
repro_key = pytest.StashKey["Repro"]()


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    # Registered now, beside this module, so that their hooks run where this plugin's always ran: after the
    # project's conftests (which register later), not before them. pytest_configure keeps the one it needs.
    pluginmanager.register(SkipReproducible(), "repro-skip")
    pluginmanager.register(ReproPlugin(), "repro-session")
    group = parser.getgroup("repro", "reproducibility (pytest-repro)")
    for option in OPTIONS:  # the option table: settings.Settings
        if option.flag:
            kwargs = {"default": None, **option.flag_kwargs}
            group.addoption(option.flag, help=option.flag_help or option.help, **kwargs)
        if option.ini and isinstance(option.default, list):
            parser.addini(option.ini, option.help, type="linelist", default=option.default)
        elif option.ini:
            parser.addini(option.ini, option.help, default=option.default)


def _flags(config: pytest.Config) -> dict[str, Any]:
    """Every pytest-repro CLI flag's value by its destination (None when not given)."""
    return {o.dest: config.getoption(o.dest) for o in OPTIONS if o.dest}


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
        f"{MARKER}({', '.join(f'{o.marker}={o.marker_metavar}' for o in OPTIONS if o.marker)}): "
        "a reproducibility test, run with --repro (see pytest-repro's README)",
    )
    regen = config.getoption("repro_regen")
    try:
        BY_FIELD["regen"].parse(regen, "--repro-regen")
    except SettingsError as exc:
        raise pytest.UsageError(str(exc)) from None
    if not (config.getoption("repro") or regen):
        config.pluginmanager.unregister(name="repro-session")
        return
    config.pluginmanager.unregister(name="repro-skip")
    try:
        session = _start_session(config, regen)
    except BaseException:
        config.pluginmanager.unregister(name="repro-session")
        raise
    plugin = config.pluginmanager.get_plugin("repro-session")
    assert isinstance(plugin, ReproPlugin)
    plugin.session = session


def _start_session(config: pytest.Config, regen: str | None) -> ReproSession:
    """The run's settings and session (--repro given), or a usage error naming the bad option."""
    store = config.getoption("repro_calibrate_store")
    if store and config.getoption("repro_calibrate") is None:
        raise pytest.UsageError(
            "pytest-repro: --repro-calibrate-store stores the floor that --repro-calibrate N measures: give both "
            "(or run pytest-repro calibrate NODEID --store)"
        )
    if store and _ci_is_set() and not config.getoption("repro_regen_force"):
        raise pytest.UsageError(
            "pytest-repro refuses to store a noise floor beside a reference because the CI environment variable is "
            f"set (CI={os.environ.get('CI')!r}): it changes later verdicts, so it changes in a reviewed commit. "
            "Calibrate locally, or add --repro-regen-force to do it here anyway."
        )
    if regen and _ci_is_set() and not config.getoption("repro_regen_force"):
        raise pytest.UsageError(
            "pytest-repro refuses to regenerate references because the CI environment variable is set "
            f"(CI={os.environ.get('CI')!r}): references must change in a reviewed commit, not in a CI run. "
            "Regenerate locally with `pytest --repro --repro-regen`, or add --repro-regen-force to do it here anyway."
        )
    from .session import ReproSession
    from .settings import base_settings

    ini = {o.ini: config.getini(o.ini) for o in OPTIONS if o.ini}
    try:
        settings = base_settings(ini, _flags(config), Path(config.rootpath))
    except SettingsError as exc:
        raise pytest.UsageError(f"pytest-repro: {exc}") from None
    from ._publish.registry import start_up_problems

    problems = start_up_problems(settings, config)  # every publisher's options: usable, what they need importable
    if problems:
        raise pytest.UsageError(f"pytest-repro: {problems[0]}")
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
    return session


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
    try:
        settings = apply_marker(session.settings, dict(marker.kwargs), _flags(request.config), tuple(marker.args))
    except SettingsError as exc:
        problem = str(exc)
    else:
        fixture = Repro(session, settings, request.node)
        request.node.stash[repro_key] = fixture
        return fixture
    pytest.fail(f"{request.node.nodeid}: {problem}", pytrace=False)


class SkipReproducible:
    """Without --repro: reproducible tests are skipped, and the summary says how to run them."""

    def __init__(self) -> None:
        self.skipped = 0

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        skip = pytest.mark.skip(
            reason=f"reproducibility test: run with `pytest --repro` (marked @pytest.mark.{MARKER})"
        )
        marked = [item for item in items if item.get_closest_marker(MARKER) is not None]
        for item in marked:
            item.add_marker(skip)
        self.skipped = len(marked)

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        if self.skipped:
            terminalreporter.write_line(
                f"reproducibility: {self.skipped} reproducibility test(s) skipped: run them with `pytest --repro`",
                yellow=True,
            )


def _phase_outcome(report: pytest.TestReport) -> tuple[str, str]:
    """Pytest's outcome of one phase and a one-line reason (the exception) when it did not pass."""
    if hasattr(report, "wasxfail"):
        return ("xfailed" if report.skipped else "xpassed"), ""
    if report.passed:
        return "passed", ""
    why = report.longreprtext.strip().splitlines()
    return report.outcome, (why[-1][:300] if why else "")


_RANK = {"passed": 0, "xpassed": 1, "skipped": 2, "xfailed": 3, "error": 4, "failed": 5}


class ReproPlugin:
    """The session's hooks, with --repro: collection, each test's checks, xdist merging, publishing, summary."""

    def __init__(self) -> None:
        self._session: ReproSession | None = None

    @property
    def session(self) -> ReproSession:
        """The run's session (set by pytest_configure before any hook below runs)."""
        if self._session is None:
            raise RuntimeError("pytest-repro's session hooks ran before pytest_configure started the session")
        return self._session

    @session.setter
    def session(self, session: ReproSession) -> None:
        self._session = session

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        # Start the warm worker now: its imports (seconds) overlap with collection.
        config = session.config
        xdist_controller = bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")
        if not config.option.collectonly and not xdist_controller:
            # With what earlier sessions learned jobs import (pytest's cache), and, once collected, what the
            # reproducible tests' modules import.
            self.session.warm_up(getattr(config, "cache", None))
            from ._exec.preload import CollectionScan

            config.pluginmanager.register(CollectionScan(self.session), "repro-preload-scan")

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

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.session.not_collected.append(f"{report.nodeid or '.'} (collection error)")
        elif report.skipped:
            self.session.not_collected.append(f"{report.nodeid or '.'} (skipped while collecting)")

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        self.session.deselected_reproducible += [i.nodeid for i in items if i.get_closest_marker(MARKER) is not None]

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.session.owned_nodeids += [i.nodeid for i in session.items if i.get_closest_marker(MARKER) is not None]

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        """After the test's last phase: let its checks commit or discard references and publish their outcomes."""
        fixture = item.stash.get(repro_key, None)
        failure = None
        if fixture is not None and call.when == "teardown":
            # What pytest reports: the final setup/call reports as logged (after every plugin's wrapper,
            # subtests included; see pytest_runtest_logreport).
            phases = self.session.logged.pop(item.nodeid, {})
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

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Gather every check's outcome from the test reports, which reach the main process also under xdist."""
        if report.when == "teardown":
            self.session.outcomes += getattr(report, "repro_outcomes", None) or []
            return
        # The test's final setup/call outcome: the worst of all its logged reports (failed subtests included).
        phases = self.session.logged.setdefault(report.nodeid, {})
        outcome, previous = _phase_outcome(report), phases.get(report.when)
        if previous is None or _RANK.get(outcome[0], 5) > _RANK.get(previous[0], 5):
            phases[report.when] = outcome

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """xdist controller: merge what each worker collected, for the unused-reference check."""
        output = getattr(node, "workeroutput", None) or {}
        if "repro_owned" in output:
            self.session.owned_nodeids += list(output["repro_owned"])
            self.session.deselected_reproducible += list(output["repro_deselected"])
            self.session.not_collected += list(output.get("repro_not_collected", []))

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        config, ours = session.config, self.session
        ours.save_preloads(getattr(config, "cache", None))  # for the next session's warm-up
        ours.worker_lines()
        workeroutput = getattr(config, "workeroutput", None)
        if workeroutput is not None:  # xdist worker: hand what it saw to the controller
            workeroutput["repro_owned"] = sorted(set(ours.owned_nodeids))
            workeroutput["repro_deselected"] = sorted(set(ours.deselected_reproducible))
            workeroutput["repro_not_collected"] = sorted(set(ours.not_collected))
            return
        from ._publish.registry import publish_all  # unused references, bundles, trackers, then the reports

        session.exitstatus = publish_all(ours, config, session.exitstatus)

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        from ._publish.report import write_summary

        write_summary(terminalreporter, self.session)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self._session is not None:  # None: pytest_configure stopped with a usage error before starting it
            self._session.close()
            del config.stash[session_key]


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
