"""End-to-end behaviour of the plugin through pytester: skip, missing, regen, pass, fail, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import env_key, snapshot

pytestmark = pytest.mark.slow

TEST_FILE = """
import pytest
from userjobs import train

@pytest.mark.reproducible{marker}
def test_train(repro):
    result = repro.check(train, config={config})
    assert len(result.losses) >= 1
"""


def write_test(p: pytest.Pytester, config: str = '{"steps": 6}', marker: str = "", name: str = "test_user") -> None:
    p.makepyfile(**{name: TEST_FILE.format(config=config, marker=marker)})


def ref_dir(p: pytest.Pytester, name: str = "test_user", env: str | None = None) -> Path:
    return p.path / "reference_outputs" / name / "test_train" / (env or env_key())


def test_skipped_without_repro_with_reason(userjobs: pytest.Pytester) -> None:
    write_test(userjobs)
    result = userjobs.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*SKIPPED*run with `pytest --repro`*"])


def test_missing_reference_fails_with_path_and_command(userjobs: pytest.Pytester) -> None:
    write_test(userjobs)
    result = userjobs.runpytest("--repro")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            f"*no reference for test_user.py::test_train in environment '{env_key()}': "
            f"expected one at reference_outputs/test_user/test_train/{env_key()}",
            "*Record it for this environment*with: pytest --repro --repro-regen=missing test_user.py::test_train",
        ]
    )
    assert not ref_dir(userjobs).exists()


def test_regen_writes_then_passes(userjobs: pytest.Pytester) -> None:
    write_test(userjobs)
    result = userjobs.runpytest("--repro", "--repro-regen", "test_user.py")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            f"*WRITTEN*test_user.py::test_train ({env_key()})*",
            "references written (1):",
            f"  reference_outputs/test_user/test_train/{env_key()}",
        ]
    )
    files = {f.name for f in ref_dir(userjobs).iterdir()}
    assert files == {
        "record.json",
        "weights.safetensors",
        "outputs.safetensors",
        "manifest.yaml",
        "provenance.yaml",
        "digests.json",  # where a later difference starts: module digests of the first steps
    }
    assert not [f for f in (userjobs.path / "reference_outputs").rglob("*") if f.name.endswith(".pkl")]
    meta = json.loads((ref_dir(userjobs) / "record.json").read_text())["meta"]
    assert meta["torch_threads"] == 1, "jobs run with repro_threads (default 1) whatever the machine's cores"
    assert meta["flags"]["use_deterministic_algorithms"] is True and meta["flags"]["PYTHONHASHSEED"] == "0"
    result = userjobs.runpytest("--repro", "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*PASSED*test_user.py::test_train*2 run(s)*"])


def test_reference_dir_is_configurable(userjobs: pytest.Pytester) -> None:
    userjobs.makeini("[pytest]\nrepro_reference_dir = refs/golden\n")
    write_test(userjobs)
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    assert (userjobs.path / "refs" / "golden" / "test_user" / "test_train" / env_key() / "record.json").is_file()


def test_regen_missing_writes_only_absent(userjobs: pytest.Pytester) -> None:
    write_test(userjobs, name="test_a")
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    before = snapshot(ref_dir(userjobs, "test_a"))
    write_test(userjobs, name="test_b")
    # test_a's job changed: regen=missing must neither rewrite nor hide that.
    write_test(userjobs, config='{"steps": 6, "lr": 0.06}', name="test_a")
    result = userjobs.runpytest("--repro", "--repro-regen=missing")
    result.assert_outcomes(passed=1, failed=1)
    assert snapshot(ref_dir(userjobs, "test_a")) == before
    assert (ref_dir(userjobs, "test_b") / "record.json").is_file()


@pytest.mark.parametrize("ci_value", ["true", "1"])
def test_regen_refused_in_ci_unless_forced(
    userjobs: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci_value: str
) -> None:
    write_test(userjobs)
    monkeypatch.setenv("CI", ci_value)
    result = userjobs.runpytest("--repro", "--repro-regen")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*refuses to regenerate references because the CI environment variable is set*"
            "add --repro-regen-force to do it here anyway."
        ]
    )
    assert not ref_dir(userjobs).exists()
    userjobs.runpytest("--repro", "--repro-regen", "--repro-regen-force").assert_outcomes(passed=1)
    assert ref_dir(userjobs).exists()


def test_intentional_change_reports_what_moved(userjobs: pytest.Pytester) -> None:
    write_test(userjobs)
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    write_test(userjobs, config='{"steps": 6, "lr": 0.06, "accuracy_shift": 0.5}')
    result = userjobs.runpytest("--repro")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert f"differs from its reference reference_outputs/test_user/test_train/{env_key()}." in out
    # losses: step 0 is computed before any update, so the first divergent step is 1
    expected = [
        "losses: first divergent step 1: reference ",
        "; 5 of 6 steps differ, max abs diff ",
        "weights['weight'] (tensor 1 in state-dict order): 8 of 8 elements differ (100%), max abs diff ",
        "also weights['bias'] (tensor 2 in state-dict order): 2 of 2 elements differ",
        "metrics['accuracy']: reference 0.46875, this run 1.0, abs diff 0.531",
        "outputs['pred']",
        "Changed since the reference was recorded:\n"
        "  config accuracy_shift: reference (absent), this run 0.5 (user:dict)\n"
        "  config lr: reference (absent), this run 0.06 (user:dict)\n"
        "What differs:",
        "If the change is intended, regenerate the reference with: "
        "pytest --repro --repro-regen test_user.py::test_train",
    ]
    for line in expected:
        assert line in out, line
    # losses: step 0 is computed before any update, so the first divergent step is 1
    assert "DIFFERS" in out


def test_unseeded_job_diverges_run_to_run(userjobs: pytest.Pytester) -> None:
    write_test(userjobs, config='{"steps": 6, "unseeded_at": 3}')
    result = userjobs.runpytest("--repro", "--repro-regen")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*is not reproducible run-to-run: runs 1 and 2 diverge at step 3*",
            "*losses: first divergent step 3: run 1 *, run 2 *",
        ]
    )
    assert "differs from its reference" not in result.stdout.str()
    assert not ref_dir(userjobs).exists(), "a non-reproducible job must not get a reference"


def test_job_that_raises_shows_child_traceback(userjobs: pytest.Pytester) -> None:
    write_test(userjobs, config='{"steps": 6, "raise_at": 2}')
    result = userjobs.runpytest("--repro")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*run 1 of test_user.py::test_train: the job raised an exception in its process:*",
            "*userjobs.py*in train*",
            "*ValueError: boom at step 2*",
        ]
    )
    assert "INTERNALERROR" not in result.stdout.str()


def test_hanging_job_is_killed_after_timeout(userjobs: pytest.Pytester) -> None:
    write_test(userjobs, config='{"steps": 6, "hang_at": 1}', marker="(timeout=2)")
    result = userjobs.runpytest("--repro")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*run 1 of test_user.py::test_train was killed after 2 s without finishing*",
            "*raise the limit with @pytest.mark.reproducible(timeout=SECONDS)*",
        ]
    )


def test_nan_loss_names_first_non_finite_step(userjobs: pytest.Pytester) -> None:
    write_test(userjobs, config='{"steps": 6, "nan_at": 4}')
    result = userjobs.runpytest("--repro", "--repro-regen")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*the job returned non-finite values; nothing was compared or written:",
            "  run 1 (seed *): losses: 2 non-finite value(s), first at step 4; steps 1..4: *, nan (nan)",
            "*NON-FINITE*test_user.py::test_train: run 1 (seed *): losses*",
        ]
    )
    assert not ref_dir(userjobs).exists()


def test_corrupt_reference_is_reported_never_trusted_nor_overwritten(userjobs: pytest.Pytester) -> None:
    write_test(userjobs)
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    weights = ref_dir(userjobs) / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated
    broken = snapshot(ref_dir(userjobs))
    for args in (["--repro"], ["--repro", "--repro-regen=missing"]):
        result = userjobs.runpytest(*args)
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(
            [
                "*the reference for test_user.py::test_train is corrupt and was not used*"
                "weights.safetensors: sha256 * does not match*",
                "*rewrite it with: pytest --repro --repro-regen test_user.py::test_train",
            ]
        )
        assert snapshot(ref_dir(userjobs)) == broken
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    userjobs.runpytest("--repro").assert_outcomes(passed=1)


def test_corrupt_record_json(userjobs: pytest.Pytester) -> None:
    write_test(userjobs)
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    (ref_dir(userjobs) / "record.json").write_text('{"schema": 1, "losses": [1.0, ')
    result = userjobs.runpytest("--repro")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*is corrupt and was not used*record.json: not valid JSON*"])


def test_tolerances_from_marker(userjobs: pytest.Pytester) -> None:
    write_test(userjobs)
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    tol = '(tolerance={"metrics": {"accuracy": {"atol": 0.01}}})'
    write_test(userjobs, config='{"steps": 6, "accuracy_shift": 0.005}', marker=tol)
    userjobs.runpytest("--repro").assert_outcomes(passed=1)
    write_test(userjobs, config='{"steps": 6, "accuracy_shift": 0.02}', marker=tol)
    result = userjobs.runpytest("--repro")
    result.assert_outcomes(failed=1)
    assert "metrics['accuracy']: reference 0.46875, this run 0.48875, abs diff 0.02" in result.stdout.str()
    assert "[tolerance: atol=0.01, rtol=0]" in result.stdout.str()


def test_spawn_isolation_matches_fork_bitwise(userjobs: pytest.Pytester) -> None:
    write_test(userjobs)
    userjobs.runpytest("--repro", "--repro-regen", "--repro-isolation=fork").assert_outcomes(passed=1)
    userjobs.runpytest("--repro", "--repro-isolation=spawn").assert_outcomes(passed=1)


def test_seed_is_per_test_stable_and_overridable(userjobs: pytest.Pytester) -> None:
    userjobs.makepyfile(
        test_seeds="""
        import pytest
        from pytest_repro.seeding import derive_seed

        @pytest.mark.reproducible
        def test_a(repro):
            assert repro.seed == derive_seed(0, "test_seeds.py::test_a")
            assert repro.device == "cpu"

        @pytest.mark.reproducible
        def test_b(repro):
            assert repro.seed == derive_seed(0, "test_seeds.py::test_b") != derive_seed(0, "test_seeds.py::test_a")

        @pytest.mark.reproducible(seed=7)
        def test_c(repro):
            assert repro.seed == 7
    """
    )
    result = userjobs.runpytest("--repro")
    # the seeds are right, but a reproducible test that never calls repro.check checks nothing: error
    result.assert_outcomes(passed=3, errors=3)
    result.stdout.fnmatch_lines(["*test_seeds.py::test_a is marked reproducible*never called repro.check*"])
    userjobs.runpytest("--repro", "--repro-seed=5").assert_outcomes(passed=0, failed=3)


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("(runz=3)", "*unknown argument?s? runz; allowed: tolerance, cross_env, runs, seed*"),
        ('(tolerance="exact")', '*unknown tolerance \'exact\'; accepted: "bitwise", "close"*'),
        ("(runs=0)", "*runs=…?: expected an integer >= 1, got 0*"),
    ],
)
def test_bad_marker_arguments_fail_clearly(userjobs: pytest.Pytester, marker: str, message: str) -> None:
    write_test(userjobs, marker=marker)
    result = userjobs.runpytest("--repro")
    result.assert_outcomes(errors=1)  # the fixture refuses to set up
    assert "During handling" not in result.stdout.str()
    result.stdout.fnmatch_lines([message])


def test_fixture_without_marker_fails(userjobs: pytest.Pytester) -> None:
    userjobs.makepyfile(test_nomark="def test_x(repro):\n    pass\n")
    result = userjobs.runpytest("--repro")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*the repro fixture needs the marker*"])


def test_bad_ini_value_is_a_usage_error(userjobs: pytest.Pytester) -> None:
    userjobs.makeini("[pytest]\nrepro_runs = two\n")
    write_test(userjobs)
    result = userjobs.runpytest("--repro")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*repro_runs: expected an integer, got 'two'*"])


def test_lambda_job_is_rejected(userjobs: pytest.Pytester) -> None:
    userjobs.makepyfile(
        test_lambda="""
        import pytest

        @pytest.mark.reproducible
        def test_x(repro):
            repro.check(lambda ctx: {"losses": [1.0]})
    """
    )
    result = userjobs.runpytest("--repro")
    assert "must be an importable top-level function" in result.stdout.str() + result.stderr.str()


def test_plugin_import_loads_no_heavy_library() -> None:
    code = (
        "import sys, pytest_repro.plugin, pytest_repro.jobs, pytest_repro\n"
        "names = ('torch', 'numpy', 'transformers', 'peft', 'safetensors', 'deepdiff')\n"
        "heavy = [m for m in names if m in sys.modules]\n"
        "print(heavy)\nsys.exit(1 if heavy else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "[]"


def test_lora_config_errors_are_reported_before_any_run(userjobs: pytest.Pytester) -> None:
    userjobs.makepyfile(
        test_cfg="""
        import pytest
        from pytest_repro.jobs import lora_finetune

        @pytest.mark.reproducible
        def test_lora(repro):
            repro.check(lora_finetune, config={"lora": {"rank": "8", "alpah": 2}, "train": {"lr": -1}})
    """
    )
    result = userjobs.runpytest("--repro")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*lora_finetune config has 3 problem(s):",
            "*lora.alpah: unknown key (did you mean 'alpha'?)*",
            "*lora.rank: expected int > 0, got '8'",
            "*train.lr: expected float > 0, got -1.0",
            "*Nothing was run.*",
        ]
    )
    assert "run(s)" not in result.stdout.str()


def test_explicit_cuda_without_a_gpu_is_an_error_not_a_skip(userjobs: pytest.Pytester) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the check is for machines without one")
    write_test(userjobs)
    result = userjobs.runpytest("--repro", "--repro-device=cuda")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*device 'cuda' was requested but this machine has 0 usable CUDA device(s)*"])
    write_test(userjobs, marker='(device="cuda")')
    result = userjobs.runpytest("--repro")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*A GPU gate must not pass without a GPU*"])


def test_diagnose_names_the_first_diverging_tensor(userjobs: pytest.Pytester) -> None:
    write_test(userjobs, config='{"steps": 6, "grad_noise_at": 3}')
    result = userjobs.runpytest("--repro")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*Rerun with --repro-diagnose to find the first step and tensor (input batch, module, loss, parameter or "
            "gradient)*"
        ]
    )
    result = userjobs.runpytest("--repro", "--repro-diagnose")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*runs 1 and 2 diverge at step 4*",
            "Diagnosis (two more runs, tracing the model's inputs, every module's inputs and output, the loss, "
            "every parameter and gradient): "
            "first divergence at step 3, `weight` grad, 1 of 8 elements, max abs diff *",
        ]
    )


def test_op_without_deterministic_implementation_is_named(userjobs: pytest.Pytester) -> None:
    write_test(userjobs, config='{"steps": 6, "nondeterministic_op_at": 2}')
    result = userjobs.runpytest("--repro")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*run 1 of test_user.py::test_train: the job used `put_`, which has no deterministic "
            "implementation on cpu*",
            "*Options: use a deterministic alternative*warn_only=True*statistical tolerance*",
        ]
    )
    write_test(userjobs, config='{"steps": 6, "nondeterministic_op_at": 2}', marker="(deterministic=False)")
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)


def test_the_plugin_hooks_run_after_the_projects_conftest(pytester: pytest.Pytester) -> None:
    """As a plugin loaded before conftests: a conftest's marker is seen, and the report has the final status."""
    pytester.makeconftest(
        """
        import pytest

        def pytest_collection_modifyitems(items):
            for item in items:
                if item.name == "test_marked_by_conftest":
                    item.add_marker(pytest.mark.reproducible)

        def pytest_sessionfinish(session, exitstatus):
            if exitstatus == 5:
                session.exitstatus = 0
        """
    )
    pytester.makepyfile(test_x="def test_marked_by_conftest():\n    pass\n")
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*1 reproducibility test(s) skipped: run them with `pytest --repro`*"])
    report = pytester.path / "r.json"
    assert pytester.runpytest_inprocess("--repro", "-k", "nothing", f"--repro-report={report}").ret == 0
    assert json.loads(report.read_text())["exitstatus"] == 0
