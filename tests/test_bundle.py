"""Bundles: export a reference, verify every hash, tampering named by file, bundles of failing checks."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from pytest_repro import cli
from pytest_repro._publish.bundle.verify import verify

ROOT = Path(__file__).resolve().parents[1]
NODEID = "tests/test_reproducible.py::test_lora_is_reproducible"


def _export(tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> Path:
    out = tmp_path / name
    assert cli.main(["export", NODEID, "-o", str(out), "--rootdir", str(ROOT)]) == 0
    assert f"wrote {out}: {NODEID}" in capsys.readouterr().out
    return out


def _flip_in_tar(archive: Path, member: str, out: Path) -> None:
    """Flip one byte inside ``member``'s data, keeping the archive itself well-formed."""
    raw = bytearray(gzip.decompress(archive.read_bytes()))
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tar:
        info = next(m for m in tar.getmembers() if m.name.endswith("/" + member))
    raw[info.offset_data + info.size // 2] ^= 0x01
    out.write_bytes(gzip.compress(bytes(raw)))


def test_round_trip_export_verify_flip_one_byte(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = _export(tmp_path, "bundle.tar.gz", capsys)
    assert cli.main(["verify", str(archive)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("every hash matches")
    assert "ok   reference/weights.safetensors matches the sha256 record.json holds for it" in out
    assert "is the split file the record names (split_sha256)" in out

    result = verify(archive)
    index = result.index
    assert index["test"] == NODEID and index["split"]["file"] == "inputs/fixtures/splits_v1.json"
    roles = {name: entry["role"] for name, entry in index["files"].items()}
    assert roles["reference/record.json"] == "record" and roles["inputs/fixtures/tiny_lora.yaml"] == "config"
    assert roles["inputs/fixtures/splits_v1.json"] == "split"
    assert {"reference/weights.safetensors", "reference/manifest.yaml", "reference/provenance.yaml"} <= set(roles)
    assert index["job_source"]["found"] and len(index["job_source"]["sha256"]) == 64

    bad = tmp_path / "bad.tar.gz"
    _flip_in_tar(archive, "reference/weights.safetensors", bad)
    assert cli.main(["verify", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "BAD  reference/weights.safetensors: sha256" in out
    assert "the file changed after export" in out
    assert "but record.json holds" in out
    assert out.rstrip().endswith("INCONSISTENT, 2 problem(s) in: reference/weights.safetensors")


def test_zip_bundle_damaged_byte_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = _export(tmp_path, "bundle.zip", capsys)
    assert cli.main(["verify", str(archive)]) == 0
    capsys.readouterr()
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("bundle/inputs/fixtures/splits_v1.json")
    data[info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 40] ^= 0x01
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(data))
    assert cli.main(["verify", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "BAD  inputs/fixtures/splits_v1.json: damaged in the archive" in out
    assert "INCONSISTENT" in out and "in: inputs/fixtures/splits_v1.json" in out


def test_readme_says_what_with_what_where_when_and_how_to_reproduce(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = _export(tmp_path, "lora.tar.gz", capsys)
    with tarfile.open(archive) as tar:
        readme = tar.extractfile("lora/README.md").read().decode()  # type: ignore[union-attr]
        provenance = tar.extractfile("lora/reference/provenance.yaml").read().decode()  # type: ignore[union-attr]
    assert readme.startswith(f"# Reproducibility bundle: `{NODEID}`")
    for heading in ("## What was trained", "## With what", "## Where and when", "## Reproduce", "## Files"):
        assert heading in readme
    assert "job: `pytest_repro.jobs:lora_finetune`" in readme and "| `lora.scaling` | `2` | derived |" in readme
    assert "split file: `inputs/fixtures/splits_v1.json`" in readme
    assert "git checkout " in readme
    assert "pytest-repro verify lora.tar.gz && tar -xzf lora.tar.gz" in readme
    assert f"pytest --repro {NODEID}   # retrain and check against the reference" in readme
    assert "cp lora/reference/* reference_outputs/tests/test_reproducible/test_lora_is_reproducible/" in readme
    assert "recorded_at" in provenance


def test_extra_or_missing_members_and_a_wrong_split_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = _export(tmp_path, "b.tar.gz", capsys)
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    members.pop("b/reference/outputs.safetensors")
    members["b/notes.txt"] = b"added later"
    index = json.loads(members["b/bundle.json"])
    index["split"]["record_sha256"] = "0" * 64
    members["b/bundle.json"] = json.dumps(index).encode()
    changed = tmp_path / "changed.tar.gz"
    with tarfile.open(changed, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert cli.main(["verify", str(changed)]) == 1
    out = capsys.readouterr().out
    assert "BAD  reference/outputs.safetensors: missing from the archive (bundle.json lists it)" in out
    assert "BAD  notes.txt: in the archive but not listed in bundle.json" in out
    assert "BAD  reference/record.json: its split_sha256 differs from the one bundle.json lists" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "nope"], "pytest-repro export: nope is neither a reference folder nor a test node id"),
        (["export", "tests/x.py::test_gone"], "pytest-repro export: no reference for tests/x.py::test_gone under"),
        (
            ["export", str(ROOT / "reference_outputs/tests/test_reproducible/test_lora_is_reproducible")],
            "is a test folder holding the environment folder(s)",
        ),
        (["export", NODEID, "-o", "x.rar"], "x.rar: unknown archive type; name the output *.tar.gz or *.zip"),
        (["export", NODEID, "--env", "cuda-sm00"], "has no reference for environment 'cuda-sm00'"),
        (["verify", str(ROOT / "README.md")], "pytest-repro verify: "),
        (["verify", "missing.tar.gz"], "pytest-repro verify: missing.tar.gz does not exist; pass an archive"),
    ],
)
def test_usage_errors_are_one_line_with_the_fix(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "; " in err


def test_not_a_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "plain.tar.gz"
    with tarfile.open(plain, "w:gz") as tar:
        info = tarfile.TarInfo("x/hello.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    assert cli.main(["verify", str(plain)]) == 2
    assert "is not a pytest-repro bundle (no bundle.json in it)" in capsys.readouterr().err


TESTS = """
import pytest
from userjobs import train

@pytest.mark.reproducible
def test_good(repro):
    repro.check(train, config={"steps": 3})

@pytest.mark.reproducible
def test_bad(repro):
    repro.check(train, config={"steps": 4})
"""


@pytest.mark.slow
def test_bundle_dir_gets_one_bundle_per_failing_check(userjobs: pytest.Pytester) -> None:
    userjobs.makepyfile(test_two=TESTS)
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=2)
    userjobs.makepyfile(test_two=TESTS.replace('"steps": 4}', '"steps": 4, "lr": 0.07}'))
    result = userjobs.runpytest("--repro", "--repro-bundle-dir=out/bundles")
    result.assert_outcomes(passed=1, failed=1)
    bundles = sorted((userjobs.path / "out" / "bundles").iterdir())
    assert [b.name for b in bundles] == ["test_two.py_test_bad-" + bundles[0].name.split("-")[-1]]
    result.stdout.fnmatch_lines(["reproducibility: 1 bundle(s) of failing checks written to out/bundles:"])
    checked = verify(bundles[0])
    assert checked.problems == [] and checked.index["test"] == "test_two.py::test_bad"
    assert checked.index["contents"] == "the reference used and this run's outcome"
    with tarfile.open(bundles[0]) as tar:
        top = tar.getnames()[0].split("/")[0]
        outcome = json.loads(tar.extractfile(f"{top}/outcome.json").read())  # type: ignore[union-attr]
        readme = tar.extractfile(f"{top}/README.md").read().decode()  # type: ignore[union-attr]
    assert outcome["verdict"] == "differs" and outcome["curves"]["reference"]
    assert "**DIFFERS**: differs from the reference at step 1" in readme
    assert "config lr: reference (absent), this run 0.07" in readme
    assert "this run's own record (its tensors) is not included" in readme

    (userjobs.path / "afile").write_text("x")
    bad = userjobs.runpytest("--repro", "--repro-bundle-dir=afile/sub")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--repro-bundle-dir=afile/sub: afile is a file, not a folder; give a folder*"])
