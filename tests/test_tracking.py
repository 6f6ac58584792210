"""MLflow tracking against a real local store: one run per check, drift artifacts, xdist, history, start-up errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import env_key

from pytest_repro import cli
from pytest_repro._publish import extras, trackers
from pytest_repro._publish import mlflow as tracking

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


@pytest.fixture(scope="session")
def mlflow_loaded() -> Any:
    """Import MLflow (and its SQL store) before pytester snapshots sys.modules, as heavy_modules does for torch."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("mlflow.store.tracking.sqlalchemy_store")
    pytest.importorskip("mlflow.tracking")
    return mlflow


@pytest.fixture
def project(mlflow_loaded: Any, userjobs: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester project in a git repository, with no MLflow settings from the environment."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "RUNNER_NAME"):
        monkeypatch.delenv(var, raising=False)
    userjobs.makefile(".toml", pyproject='[project]\nname = "demo-models"\n')
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "start"]):
        subprocess.run([*git, *args], cwd=userjobs.path, check=True, capture_output=True)
    return userjobs


def _client(path: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking.local_uri(path))


def _runs(path: Path) -> dict[str, Any]:
    client = _client(path)
    exp = client.get_experiment_by_name("demo-models")
    assert exp is not None
    return {r.info.run_id: r for r in client.search_runs([exp.experiment_id], max_results=1000)}


@pytest.mark.slow
def test_every_check_is_a_run_with_params_tags_metrics_and_drift(project: pytest.Pytester) -> None:
    project.makepyfile(test_many=TESTS)
    result = project.runpytest("--repro", "--repro-regen", "--repro-mlflow")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["reproducibility: MLflow: 2 run(s) logged to experiment 'demo-models' at sqlite:*"])
    assert (project.path / "mlruns" / "mlflow.db").is_file()
    # test_b's config changes, and the thread count: a failure with environment drift.
    project.makepyfile(test_many=TESTS.replace('"steps": 5}', '"steps": 5, "lr": 0.07}'))
    result = project.runpytest("--repro", "--repro-mlflow", "--repro-threads=2")
    result.assert_outcomes(passed=1, failed=1)

    runs = _runs(project.path)
    assert len(runs) == 4  # one per check per session
    latest = {}
    for run in sorted(runs.values(), key=lambda r: r.info.start_time):
        latest[run.data.tags["repro.nodeid"]] = run
    a, b = latest["test_many.py::test_a"], latest["test_many.py::test_b"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project.path, capture_output=True, text=True).stdout
    for run, verdict, status in ((a, "passed", "FINISHED"), (b, "differs", "FAILED")):
        tags = run.data.tags
        assert tags["repro.verdict"] == verdict and run.info.status == status
        assert tags["repro.environment_key"] == env_key() and tags["repro.device"] == "cpu"
        assert tags["repro.seed"].isdigit() and tags["repro.git_commit"] == commit.strip()
        assert tags["mlflow.source.git.commit"] == commit.strip()
        assert tags["repro.plugin_version"] and tags["repro.runner"]
    assert a.data.params == {"steps": "4"} and a.data.tags["repro.source.steps"] == "user:dict"
    assert b.data.params["steps"] == "5"

    client = _client(project.path)
    history = client.get_metric_history(a.info.run_id, "loss/run_1")
    assert [m.step for m in history] == [0, 1, 2, 3]
    assert [m.step for m in client.get_metric_history(a.info.run_id, "loss/reference")] == [0, 1, 2, 3]
    assert [m.step for m in client.get_metric_history(a.info.run_id, "loss/run_2")] == [0, 1, 2, 3]
    assert a.data.metrics["max_abs/losses"] == 0.0 and b.data.metrics["max_abs/losses"] > 0
    assert b.data.metrics["loss/run_1"] != b.data.metrics["loss/reference"]

    artifacts = {f.path for f in client.list_artifacts(b.info.run_id)}
    assert {"drift.txt", "outcome.json", "report.html", "reference"} <= artifacts
    assert {f.path for f in client.list_artifacts(b.info.run_id, "reference")} == {
        "reference/manifest.yaml",
        "reference/provenance.yaml",
    }
    drift = Path(client.download_artifacts(b.info.run_id, "drift.txt", str(project.path))).read_text()
    assert "config lr: reference (absent), this run 0.07 (user:dict)" in drift
    assert "numeric  env.OMP_NUM_THREADS: '1' -> '2'" in drift
    assert "OMP_NUM_THREADS" in a.data.tags["repro.drift"]  # a pass with drift carries it as well
    html = Path(client.download_artifacts(b.info.run_id, "report.html", str(project.path))).read_text()
    assert "test_many.py::test_b" in html and "<img" in html

    # History, read back through MlflowClient.
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["history", "test_many.py::test_b", "--rootdir", str(project.path)]) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("test_many.py::test_b: 2 run(s) in experiment 'demo-models' at sqlite:")
    assert lines[1].split()[:4] == ["started", "(UTC)", "verdict", "environment"]
    assert "WRITTEN" in lines[2] and "DIFFERS" in lines[3] and env_key() in lines[3]
    assert f"{b.data.metrics['loss/run_1']:.8g}" in lines[3]
    assert lines[-1].startswith("drifting since ") and "differs from the reference at step 1" in lines[-1]


