"""Noise-aware verdicts end to end: real H200 references on this CPU, real changes, default-mode nondeterminism."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CUDA_REFS = Path(__file__).parent / "data" / "cuda-refs.tgz"  # recorded on an H200 (../shared/gpu-evidence)


def gpu_project(pytester: pytest.Pytester) -> None:
    """This repo's reproducibility tests in a project whose only references are the H200's."""
    shutil.copytree(REPO / "fixtures", pytester.path / "fixtures")
    (pytester.path / "reference_outputs").mkdir()
    with tarfile.open(CUDA_REFS) as tar:
        tar.extractall(pytester.path / "reference_outputs", filter="data")
    (pytester.path / "tests").mkdir()
    shutil.copy(REPO / "tests" / "test_reproducible.py", pytester.path / "tests" / "test_reproducible.py")
    pytester.makeini("[pytest]\nrepro_timeout = 300\n")


def test_the_h200_references_pass_cross_env_under_the_measured_floor(
    heavy_modules: None, pytester: pytest.Pytester
) -> None:
    gpu_project(pytester)
    # a subprocess: this process has imported the repo's own tests/test_reproducible.py already
    result = pytester.runpytest_subprocess("--repro", "tests", "-v", "--repro-report=r.json", "--repro-html=r.html")
    out = result.stdout.str()
    assert result.ret == 0, out
    report = json.loads((pytester.path / "r.json").read_text())
    checks = [t for t in report["tests"] if not (t["name"] or "").startswith("resume@")]
    assert len(checks) == 6 and {t["verdict"] for t in checks} == {"passed-cross-env"}, out
    for t in checks:
        assert t["compared_with"] == "cuda-sm90" and t["env_key"].startswith("cpu-")
        n = t["noise"]
        # another kind of device: its generators draw other dropout masks, so both parts are measured
        assert n["floor"]["parts"] == ["rounding", "random streams"] and n["floor"]["runs"] == 2
        assert 0 < n["largest"]["ratio"] <= n["k"] == 6 and n["first_beyond"] is None
        assert n["floor"]["seconds"] > 0 and len(n["floor"]["losses"]) == 32
        assert all(x > 0 for x in n["floor"]["losses"])
        assert n["resolution"][0].startswith("eval_loss above ")
    page = (pytester.path / "r.html").read_text()
    assert page.count("resolution: this comparison detects a change of eval_loss above") == 6
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO / "pytest_repro" / "report.schema.json").read_text())
    jsonschema.validate(report, schema)
    result.stdout.fnmatch_lines(
        [
            "CROSS-ENV*test_lora_is_reproducible (cpu-*): no reference for environment*compared with the one "
            "recorded in 'cuda-sm90' under the cross-environment tolerance (noise-aware: within 6 x the measured "
            "noise floor (2 perturbed runs)), not bitwise; largest difference * x the noise floor, *; detects a "
            "change of eval_loss above *, perplexity above *, the step-1 loss above *",
            "*noise floor: rounding + random streams, 2 perturbed runs (*s), measured in this environment",
            "*resolution: this comparison detects a change of eval_loss above *",
        ]
    )

    # A real change of the job (a 50 % larger learning rate) moves it clearly beyond the noise
    config = pytester.path / "fixtures" / "tiny_lora.yaml"
    config.write_text(config.read_text().replace("lr: 0.002", "lr: 0.003"))
    result = pytester.runpytest_subprocess("--repro", "tests", "-k", "test_lora_is_reproducible")
    assert result.ret == 1
    result.stdout.fnmatch_lines(
        [
            "*compared with the one recorded in 'cuda-sm90' under the cross-environment tolerance (noise-aware*"
            "not bitwise, and it differs.",
            "The config differs from the reference's (see below): that change, not only the environment, may be why.",
            "*config train.lr: reference 0.002, this run 0.003*",
            "What differs:",
            "at step *: differs by * = * x the noise floor * (limit 6 x)",
            "* of * compared values are beyond 6 x their noise floor; the largest is *",
            "noise floor: rounding + random streams, 2 perturbed runs*",
            "Fix: if the change is intended, record a reference for this environment with: pytest --repro "
            "--repro-regen=missing tests/test_reproducible.py::test_lora_is_reproducible",
            "otherwise undo it.",
        ]
    )
    result.stdout.fnmatch_lines(["DIFFERS*test_lora_is_reproducible (cpu-*): differs from the cuda-sm90 reference*"])


NONDETERMINISTIC = """
import os

import pytest
import torch
from pytest_repro import statistical

