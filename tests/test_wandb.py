"""W&B tracking, read back from the offline run files: one run per check, pass and fail, xdist, start-up errors."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import env_key
from hypothesis import given, settings
from hypothesis import strategies as st
from wandb_records import OfflineRun, read_runs

from pytest_repro._publish import wandb as wandb_tracking

TESTS = """
import pytest
from userjobs import train

@pytest.mark.reproducible
def test_a(repro):
    repro.check(train, config={"steps": 4})

@pytest.mark.reproducible
def test_b(repro):
    repro.check(train, config={"steps": 5})
"""
_ENV = ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_DISABLED", "WANDB_API_KEY", "RUNNER_NAME")


@pytest.fixture(scope="session")
def wandb_loaded() -> Any:
    """Import wandb before pytester snapshots sys.modules, as heavy_modules does for torch."""
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # read when wandb's telemetry is first set up
    return pytest.importorskip("wandb")


@pytest.fixture
def project(wandb_loaded: Any, userjobs: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester project in a git repository, with no W&B settings from the environment."""
    for var in _ENV:
        monkeypatch.delenv(var, raising=False)
    userjobs.makefile(".toml", pyproject='[project]\nname = "demo-models"\n')
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "start"]):
        subprocess.run([*git, *args], cwd=userjobs.path, check=True, capture_output=True)
    return userjobs


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Fail any network connection this process attempts (Unix sockets, wandb's service link, stay allowed)."""
    attempts: list[Any] = []
    connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        if self.family != socket.AF_UNIX:
            attempts.append(address)
            raise OSError(f"test: network connection to {address!r} refused")
        return connect(self, address)

    def resolve(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args[:2])
        raise socket.gaierror(f"test: name lookup of {args[:2]!r} refused")

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    return attempts


def _latest(runs: list[OfflineRun]) -> dict[str, OfflineRun]:
    return {r.run.display_name: r for r in runs}  # oldest first: later runs of a check win


@pytest.mark.slow
def test_every_check_is_an_offline_run_with_config_summary_losses_and_artifact(
    project: pytest.Pytester, no_network: list[Any]
) -> None:
    project.makepyfile(test_many=TESTS)
    result = project.runpytest("--repro", "--repro-regen", "--repro-wandb")
    result.assert_outcomes(passed=2)
    wandb_dir = project.path / "wandb"
    result.stdout.fnmatch_lines(
        [
            f"reproducibility: W&B: 2 run(s) logged offline to project 'demo-models' in {wandb_dir} "
            f"(* ms/check, plus * s to import wandb and start its service); upload them with: wandb sync {wandb_dir}"
        ]
    )
    # test_b's config changes, and the thread count: a failure with environment drift.
    project.makepyfile(test_many=TESTS.replace('"steps": 5}', '"steps": 5, "lr": 0.07}'))
    result = project.runpytest("--repro", "--repro-wandb", "--repro-threads=2", "--repro-bundle-dir=bundles")
    result.assert_outcomes(passed=1, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert no_network == []

    runs = read_runs(wandb_dir)
    assert len(runs) == 4  # one per check per session
    # The command the summary gives: wandb's own CLI finds the 4 runs to upload (a dry run uploads nothing).
    env = {**os.environ, "WANDB_ERROR_REPORTING": "false"}
    cmd = [sys.executable, "-m", "wandb", "sync", "--dry-run", str(wandb_dir)]
    sync = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert "Would sync 4 run(s)" in sync.stdout + sync.stderr, sync.stdout + sync.stderr
    latest = _latest(runs)
    a, b = latest["test_many.py::test_a"], latest["test_many.py::test_b"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project.path, capture_output=True, text=True).stdout
    for run, verdict, code in ((a, "passed", 0), (b, "differs", 1)):
        assert run.run.project == "demo-models" and run.run.job_type == "repro-check"
        assert run.exit_code == code
        s = run.summary
        assert s["repro.verdict"] == verdict and s["repro.environment_key"] == env_key()
        assert s["repro.device"] == "cpu" and isinstance(s["repro.seed"], int)
        assert s["repro.git_commit"] == commit.strip() and s["repro.plugin_version"] and s["repro.runner"]
        assert set(run.run.tags) >= {f"verdict:{verdict}", f"env:{env_key()}", "device:cpu", f"seed:{s['repro.seed']}"}
    assert "drift" in a.run.tags  # OMP_NUM_THREADS 1 -> 2: a pass with drift carries it
    assert any("OMP_NUM_THREADS" in line for line in a.summary["repro.drift"])
    assert any("config lr" in line for line in b.summary["repro.context"])  # what changed, for the failure
    assert len({r.run.run_group for r in runs}) == 2  # one group per session
    assert a.config["steps"] == 4 and a.config["repro.sources"] == {"steps": "user:dict"}
    assert a.config["repro.params_from"] == "this run"
    assert b.config["steps"] == 5 and b.config["lr"] == 0.07 and b.config["repro.sources"]["lr"] == "user:dict"

    # The loss trace of every run and of the reference, as step metrics.
    assert [step for step, _ in a.series("loss/run_1")] == [0, 1, 2, 3]
    assert a.series("loss/run_1") == a.series("loss/run_2") == a.series("loss/reference")
    assert [step for step, _ in b.series("loss/reference")] == [0, 1, 2, 3, 4]
    assert b.series("loss/run_1")[0] == b.series("loss/reference")[0]  # lr changes the first update, not loss 0
    assert b.series("loss/run_1")[1] != b.series("loss/reference")[1]
    assert a.summary["max_abs/losses"] == 0.0 and b.summary["max_abs/losses"] > 0
    assert len(b.summary["repro.run_seconds"]) == 2

    # The reference and the outcome as an artifact, its files in the run's own folder.
    (artifact,) = b.artifacts
    assert artifact.type == "repro-check" and artifact.name.startswith("repro-test_many.py__test_b-")
    assert json.loads(artifact.metadata)["verdict"] == "differs"
    entries = {e.path: Path(e.local_path) for e in artifact.manifest.contents}
    assert {"drift.txt", "outcome.json", "reference/record.json", "reference/manifest.yaml"} <= set(entries)
    assert {"reference/provenance.yaml", "reference/weights.safetensors"} <= set(entries)
    assert all(p.is_file() and b.folder in p.parents for p in entries.values())
    drift = entries["drift.txt"].read_text()
    assert "config lr: reference (absent), this run 0.07 (user:dict)" in drift
    assert "numeric  env.OMP_NUM_THREADS: '1' -> '2'" in drift
    assert b.run.notes == drift
    stored = next((project.path / "reference_outputs").rglob("test_b/*/record.json"))
    assert entries["reference/record.json"].read_bytes() == stored.read_bytes()
    (bundle,) = (project.path / "bundles").iterdir()  # the failing check's bundle travels with its run
    assert entries[bundle.name].read_bytes() == bundle.read_bytes()
    assert not any(e.path.endswith(".tar.gz") for e in a.artifacts[0].manifest.contents)


@pytest.mark.slow
def test_no_network_connection_from_any_process(project: pytest.Pytester) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed: cannot watch wandb's service process")
    project.makepyfile(test_many=TESTS)
    trace = project.path / "connect.trace"
    cmd = [strace, "-f", "-qq", "-e", "trace=connect,sendto,sendmmsg", "-o", str(trace)]
    cmd += [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--repro", "--repro-regen", "--repro-wandb"]
    env = {k: v for k, v in os.environ.items() if k not in _ENV and k != "WANDB_ERROR_REPORTING"}
    proc = subprocess.run(cmd, cwd=project.path, capture_output=True, text=True, timeout=300, env=env)
    if "PTRACE" in proc.stderr and proc.returncode != 0:
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "W&B: 2 run(s) logged offline" in proc.stdout
    lines = trace.read_text().splitlines()
    assert any("AF_UNIX" in line for line in lines)  # the trace did see wandb's own socket
    assert [line for line in lines if "AF_INET" in line] == []


@pytest.mark.slow
def test_two_xdist_workers_leave_the_logging_to_the_controller(project: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    project.makepyfile(
        test_par="""
        import pytest
        from userjobs import train

        @pytest.mark.reproducible
        @pytest.mark.parametrize("steps", [2, 3, 4, 5])
        def test_p(repro, steps):
            repro.check(train, config={"steps": steps})
        """
    )
    result = project.runpytest("--repro", "--repro-regen", "-n", "2", "--repro-wandb")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["reproducibility: W&B: 4 run(s) logged offline to project 'demo-models' in *"])
    runs = read_runs(project.path / "wandb")
    # Exactly one run per check (a worker logging as well would double them), all from one logging session.
    assert sorted(r.run.display_name for r in runs) == [f"test_par.py::test_p[{n}]" for n in (2, 3, 4, 5)]
    assert len({r.run.run_group for r in runs}) == 1
    assert {r.exit_code for r in runs} == {0}
    assert sorted(r.config["steps"] for r in runs) == [2, 3, 4, 5]


@pytest.mark.slow
def test_wandb_init_raising_is_an_error_after_the_results(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, wandb_loaded: Any
) -> None:
    project.makepyfile(test_many=TESTS)
    real_init, calls = wandb_loaded.init, []

    def init(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["name"])
        if len(calls) == 2:
            raise wandb_loaded.errors.CommError("the service went away")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb_loaded, "init", init)
    result = project.runpytest("--repro", "--repro-regen", "--repro-wandb")
    result.assert_outcomes(passed=2)
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR  # the tests passed; the logging did not all happen
    result.stdout.fnmatch_lines(
        [
            "reproducibility: could not log to W&B project 'demo-models' (offline): CommError: the service went away; "
            f"1 of 2 check(s) were logged before it failed ({project.path / 'wandb'}); check that * can be written*"
        ]
    )
    assert [r.run.display_name for r in read_runs(project.path / "wandb")] == ["test_many.py::test_a"]


@pytest.mark.slow
def test_a_folder_wandb_cannot_create_is_an_error_naming_where_the_runs_went(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.makepyfile(test_many=TESTS)
    (project.path / "afile").write_text("")
    monkeypatch.setenv("WANDB_DIR", str(project.path / "afile" / "sub"))  # wandb falls back to the temp dir
    result = project.runpytest("--repro", "--repro-regen", "--repro-wandb=other-project")
    result.assert_outcomes(passed=2)
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR
    result.stdout.fnmatch_lines(
        [f"reproducibility: W&B: 2 run(s) were logged, but into * instead of {project.path / 'afile' / 'sub'}/wandb*"]
    )


def test_missing_wandb_fails_at_start_up_naming_the_extra(
    userjobs: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    userjobs.makepyfile(test_many=TESTS)
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an uninstalled package looks like to find_spec/import
    result = userjobs.runpytest("--repro", "--repro-wandb")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*pytest-repro: --repro-wandb needs wandb, which is not installed *; pip install *?wandb?*"]
    )
    userjobs.makeini("[pytest]\nrepro_wandb = true\n")
    result = userjobs.runpytest("--repro")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*pytest-repro: repro_wandb = true needs wandb*"])


def test_start_up_errors_a_path_taken_as_project_a_bad_name_and_disabled_wandb(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.makepyfile(test_many=TESTS)
    result = project.runpytest("--repro", "--repro-wandb", "test_many.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--repro-wandb=test_many.py: 'test_many.py' looks like a test path*"])
    result = project.runpytest("--repro", "--repro-wandb=team/project")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--repro-wandb=team/project: 'team/project' is not a W&B project name*"])
    monkeypatch.setenv("WANDB_MODE", "disabled")
    result = project.runpytest("--repro", "--repro-wandb")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--repro-wandb: WANDB_MODE=disabled turns W&B off, so no check would be logged*"])
    assert not (project.path / "wandb").exists()


def test_project_and_mode_resolution(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "my-models"\n')
    assert wandb_tracking.wandb_project(_switch("wandb", None, ""), tmp_path, {}) == (None, "repro_wandb = ")
    assert wandb_tracking.wandb_project(_switch("wandb", None, "off"), tmp_path, {})[0] is None
    assert wandb_tracking.wandb_project(_switch("wandb", None, "true"), tmp_path, {})[0] == "my-models"
    assert wandb_tracking.wandb_project(_switch("wandb", "", ""), tmp_path, {}) == ("my-models", "--repro-wandb")
    assert wandb_tracking.wandb_project(_switch("wandb", "", ""), tmp_path, {"WANDB_PROJECT": "p"}) == (
        "p",
        "WANDB_PROJECT",
    )
    assert wandb_tracking.wandb_project(_switch("wandb", "mine", "true"), tmp_path, {})[0] == "mine"
    assert wandb_tracking.wandb_project(_switch("wandb", "off", "true"), tmp_path, {})[0] is None
    assert wandb_tracking.wandb_project(_switch("wandb", None, "team-runs"), tmp_path, {})[0] == "team-runs"
    assert wandb_tracking.run_mode({}) == "offline"
    assert wandb_tracking.run_mode({"WANDB_MODE": "dryrun"}) == "offline"
    assert wandb_tracking.run_mode({"WANDB_MODE": "online"}) == "online"
    assert wandb_tracking.run_mode({"WANDB_DISABLED": "true"}) == "disabled"
    assert wandb_tracking.run_dir(tmp_path, {}) == tmp_path.resolve() / "wandb"
    assert wandb_tracking.run_dir(tmp_path, {"WANDB_DIR": str(tmp_path / "x")}) == tmp_path.resolve() / "x" / "wandb"
    assert wandb_tracking.project_problem("my-models", "--repro-wandb=my-models", [], {}) is None
    problem = wandb_tracking.project_problem("p", "--repro-wandb", [], {"WANDB_MODE": "offline", "WANDB_DISABLED": "1"})
    assert problem is not None and "WANDB_DISABLED=1 turns W&B off" in problem
    assert wandb_tracking.project_problem("tests", "--repro-wandb=tests", ["--repro-wandb=tests"], {}) is None


@settings(deadline=None)
@given(st.text(st.characters() | st.sampled_from("/\\#?%:\r\n ."), min_size=1, max_size=140))
def test_a_project_name_is_refused_exactly_when_wandb_refuses_it(wandb_loaded: Any, name: str) -> None:
    try:
        wandb_loaded.Settings(project=name)
    except Exception:
        refused = True
    else:
        refused = False
    assert (wandb_tracking.project_problem(name, "--repro-wandb", [], {}) is not None) == refused


@settings(deadline=None)
@given(st.text(min_size=1, max_size=300), st.none() | st.text(max_size=300))
def test_every_check_gets_an_artifact_name_wandb_accepts(wandb_loaded: Any, nodeid: str, name: str | None) -> None:
    from wandb.sdk.artifacts._validators import validate_artifact_name

    got = wandb_tracking._artifact_name({"nodeid": nodeid, "name": name})
    assert validate_artifact_name(got) == got and len(got) <= 128
    assert got != wandb_tracking._artifact_name({"nodeid": nodeid + "x", "name": name})


def test_plugin_import_does_not_import_wandb() -> None:
    code = (
        "import sys, pytest_repro.plugin, pytest_repro._publish.registry, pytest_repro._publish.wandb\n"
        "heavy = [m for m in ('wandb', 'torch') if m in sys.modules]\n"
        "print(heavy)\nsys.exit(1 if heavy else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_session_without_the_option_never_imports_wandb(userjobs: pytest.Pytester) -> None:
    userjobs.makepyfile(test_many=TESTS)
    userjobs.makeconftest(
        "import sys\n\ndef pytest_unconfigure(config):\n    print('wandb imported:', 'wandb' in sys.modules)\n"
    )
    result = userjobs.runpytest_subprocess("--repro", "--repro-regen")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["wandb imported: False"])


def _switch(name: str, flag: str | None, ini: str) -> Any:
    """The option as the table reads it from a flag value (None: not given) and an ini value."""
    from pytest_repro.settings import OPTIONS, base_settings

    defaults = {o.ini: o.default for o in OPTIONS if o.ini}
    return getattr(base_settings({**defaults, f"repro_{name}": ini}, {f"repro_{name}": flag}, Path("/r")), name)