@pytest.mark.slow
def test_two_xdist_workers_log_without_clashing(project: pytest.Pytester) -> None:
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
    result = project.runpytest("--repro", "--repro-regen", "-n", "2", "--repro-mlflow")
    result.assert_outcomes(passed=4)
    runs = _runs(project.path)
    assert sorted(r.data.tags["repro.nodeid"] for r in runs.values()) == [
        f"test_par.py::test_p[{n}]" for n in (2, 3, 4, 5)
    ]
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    assert sorted(r.data.params["steps"] for r in runs.values()) == ["2", "3", "4", "5"]


@pytest.mark.slow
def test_missing_mlflow_fails_at_start_up_with_the_install_command(
    userjobs: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    userjobs.makepyfile(test_many=TESTS)
    monkeypatch.setattr(extras, "installed", lambda module: module != "mlflow")
    result = userjobs.runpytest("--repro", "--repro-mlflow")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*pytest-repro: --repro-mlflow needs MLflow, which is not installed *; pip install *?mlflow?*"]
    )
    userjobs.makeini("[pytest]\nrepro_mlflow = true\n")
    result = userjobs.runpytest("--repro")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*pytest-repro: repro_mlflow = true needs MLflow*"])


@pytest.mark.slow
def test_a_bare_flag_before_a_path_and_an_unreachable_server(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.makepyfile(test_many=TESTS)
    result = project.runpytest("--repro", "--repro-mlflow", "test_many.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--repro-mlflow=test_many.py: 'test_many.py' is not a tracking URI*"])
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    result = project.runpytest("--repro", "--repro-regen", "--repro-mlflow=http://127.0.0.1:9")
    result.assert_outcomes(passed=2)
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR  # the tests passed; the tracking did not happen
    result.stdout.fnmatch_lines(["reproducibility: could not log to MLflow at http://127.0.0.1:9: *; check that*"])


def test_tracking_uri_resolution(tmp_path: Path) -> None:
    local = tracking.local_uri(tmp_path)
    assert local == "sqlite:///" + str(tmp_path.resolve() / "mlruns" / "mlflow.db")
    assert tracking.tracking_uri(_switch("mlflow", None, ""), tmp_path, {}) == (None, "repro_mlflow = ")
    assert tracking.tracking_uri(_switch("mlflow", None, "false"), tmp_path, {})[0] is None
    assert tracking.tracking_uri(_switch("mlflow", None, "true"), tmp_path, {})[0] == local
    assert tracking.tracking_uri(_switch("mlflow", "", ""), tmp_path, {})[0] == local
    assert (
        tracking.tracking_uri(_switch("mlflow", "", ""), tmp_path, {"MLFLOW_TRACKING_URI": "http://x:5000"})[0]
        == "http://x:5000"
    )
    assert tracking.tracking_uri(_switch("mlflow", "http://y:5000", "true"), tmp_path, {})[0] == "http://y:5000"
    assert tracking.tracking_uri(_switch("mlflow", "off", "true"), tmp_path, {})[0] is None
    assert tracking.uri_problem("tests/", "--repro-mlflow=tests/") is not None
    assert trackers.experiment_name(tmp_path, {"MLFLOW_EXPERIMENT_NAME": "exp"}) == "exp"
    assert trackers.experiment_name(tmp_path, {}) == tmp_path.resolve().name


def test_history_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["history", "t.py::test_x", "--rootdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pytest-repro history: no MLflow store at {tmp_path / 'mlruns' / 'mlflow.db'}; ")
    assert err.count("\n") == 1


def test_plugin_import_does_not_import_mlflow() -> None:
    code = (
        "import sys, pytest_repro.plugin, pytest_repro._publish.registry, pytest_repro._publish.history\n"
        "import pytest_repro._publish.bundle.build, pytest_repro._publish.bundle.verify\n"
        "heavy = [m for m in ('mlflow', 'sqlalchemy', 'torch') if m in sys.modules]\n"
        "print(heavy)\nsys.exit(1 if heavy else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_metrics_of_a_statistical_check() -> None:
    outcome = {
        "curves": {"seed 1": [2.0, 1.0], "seed 2": [2.2, None], "reference": [2.1, 1.1]},
        "max_abs": {"losses": 0.1, "weights": float("nan")},
        "seconds": [0.5, 0.6],
        "statistical": {
            "metrics": {"score": [1.0, 3.0]},
            "losses": [[2.0, 1.0], [2.2, 1.2]],
            "reference": {"metrics": {"score": [2.0, 2.0]}, "losses": [[2.1, 1.1]]},
        },
    }
    got = {(key, step): value for key, value, step in trackers.check_metrics(outcome)}
    assert got[("loss/seed_1", 1)] == 1.0 and ("loss/seed_2", 1) not in got
    assert got[("loss/reference", 0)] == 2.1 and got[("run_seconds", 2)] == 0.6
    assert got[("stat/mean/score", 0)] == 2.0 and got[("stat/reference_mean/score", 0)] == 2.0
    assert got[("loss/mean", 1)] == pytest.approx(1.1) and got[("loss/reference_mean", 0)] == 2.1
    assert got[("max_abs/losses", 0)] == 0.1 and ("max_abs/weights", 0) in got


def _switch(name: str, flag: str | None, ini: str) -> Any:
    """The option as the table reads it from a flag value (None: not given) and an ini value."""
    from pytest_repro.settings import OPTIONS, base_settings

    defaults = {o.ini: o.default for o in OPTIONS if o.ini}
    return getattr(base_settings({**defaults, f"repro_{name}": ini}, {f"repro_{name}": flag}, Path("/r")), name)
