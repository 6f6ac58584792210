"""The pytest-repro command: one-line errors, closed pipes, job-vs-cli diffs, migration of legacy cpu folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pytest_repro.cli import main

pytest.importorskip("deepdiff")

AMD = {
    "schema": 2,
    "cpu": {"model": "AMD EPYC", "machine": "x86_64", "isa_flags": ["avx2"]},  # no vendor: recorded before it existed
    "torch": {"cpu_capability": "AVX512", "intra_op_threads": 1, "inter_op_threads": 1, "version": "2.5.0"},
    "determinism": {"use_deterministic_algorithms": True},
    "env": {"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"},
    "gpu": [],
}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, command: str, *fragments: str) -> None:
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"pytest-repro {command}: ") and "; " in err, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def reference(root: Path, test: str, env: str, manifest: dict[str, Any] | None = AMD) -> Path:
    folder = root / "tests" / "test_mod" / test / env
    folder.mkdir(parents=True)
    (folder / "record.json").write_text("{}")
    if manifest is not None:
        (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    (folder / "provenance.yaml").write_text(f"base_seed: 0\nenvironment_key: {env}\nseed: 1\n")
    return folder


# ---------------------------------------------------------------- errors


def test_diff_errors_are_one_line_with_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(AMD))

    code, _, err = run_cli(capsys, "diff", str(tmp_path / "nope.yaml"), str(good))
    assert code == 2
    assert_one_line_error(err, "diff", "nope.yaml does not exist", "pytest-repro manifest")

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "diff", str(empty), str(good))
    assert code == 2
    assert_one_line_error(err, "diff", "empty holds no manifest.yaml", "reference environment folder")

    test_dir = reference(tmp_path / "refs", "test_a", "cpu-amd-avx512").parent
    reference(tmp_path / "refs", "test_a", "cuda-sm90")
    code, _, err = run_cli(capsys, "diff", str(test_dir), str(good))
    assert code == 2
    assert_one_line_error(err, "diff", "test folder", "cpu-amd-avx512, cuda-sm90", f"{test_dir / 'cpu-amd-avx512'}")

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("cpu: [unclosed\n  torch: 1\n")
    code, _, err = run_cli(capsys, "diff", str(bad_yaml), str(good))
    assert code == 2
    assert_one_line_error(err, "diff", "bad.yaml is not valid YAML or JSON (line ")

    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"cpu": ')
    code, _, err = run_cli(capsys, "diff", str(good), str(bad_json))
    assert code == 2
    assert_one_line_error(err, "diff", "bad.json is not valid JSON (line 1, column 9")

    for text in ("- just\n- a list\n", "hello: world\n"):
        other = tmp_path / "other.yaml"
        other.write_text(text)
        code, _, err = run_cli(capsys, "diff", str(good), str(other))
        assert code == 2
        assert_one_line_error(err, "diff", "does not hold a pytest-repro manifest")


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["diff", "only-one"])
    assert info.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "diff", "required: b", "pytest-repro diff --help")
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    err = capsys.readouterr().err
    assert err.startswith("pytest-repro: ") and err.count("\n") == 1 and "pytest-repro --help" in err


def test_html_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "html", str(tmp_path / "missing.json"))
    assert code == 2
    assert_one_line_error(err, "html", "missing.json does not exist", "--repro-report=PATH.json")

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    code, _, err = run_cli(capsys, "html", str(broken))
    assert code == 2
    assert_one_line_error(err, "html", "broken.json is not valid JSON (line 1")

    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(AMD))
    code, _, err = run_cli(capsys, "html", str(manifest))
    assert code == 2
    assert_one_line_error(err, "html", "is not a pytest-repro report")

    future = tmp_path / "future.json"
    future.write_text(json.dumps({"schema_version": 99, "tests": []}))
    code, _, err = run_cli(capsys, "html", str(future))
    assert code == 2
    assert_one_line_error(err, "html", "schema_version 99", "upgrade pytest-repro")


def test_plot_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refs = tmp_path / "reference_outputs"
    env = reference(refs, "test_a", "cpu-amd-avx512")
    reference(refs, "test_a", "cuda-sm90")
    code, _, err = run_cli(capsys, "plot", str(env.parent))
    assert code == 2
    assert_one_line_error(
        err, "plot", "test folder holding the environment folder(s) cpu-amd-avx512, cuda-sm90", f"plot {env}"
    )

    code, _, err = run_cli(capsys, "plot", str(tmp_path / "nowhere"))
    assert code == 2
    assert_one_line_error(err, "plot", "nowhere does not exist", "reference environment folder")

    code, _, err = run_cli(capsys, "plot", str(refs))
    assert code == 2
    assert_one_line_error(err, "plot", "holds no record.json", "the one holding record.json")

    (env / "record.json").write_text("{truncated")
    code, _, err = run_cli(capsys, "plot", str(env))
    assert code == 2
    assert_one_line_error(err, "plot", "is corrupt (not valid JSON", "pytest --repro --repro-regen")


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    big = {**AMD, "packages": {f"pkg{i:05d}": "1.0" for i in range(4000)}}
    changed = {**AMD, "packages": {f"pkg{i:05d}": "2.0" for i in range(4000)}}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(big))
    b.write_text(json.dumps(changed))
    cmd = f"'{sys.executable}' -m pytest_repro.cli diff --json '{a}' '{b}' | head -1"
    proc = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=120, check=False)
    assert proc.stdout == "{\n"
    assert proc.stderr == "", proc.stderr  # no BrokenPipeError, no "Exception ignored"


# ---------------------------------------------------------------- job vs cli manifests


def test_diff_of_a_job_reference_and_a_cli_manifest_skips_run_only_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = reference(tmp_path / "refs", "test_a", "cpu-amd-avx512", {**AMD, "kind": "job"})
    cli_manifest = {
        **AMD,
        "kind": "cli",
        "torch": {**AMD["torch"], "intra_op_threads": 16, "inter_op_threads": 16},
        "determinism": {"use_deterministic_algorithms": False},
        "env": {},
    }
    path = tmp_path / "here.yaml"
    path.write_text(yaml.safe_dump(cli_manifest))

    code, out, _ = run_cli(capsys, "diff", str(job), str(path))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("not compared: determinism.*, torch.intra_op_threads, torch.inter_op_threads")
    assert "env.OMP_NUM_THREADS" in lines[0] and "a job manifest vs a cli manifest" in lines[0]
    assert lines[1] == "no drift: the compared fields are identical"

    code, out, _ = run_cli(capsys, "diff", "--json", str(job), str(path))
    body = json.loads(out)
    assert code == 0 and body["changes"] == [] and body["numeric_drift"] is False
    assert "env.PYTHONHASHSEED" in body["not_compared"]["fields"]

    # two job manifests: every field is compared, as before
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**cli_manifest, "kind": "job"}))
    code, out, _ = run_cli(capsys, "diff", str(job), str(other))
    assert code == 1 and "numeric  torch.intra_op_threads: 1 -> 16" in out and "not compared" not in out


def test_the_manifest_command_marks_its_manifest_as_cli(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "manifest", "--json")
    manifest = json.loads(out)
    assert code == 0 and manifest["kind"] == "cli" and "vendor" in manifest["cpu"]


# ---------------------------------------------------------------- migrate


def test_migrate_renames_legacy_cpu_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refs = tmp_path / "reference_outputs"
    a = reference(refs, "test_a", "cpu")
    b = reference(refs, "test_b", "cpu", {**AMD, "cpu": {"model": "Intel(R) Xeon(R)", "vendor": "intel"}})
    gpu = reference(refs, "test_b", "cuda-sm90")
    staging = reference(refs, "test_c", ".cpu.staging-1").parent / ".staging" / "cpu"  # never touched
    staging.mkdir(parents=True)
    (staging / "record.json").write_text("{}")

    code, out, _ = run_cli(capsys, "migrate", str(refs), "--dry-run")
    assert code == 0
    assert out.splitlines() == [
        f"would rename {a} -> cpu-amd-avx512",
        f"would rename {b} -> cpu-intel-avx512",
        "2 folder(s) would be renamed, 0 kept",
    ]
    assert a.is_dir() and b.is_dir()

    code, out, _ = run_cli(capsys, "migrate", str(refs))
    assert code == 0
    assert out.splitlines()[:2] == [f"renamed {a} -> cpu-amd-avx512", f"renamed {b} -> cpu-intel-avx512"]
    assert not a.exists() and (a.parent / "cpu-amd-avx512" / "record.json").is_file()
    prov = yaml.safe_load((a.parent / "cpu-amd-avx512" / "provenance.yaml").read_text())
    assert prov == {"base_seed": 0, "environment_key": "cpu-amd-avx512", "seed": 1}
    assert gpu.is_dir() and staging.is_dir()

    code, out, _ = run_cli(capsys, "migrate", str(refs))
    assert code == 0 and out.startswith("no legacy 'cpu' reference folders under ")


def test_migrate_keeps_folders_it_cannot_rename(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    refs = tmp_path / "reference_outputs"
    clash = reference(refs, "test_a", "cpu")
    reference(refs, "test_a", "cpu-amd-avx512")
    no_fields = reference(refs, "test_b", "cpu", {"schema": 2, "cpu": {"error": "OSError: x"}, "torch": {}})
    no_manifest = reference(refs, "test_c", "cpu", None)
    no_capability = reference(refs, "test_d", "cpu", {**AMD, "torch": {"installed": False}})

    monkeypatch.chdir(tmp_path)  # the default folder is ./reference_outputs
    code, out, _ = run_cli(capsys, "migrate")
    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 5 and lines[-1] == "0 folder(s) renamed, 4 kept"
    rel = [p.relative_to(tmp_path) for p in (clash, no_fields, no_manifest, no_capability)]
    assert lines[0].startswith(f"kept {rel[0]} (still used, as a reference from another environment): ")
    assert "cpu-amd-avx512 already exists beside it" in lines[0] and lines[0].endswith("run migrate again")
    assert "lacks cpu.vendor/cpu.model and torch.cpu_capability" in lines[1]
    assert lines[1].endswith("pytest --repro --repro-regen")
    assert "holds no manifest.yaml" in lines[2]
    assert "lacks torch.cpu_capability" in lines[3]
    assert all(p.is_dir() for p in (clash, no_fields, no_manifest, no_capability))


def test_migrate_of_a_missing_folder_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "migrate", str(tmp_path / "nope"))
    assert code == 2
    assert_one_line_error(err, "migrate", "nope does not exist", "repro_reference_dir")
