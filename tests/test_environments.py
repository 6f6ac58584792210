"""References per environment, drift on failure and on pass, cross-environment checks, config audit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import env_key, snapshot

pytestmark = pytest.mark.slow

TEST = """
import pytest
from userjobs import train

@pytest.mark.reproducible{marker}
def test_train(repro):
    repro.check(train, config={config})
"""
CONFIG = (
    '{"steps": 6, "lr": 0.05, "accuracy_shift": 0.0, "raise_at": None, "hang_at": None, "nan_at": None, '
    '"unseeded_at": None}'
)


def write(p: pytest.Pytester, config: str = CONFIG, marker: str = "") -> None:
    p.makepyfile(test_env=TEST.format(config=config, marker=marker))


def refs_of(p: pytest.Pytester) -> Path:
    return p.path / "reference_outputs" / "test_env" / "test_train"


def fake_old_torch(folder: Path) -> None:
    manifest = folder / "manifest.yaml"
    data = yaml.safe_load(manifest.read_text())
    data["torch"]["version"] = "0.0.1"
    manifest.write_text(yaml.safe_dump(data))


def test_numeric_drift_is_shown_first_on_failure(userjobs: pytest.Pytester) -> None:
    write(userjobs)
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    fake_old_torch(refs_of(userjobs) / env_key())
    write(userjobs, CONFIG.replace('"lr": 0.05', '"lr": 0.06'))
    result = userjobs.runpytest("--repro")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    changed = out.index("Changed since the reference was recorded:")
    drift = out.index("numeric  torch.version: '0.0.1' -> ")
    config = out.index("config lr: reference 0.05, this run 0.06 (user:dict)")
    assert changed < config < drift < out.index("What differs:")


def test_numeric_drift_is_reported_even_when_the_test_passes(userjobs: pytest.Pytester) -> None:
    write(userjobs)
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    fake_old_torch(refs_of(userjobs) / env_key())
    result = userjobs.runpytest("--repro")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "environment drift: these passed, but numerics-relevant parts of the environment changed*",
            "  test_env.py::test_train:",
            "    numeric  torch.version: '0.0.1' -> *",
        ]
    )


def test_references_per_environment_and_cross_environment_checks(
    userjobs: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # repro_threads = 0: the jobs keep the OMP_NUM_THREADS the test sets, so the environment key changes
    userjobs.makeini("[pytest]\nrepro_env_key_fields = env.OMP_NUM_THREADS\nrepro_threads = 0\n")
    write(userjobs)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    first = refs_of(userjobs) / f"{env_key()}_OMP_NUM_THREADS-1"
    assert (first / "record.json").is_file()
    before = snapshot(first)

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    result = userjobs.runpytest("--repro", "-rA")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "CROSS-ENV*test_env.py::test_train (*_OMP_NUM_THREADS-2): no reference for environment "
            "'*_OMP_NUM_THREADS-2'; compared with the one recorded in '*_OMP_NUM_THREADS-1' under the "
            "cross-environment tolerance (noise-aware: within 6 x the measured noise floor (2 perturbed runs)), "
            "not bitwise; largest difference * x the noise floor*; detects a change of accuracy above *",
            "    numeric  env.OMP_NUM_THREADS: '1' -> '2'",
        ]
    )

    write(userjobs, CONFIG.replace('"lr": 0.05', '"lr": 0.06'))
    result = userjobs.runpytest("--repro")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*compared with the one recorded in '*_OMP_NUM_THREADS-1'*, not bitwise, and it differs.",
            "*Fix: if the change is intended, record a reference for this environment with: "
            "pytest --repro --repro-regen=missing test_env.py::test_train",
        ]
    )

    write(userjobs)
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    assert (refs_of(userjobs) / f"{env_key()}_OMP_NUM_THREADS-2" / "record.json").is_file()
    assert snapshot(first) == before, "regenerating for one environment must not touch another's reference"
    userjobs.runpytest("--repro").assert_outcomes(passed=1)


def test_cross_env_tolerance_from_marker(userjobs: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    # repro_threads = 0: the jobs keep the OMP_NUM_THREADS the test sets, so the environment key changes
    userjobs.makeini("[pytest]\nrepro_env_key_fields = env.OMP_NUM_THREADS\nrepro_threads = 0\n")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    write(userjobs)
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    shifted = CONFIG.replace('"accuracy_shift": 0.0', '"accuracy_shift": 0.001')
    write(userjobs, shifted, marker='(cross_env={"default": "close", "metrics": {"atol": 0.01}})')
    userjobs.runpytest("--repro").assert_outcomes(passed=1)
    write(userjobs, shifted)  # the default (noise: this job draws nothing random, so rounding only) rejects it
    userjobs.runpytest("--repro").assert_outcomes(failed=1)


def test_config_audit_can_fail(userjobs: pytest.Pytester) -> None:
    userjobs.makeini("[pytest]\nrepro_config_audit = fail\n")
    write(userjobs, '{"steps": 6, "unused_knob": 3}')
    result = userjobs.runpytest("--repro")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*the recorded config does not match what the job used:",
            "*the job read config key 'lr', which the config does not declare (it used a default)",
            "*config key 'unused_knob' was never read by the job",
            "*or set ini repro_config_audit = warn.",
        ]
    )


def test_provenance_records_the_effective_config_with_sources(userjobs: pytest.Pytester) -> None:
    import shutil

    fixtures = Path(__file__).resolve().parent.parent / "fixtures"
    for name in ("corpus.jsonl", "splits_v1.json", "tokenizer.json"):
        shutil.copy(fixtures / name, userjobs.path / name)
    (userjobs.path / "tiny.yaml").write_text(
        "train: {steps: 2, batch_size: 4}\nmodel: {hidden_size: 32, intermediate_size: 64}\n"
        "data: {corpus: corpus.jsonl, splits: splits_v1.json, tokenizer: tokenizer.json}\n"
    )
    userjobs.makepyfile(
        test_lora="""
        import pytest
        from pytest_repro.jobs import lora_finetune

        @pytest.mark.reproducible
        def test_lora(repro):
            result = repro.check(lora_finetune, config="tiny.yaml")
            assert len(result.meta["job_meta"]["split_sha256"]) == 64
    """
    )
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    folder = userjobs.path / "reference_outputs" / "test_lora" / "test_lora" / env_key()
    prov = yaml.safe_load((folder / "provenance.yaml").read_text())
    eff = prov["effective_config"]
    assert eff["train.steps"] == {"source": "user:tiny.yaml", "value": 2}
    assert eff["train.lr"] == {"source": "default", "value": 0.001}
    assert eff["lora.scaling"] == {"source": "derived", "value": 2.0}
    assert prov["config_source"] == "tiny.yaml" and prov["environment_key"] == env_key()

    # The corpus changes under a versioned split: the job refuses to run on it.
    corpus = userjobs.path / "corpus.jsonl"
    corpus.write_text(corpus.read_text().replace("the cat", "the lion", 1))
    result = userjobs.runpytest("--repro")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*SplitError: *corpus.jsonl changed since splits_v1.json was made*"])


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_committed_references_pass_cross_env_under_other_cpu_kernels(
    heavy_modules: None, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, capability: str
) -> None:
    """The demo on a machine of another CPU family: replay the committed references under another key.

    ATEN_CPU_CAPABILITY switches torch's CPU kernels (as another CPU would), so the runs differ from
    the committed references in the last bits and the key becomes cpu-<vendor>-<capability>: the
    check must pass cross-environment under the default noise-aware tolerance, and never claim bitwise.
    """
    import shutil

    shutil.copytree(REPO / "fixtures", pytester.path / "fixtures")
    shutil.copytree(REPO / "reference_outputs", pytester.path / "reference_outputs")
    (pytester.path / "tests").mkdir()
    shutil.copy(REPO / "tests" / "test_reproducible.py", pytester.path / "tests" / "test_reproducible.py")
    pytester.makeini("[pytest]\nrepro_timeout = 300\n")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
    # a subprocess: this process has imported the repo's own tests/test_reproducible.py already
    result = pytester.runpytest_subprocess("--repro", "-m", "reproducible", "tests", "--repro-report=r.json")
    out = result.stdout.str()
    assert result.ret == 0, out
    report = json.loads((pytester.path / "r.json").read_text())
    checks = [t for t in report["tests"] if not (t["name"] or "").startswith("resume@")]
    resumes = [t for t in report["tests"] if (t["name"] or "").startswith("resume@")]
    assert len(checks) == 6 and {t["verdict"] for t in checks} == {"passed-cross-env"}, out
    assert [t["verdict"] for t in resumes] == ["passed"] * 2  # stop + resume is compared within this environment
    for t in checks:
        assert t["env_key"].endswith(f"-{capability}") and t["compared_with"].startswith("cpu-")
        assert "not bitwise" in t["detail"]
    assert "CROSS-ENV" in out
    for t in checks:  # the default cross-env tolerance: within k x the noise floor; the same kind of device,
        # the same generators: rounding is perturbed, the random streams are not
        assert t["noise"]["floor"]["parts"] == ["rounding"], t["noise"]["floor"]["parts"]
        assert 0 < t["noise"]["largest"]["ratio"] <= t["noise"]["k"] == 6
        assert "x the noise floor" in t["detail"] and "detects a change of eval_loss above" in t["detail"]
    moved = [t["max_abs"] for t in checks if any(v for v in t["max_abs"].values())]
    assert moved, "other CPU kernels must move some results, or this test proves nothing"