def train(ctx):
    torch.manual_seed(ctx.seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    x = torch.randn(64, 8)
    y = x[:, :1] * 2 - x[:, 1:2]
    opt = torch.optim.Adam(model.parameters(), lr=ctx.config["lr"])
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        # an op made nondeterministic on purpose: like float atomics, its result depends on the order
        # of accumulation, which changes from run to run (here: a last-bits change drawn from the OS)
        for p in model.parameters():
            jitter = (int.from_bytes(os.urandom(2), "little") - 32768) / 32768
            p.grad.mul_(1 + jitter * 2e-7)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        err = float(torch.nn.functional.mse_loss(model(x), y))
    return {"losses": losses, "weights": dict(model.state_dict()), "metrics": {"eval_mse": err}}

@pytest.mark.reproducible(tolerance=TOLERANCE)
def test_nondeterministic(repro):
    repro.check(train, config={"lr": LR})
"""


def nondeterministic(lr: float, tolerance: str = '"noise"') -> str:
    return NONDETERMINISTIC.replace("LR", str(lr)).replace("TOLERANCE", tolerance)


def test_default_mode_nondeterminism_passes_under_its_floor_and_a_real_change_fails(
    heavy_modules: None, pytester: pytest.Pytester
) -> None:
    pytester.makeini("[pytest]\nrepro_timeout = 120\n")
    pytester.makepyfile(test_nd=nondeterministic(0.01))
    bitwise = pytester.runpytest("--repro", "--repro-regen", "-p", "no:cacheprovider")
    bitwise.assert_outcomes(passed=1)  # tolerance noise: runs that differ are not DIVERGED
    result = pytester.runpytest("--repro", "--repro-report=r.json")
    result.assert_outcomes(passed=1)
    check = json.loads((pytester.path / "r.json").read_text())["tests"][0]
    assert check["verdict"] == "passed"
    assert "run-to-run" in check["noise"]["floor"]["parts"]  # the runs' own spread is part of the floor
    assert "random streams" not in check["noise"]["floor"]["parts"]  # same kind of device: rounding only
    assert check["max_abs"]["losses"] > 0, "the runs must really differ, or this test proves nothing"
    assert check["noise"]["largest"]["ratio"] <= 6

    pytester.makepyfile(test_nd=nondeterministic(0.012))  # a 20 % larger learning rate
    result = pytester.runpytest("--repro")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_nondeterministic differs from its reference *",
            "*config lr: reference 0.01, this run 0.012*",
            "* x the noise floor * (limit 6 x)",
            "If the change is intended, regenerate the reference with: pytest --repro --repro-regen *",
        ]
    )


def test_statistical_same_seed_takes_its_margins_from_the_natural_spread(
    heavy_modules: None, pytester: pytest.Pytester
) -> None:
    pytester.makeini("[pytest]\nrepro_timeout = 120\n")
    same_seed = "statistical(seeds=4, same_seed=True)"  # no margin=: k x the measured noise floor
    pytester.makepyfile(test_nd=nondeterministic(0.01, same_seed))
    pytester.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    result = pytester.runpytest("--repro", "-v", "--repro-report=r.json")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*eval_mse: reference mean * (n=4), this run mean * (n=4), diff *, margin ±* -> equivalent*",
            "*margins: 6 x the noise floor of each value (rounding + run-to-run, 2 perturbed runs*",
        ]
    )
    pytester.makepyfile(test_nd=nondeterministic(0.012, same_seed))
    result = pytester.runpytest("--repro")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*eval_mse: *-> NOT equivalent*"])


DROPOUT_JOB = """
import pytest
import torch

def train(ctx):
    torch.manual_seed(ctx.seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.2), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    x = torch.randn(64, 8)
    y = x[:, :1] * 2 - x[:, 1:2]
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(12):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        err = float(torch.nn.functional.mse_loss(model(x), y))
    return {"losses": losses, "weights": dict(model.state_dict()), "metrics": {"eval_mse": err}}

@pytest.mark.reproducible
def test_dropout(repro):
    repro.check(train)
"""


def test_calibrate_stores_the_floor_and_a_later_cross_env_check_uses_it(
    heavy_modules: None, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    pytester.makeini("[pytest]\nrepro_timeout = 120\n")
    pytester.makepyfile(test_drop=DROPOUT_JOB)
    pytester.makepyfile(plain_case="def test_plain():\n    pass\n")  # collected only when named
    alone = pytester.runpytest("--repro", "--repro-calibrate-store")
    assert alone.ret == pytest.ExitCode.USAGE_ERROR
    alone.stderr.fnmatch_lines(["*--repro-calibrate-store stores the floor that --repro-calibrate N measures*"])
    monkeypatch.setenv("CI", "true")
    in_ci = pytester.runpytest("--repro", "--repro-calibrate=2", "--repro-calibrate-store")
    assert in_ci.ret == pytest.ExitCode.USAGE_ERROR
    in_ci.stderr.fnmatch_lines(["*refuses to store a noise floor beside a reference because the CI environment*"])
    monkeypatch.delenv("CI")
    pytester.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    (here,) = (pytester.path / "reference_outputs" / "test_drop" / "test_dropout").iterdir()

    cli = [sys.executable, "-m", "pytest_repro.cli", "calibrate", "test_drop.py::test_dropout"]
    nothing = pytester.run(sys.executable, "-m", "pytest_repro.cli", "calibrate", "plain_case.py::test_plain")
    assert nothing.ret == 1
    nothing.stderr.fnmatch_lines(["pytest-repro calibrate: no reproducible check ran, so nothing was calibrated*"])
    refused = pytester.run(*cli, "--runs", "1")
    assert refused.ret == 2
    refused.stderr.fnmatch_lines(["pytest-repro calibrate: --runs 1: a noise floor needs at least 2 perturbed runs*"])
    done = pytester.run(*cli, "--runs", "2", "--store")
    assert done.ret == 0, done.stdout.str()
    done.stdout.fnmatch_lines(
        [
            "noise floor of test_drop.py::test_dropout: rounding + random streams, 2 perturbed runs (*s)",
            "  loss step 0 *",
            "  metrics?'eval_mse'? *",
            "  explicit tolerances this floor resolves: {'losses': {'atol': *}, 'metrics': {'eval_mse': {'atol': *}}}*",
            f"  stored: {here / 'noise_floor.json'}",
        ]
    )
    stored = json.loads((here / "noise_floor.json").read_text())
    assert stored["runs"] == 2 and len(stored["losses"]) == 12 and stored["metrics"]["eval_mse"] > 0

    # The same reference, seen from another environment: its floor is used beside the one measured there
    other = here.with_name("cuda-sm90")
    here.rename(other)
    result = pytester.runpytest("--repro", "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "CROSS-ENV*test_drop.py::test_dropout*compared with the one recorded in 'cuda-sm90'*",
            "*noise floor: rounding + random streams, 2 perturbed runs (*s), measured in this environment, and the "
            "one stored beside the cuda-sm90 reference (2 runs): the larger of the two per value",
        ]
    )
    stored["metrics"]["eval_mse"] = float("nan")  # crafted: never trusted
    (other / "noise_floor.json").write_text(json.dumps(stored).replace("NaN", "-1"))
    result = pytester.runpytest("--repro")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*the noise floor stored beside its reference, reference_outputs/test_drop/test_dropout/cuda-sm90/"
            "noise_floor.json, cannot be used: it is not a noise floor (metrics?'eval_mse'?: expected a finite "
            "number >= 0, got -1*",
            "Fix: delete reference_outputs/test_drop/test_dropout/cuda-sm90/noise_floor.json (then, on the machine "
            "that recorded the reference, measure and store it again with: pytest-repro calibrate "
            "test_drop.py::test_dropout --store).",
        ]
    )

    # A regeneration that rewrites the reference drops the stored floor: it no longer describes it
    other.rename(here)
    pytester.makepyfile(test_drop=DROPOUT_JOB.replace("lr=0.01", "lr=0.02"))
    pytester.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    assert not (here / "noise_floor.json").exists()


PICKY_JOB = """
import pytest
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

def train(ctx):
    torch.manual_seed(ctx.seed)
    model = torch.nn.Linear(4, 1)
    x = torch.randn(16, 4)
    loss = model(x).pow(2).mean()
    if _get_current_dispatch_mode() is not None:  # like a job that cannot run under a dispatch mode
        raise RuntimeError("this job refuses dispatch modes")
    return {"losses": [loss.item()], "weights": dict(model.state_dict())}

@pytest.mark.reproducible
def test_picky(repro):
    repro.check(train)
"""


def test_a_failing_noise_floor_run_says_so_and_how_to_do_without(
    heavy_modules: None, pytester: pytest.Pytester
) -> None:
    pytester.makeini("[pytest]\nrepro_timeout = 120\n")
    pytester.makepyfile(test_picky=PICKY_JOB)
    pytester.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    (here,) = (pytester.path / "reference_outputs" / "test_picky" / "test_picky").iterdir()
    meta = json.loads((here / "record.json").read_text())
    meta["meta"]["device"] = "cuda"  # another kind of device: the floor perturbs the random streams too
    (here / "record.json").write_text(json.dumps(meta))
    here.rename(here.with_name("cuda-sm90"))
    result = pytester.runpytest("--repro", "--repro-report=r.json")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_picky: a run that measures the noise floor failed (the job ran with its module outputs moved by "
            "one ulp and other dropout masks; its own runs passed):",
            "*this job refuses dispatch modes*",
            "Fix: compare without a noise floor: an explicit tolerance, @pytest.mark.reproducible(tolerance=...) "
            "for this environment's reference, cross_env=\"close\" (or a map) for another environment's; the job "
            "must give the same structure and finite results under a global forward hook and a TorchDispatchMode "
            "to be measured.",
        ]
    )
    check = json.loads((pytester.path / "r.json").read_text())["tests"][0]
    assert check["verdict"] == "error" and check["detail"].startswith("a noise-floor run: run 3")
    close = PICKY_JOB.replace("@pytest.mark.reproducible\n", '@pytest.mark.reproducible(cross_env="close")\n')
    pytester.makepyfile(test_picky=close)
    result = pytester.runpytest("--repro")  # no floor needed: compared under close
    result.assert_outcomes(passed=1)
    assert "a run that measures the noise floor failed" not in result.stdout.str()
