"""``pytest-repro accept``: bundles of references recorded by a real ``--repro-bundle-dir`` run, installed here."""

from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from helpers import snapshot
from hypothesis import given
from hypothesis import strategies as st

from pytest_repro import cli
from pytest_repro._cli.accept_read import AcceptError
from pytest_repro._cli.accept_stage import _check_name, collect
from pytest_repro._publish.bundle.build import export
from pytest_repro.storage import reference_path, safe_name

TESTS = """
import pytest
from userjobs import train

@pytest.mark.reproducible
def test_good(repro):
    repro.check(train, config={"steps": 3})

@pytest.mark.reproducible
def test_other(repro):
    repro.check(train, config={"steps": 4}, name="first")
"""


def _record(
    p: pytest.Pytester, out: str = "bundles", written: tuple[str, ...] = ("test_good", "test_other")
) -> dict[str, Path]:
    """Regenerate the references with --repro-bundle-dir, as the GPU workflow does; return the bundles by test."""
    result = p.runpytest("--repro", "--repro-regen", f"--repro-bundle-dir={out}")
    result.assert_outcomes(passed=2)
    n = len(written)
    result.stdout.fnmatch_lines([f"*{n} bundle(s) of the references this run wrote (install them elsewhere with*"])
    found = {b.name.split(".py_")[1].split("_first")[0].split("-")[0]: b for b in (p.path / out).iterdir()}
    assert sorted(found) == list(written)  # one per reference written, none for an unchanged one
    return found


def _accept(p: pytest.Pytester, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(["accept", *args, "--rootdir", str(p.path)])
    out = capsys.readouterr()
    return code, out.out + out.err


def _rewrite(src: Path, dst: Path, change: dict[str, bytes | None], index: bool = False) -> None:
    """Copy a .tar.gz bundle, replacing (or adding) members by name below the top folder; optionally fix the index."""
    with tarfile.open(src) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
    top = next(iter(members)).split("/")[0]
    for name, data in change.items():
        if data is None:
            members.pop(f"{top}/{name}")
        else:
            members[f"{top}/{name}"] = data
    if index:
        import hashlib

        body = json.loads(members[f"{top}/bundle.json"])
        for name, data in change.items():
            if data is not None:
                body["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "role": "x"}
        members[f"{top}/bundle.json"] = json.dumps(body).encode()
    with tarfile.open(dst, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


class _Terminal(io.StringIO):
    """A stdin that says it is a terminal and answers the prompt."""

    def isatty(self) -> bool:
        return True


@pytest.mark.slow
def test_added_only_when_confirmed_then_the_gate_passes(
    userjobs: pytest.Pytester, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    userjobs.makepyfile(test_acc=TESTS)
    _record(userjobs)
    refs = userjobs.path / "reference_outputs"
    recorded = snapshot(refs)
    shutil.rmtree(refs)  # this checkout lacks them: the runner recorded them

    code, out = _accept(userjobs, capsys, "bundles")
    assert code == 3, out
    assert out.count("ADD ") == 2 and "new reference: 3 losses" in out
    assert "nothing changed (2 to add, 0 to replace); to install them: pytest-repro accept bundles --yes" in out
    assert not refs.exists()  # nothing written, no staging folder left behind
    monkeypatch.setattr(sys, "stdin", _Terminal("n\n"))  # on a terminal it asks; anything but y declines
    code, out = _accept(userjobs, capsys, "bundles")
    assert code == 3 and f"Install these references (2 to add, 0 to replace) under {refs}? [y/N] " in out, out
    assert not refs.exists()

    monkeypatch.setattr(sys, "stdin", _Terminal("y\n"))
    code, out = _accept(userjobs, capsys, "bundles")
    assert code == 0, out
    assert "added reference_outputs/test_acc/test_good/" in out and "git diff -- reference_outputs" in out
    assert "installed 2 reference(s): 2 added, 0 replaced." in out
    assert "added reference_outputs/test_acc/test_other/first/" in out  # a named check's folder
    assert snapshot(refs) == recorded  # the runner's files, byte for byte
    userjobs.runpytest("--repro").assert_outcomes(passed=2)


@pytest.mark.slow
def test_replaced_shows_the_difference(userjobs: pytest.Pytester, capsys: pytest.CaptureFixture[str]) -> None:
    userjobs.makepyfile(test_acc=TESTS)
    _record(userjobs)
    refs = userjobs.path / "reference_outputs"
    shutil.copytree(refs, userjobs.path / "before")
    before = snapshot(refs)
    userjobs.makepyfile(test_acc=TESTS.replace('"steps": 3}', '"steps": 3, "lr": 0.07}'))
    bundles = _record(userjobs, "new", ("test_good",))  # the runner, after an intended change
    after = snapshot(refs)
    shutil.rmtree(refs)
    shutil.copytree(userjobs.path / "before", refs)

    code, out = _accept(userjobs, capsys, str(bundles["test_good"]))
    assert code == 3, out
    assert "REPLACE  reference_outputs/test_acc/test_good/" in out
    assert "differs from the current reference at step 1 (bitwise comparison):" in out
    assert "losses: first divergent step 1: current reference" in out and ", bundle " in out
    assert "largest absolute difference: losses " in out
    assert "config lr: reference (absent), bundle 0.07 (user:dict)" in out  # what was recorded differently
    assert snapshot(refs) == before

    good = [k for k in after if k.startswith("test_acc/test_good/")]
    code, out = cli.main(["accept", str(bundles["test_good"]), "--yes", "--rootdir", str(userjobs.path)]), ""
    assert code == 0
    assert {k: v for k, v in snapshot(refs).items() if k in good} == {k: after[k] for k in good}
    assert all(snapshot(refs)[k] == before[k] for k in before if k.startswith("test_acc/test_other/first/"))
    userjobs.runpytest("--repro").assert_outcomes(passed=2)
    capsys.readouterr()
    other = next((refs / "test_acc" / "test_other" / "first").iterdir())
    export(other, userjobs.path, userjobs.path / "other.zip")  # pytest-repro export's bundles are accepted too
    code, out = _accept(userjobs, capsys, str(bundles["test_good"]), "other.zip")
    assert code == 0 and "nothing to change: the 2 bundle(s) match the current references" in out, out
    assert (
        "SAME     reference_outputs/test_acc/test_good/" in out
        and "SAME     reference_outputs/test_acc/test_other/first/" in out
    )


@pytest.mark.slow
def test_refused_bundles_change_nothing(userjobs: pytest.Pytester, capsys: pytest.CaptureFixture[str]) -> None:
    userjobs.makepyfile(test_acc=TESTS)
    bundles = _record(userjobs)
    good = bundles["test_good"]
    refs = userjobs.path / "reference_outputs"
    shutil.rmtree(refs / "test_acc" / "test_good")
    before = snapshot(refs)
    bad = userjobs.path / "bad"
    bad.mkdir()

    # a tampered byte in the weights
    with tarfile.open(good) as tar:
        top = tar.getnames()[0].split("/")[0]
        weights = bytearray(tar.extractfile(f"{top}/reference/weights.safetensors").read())  # type: ignore[union-attr]
    weights[-1] ^= 1
    _rewrite(good, bad / "tampered.tar.gz", {"reference/weights.safetensors": bytes(weights)})
    code, out = _accept(userjobs, capsys, str(bad / "tampered.tar.gz"), str(good))
    assert code == 1, out
    assert "REFUSED  " in out
    assert "verify finds it inconsistent (tampered, damaged or unsafe): reference/weights.safetensors" in out
    assert f"to accept only the others: pytest-repro accept {good}" in out
    assert snapshot(refs) == before

    # a member outside the reference files, with consistent hashes (path traversal)
    _rewrite(good, bad / "escape.tar.gz", {"reference/../../escape.txt": b"x"}, index=True)
    code, out = _accept(userjobs, capsys, str(bad / "escape.tar.gz"))
    # (bundle verify refuses the '..' member itself; accept's own check of reference paths is the second line)
    assert code == 1 and "reference/../../escape.txt: a path with '..'" in out, out
    assert not (userjobs.path / "escape.txt").exists()
    # a file under reference/ that is not one of pytest-repro's, with consistent hashes: accept's own check
    _rewrite(good, bad / "extra.tar.gz", {"reference/run.sh": b"rm -rf ~"}, index=True)
    code, out = _accept(userjobs, capsys, str(bad / "extra.tar.gz"))
    assert code == 1 and "reference/run.sh under reference/, which is not a reference file" in out, out
    assert snapshot(refs) == before

    # a bundle whose environment key clashes with its own manifest
    folder = refs / "test_acc" / "test_other" / "first"
    env = next(folder.iterdir())
    fake = folder / "cuda-sm90"
    shutil.copytree(env, fake)
    provenance = yaml.safe_load((fake / "provenance.yaml").read_text())
    provenance.update(environment_key="cuda-sm90", device="cuda")
    (fake / "provenance.yaml").write_text(yaml.safe_dump(provenance))
    export(fake, userjobs.path, bad / "clash.tar.gz")
    shutil.rmtree(fake)
    code, out = _accept(userjobs, capsys, str(bad / "clash.tar.gz"))
    assert code == 1, out
    assert "test_acc.py::test_other [first] (cuda-sm90)" in out  # a named check's folder is read back
    assert "it says environment 'cuda-sm90' but its manifest.yaml (device cuda) gives 'cuda'" in out

    # two bundles for the same test and environment
    shutil.copy(good, bad / "copy.tar.gz")
    code, out = _accept(userjobs, capsys, str(good), str(bad / "copy.tar.gz"))
    assert code == 1 and out.count("2 bundles (") == 2 and "pass only the one you mean" in out, out

    # a test that no longer exists in this checkout
    userjobs.makepyfile(test_acc=TESTS.split("@pytest.mark.reproducible\ndef test_other")[0])
    code, out = _accept(userjobs, capsys, str(bundles["test_other"]))
    assert code == 1, out
    assert "the test test_acc.py::test_other no longer exists in this checkout (test_acc.py has no such test" in out

    # the bundle of a failing check holds the reference it was compared with, not a recorded one
    userjobs.makepyfile(test_acc=TESTS.replace('"steps": 3}', '"steps": 3, "lr": 0.07}'))
    (refs / "test_acc" / "test_good").mkdir()
    code = cli.main(["accept", str(good), "--yes", "--rootdir", str(userjobs.path)])
    assert code == 0
    userjobs.runpytest("--repro", "--repro-bundle-dir=failing", "-k", "test_good").assert_outcomes(failed=1)
    capsys.readouterr()
    code, out = _accept(userjobs, capsys, "failing")
    assert code == 1 and "it is the bundle of a failing check" in out, out
    assert not any(p.name.startswith(".") for p in refs.rglob("*"))  # no staging folder left


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["accept", str(tmp_path / "nope.tar.gz")]) == 2
    assert "does not exist; pass bundle files" in capsys.readouterr().err
    assert cli.main(["accept", str(tmp_path)]) == 2
    assert "holds no bundle (*.tar.gz, *.tgz, *.zip)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["accept", "--help"])
    assert "Exit codes: 0 installed" in capsys.readouterr().out


def test_collection_that_cannot_run_is_an_error_not_unknown_tests(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = --no-such-option\n")
    (tmp_path / "test_a.py").write_text("def test_a():\n    pass\n")
    with pytest.raises(AcceptError, match=r"pytest could not collect the bundles' tests \(exit 4: .*no-such-option"):
        collect(tmp_path, ["test_a.py"])
    (tmp_path / "pytest.ini").write_text("[pytest]\nrepro_reference_dir = refs\n")
    (tmp_path / "test_b.py").write_text("import nope\n")
    project = collect(tmp_path, ["test_a.py", "test_b.py"])
    assert project.nodeids == {"test_a.py::test_a"} and project.reference_dir == tmp_path / "refs"
    assert "test_b.py" in project.failed_files and "nope" in project.failed_files["test_b.py"]


def test_gpu_workflow_bundles_missing_and_failing_references() -> None:
    workflow = yaml.safe_load((Path(__file__).parents[1] / ".github" / "workflows" / "repro.yml").read_text())
    steps = workflow["jobs"]["gpu"]["steps"]
    regen = next(s for s in steps if "--repro-regen" in str(s.get("run", "")))
    assert "--lf" in regen["run"] and "--repro-regen-force" in regen["run"] and "--repro-bundle-dir=" in regen["run"]
    folder = regen["run"].split("--repro-bundle-dir=")[1].split()[0]
    upload = next(s for s in steps if folder in str(s.get("with", {}).get("path", "")))
    assert upload["if"] == "always()"


_PART = st.text(st.characters(codec="ascii", exclude_characters=":/\\\0"), min_size=1, max_size=12)


@given(
    folders=st.lists(_PART, max_size=2),
    test=_PART,
    name=st.none() | _PART.filter(lambda n: not n.lower().startswith(("cpu", "cuda", "rank"))),
    env=st.sampled_from(["cpu-amd-avx512", "cuda-sm90", "cuda_dtype-bf16"]),
)
def test_the_check_name_is_read_back_from_the_reference_folder(
    folders: list[str], test: str, name: str | None, env: str
) -> None:
    nodeid = "/".join([*folders, "test_x.py"]) + f"::{test}"
    folder = reference_path(Path("reference_outputs"), nodeid, name) / env
    fits, found = _check_name({"reference": str(folder)}, nodeid, env, ("reference_outputs",))
    assert fits and found == (None if name is None else safe_name(name))
    parts = reference_path(Path(""), nodeid).parts
    if name is None or len({*parts, safe_name(name)}) > 1:  # all equal: only the exact prefix can tell them apart
        assert _check_name({"reference": str(folder)}, nodeid, env) == (fits, found)
    assert _check_name({"reference": str(folder)}, nodeid.replace("test_x.py", "test_y.py"), env)[0] is False
    assert _check_name({"reference": str(folder.parent / "other-env")}, nodeid, env)[0] is False
