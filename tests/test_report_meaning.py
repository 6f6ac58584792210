"""What the reports' figures mean: max abs diff is a maximum everywhere, drift is said once, lists as sets,
(absent) vs None, and a bundle README that never prints "None" for missing git info."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from helpers import env_key
from hypothesis import given
from hypothesis import strategies as st

from pytest_repro._judge.compare import compare_losses
from pytest_repro._judge.drift import diff_manifests, numeric_drift
from pytest_repro._judge.tolerances import Tolerance
from pytest_repro.record import Record

# ---------------------------------------------------------------- max abs diff: one meaning


def test_loss_difference_max_abs_is_the_largest_step_and_first_step_abs_the_first() -> None:
    expected = [1.0, 2.0, 3.0, 4.0, 5.0]
    actual = [1.0, 2.001, 3.5, 4.0, 5.25]
    (d,) = compare_losses(expected, actual, Tolerance("bitwise"))
    assert d.step == 1 and d.n_diff == 3
    assert d.first_step_abs == pytest.approx(0.001) and d.first_step_rel == pytest.approx(0.0005)
    assert d.max_abs == pytest.approx(0.5) and d.max_rel == pytest.approx(0.5 / 3)
    line = d.describe("reference", "this run")
    assert "first divergent step 1: reference 2.0, this run 2.001, abs diff 0.001, rel diff 0.0005;" in line
    assert "3 of 5 steps differ, max abs diff 0.5, max rel diff 0.167" in line


def test_a_nan_step_makes_the_loss_maximum_nan() -> None:
    (d,) = compare_losses([1.0, 2.0, 3.0], [1.5, math.nan, 3.0], Tolerance("bitwise"))
    assert d.first_step_abs == pytest.approx(0.5) and math.isnan(d.max_abs)


TESTS = """
import pytest
from userjobs import train

@pytest.mark.reproducible
def test_a(repro):
    repro.check(train, config={"steps": 6})
"""


@pytest.mark.slow
def test_terminal_json_and_html_say_the_same_maximum(userjobs: pytest.Pytester) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("matplotlib")
    import pytest_repro

    userjobs.makepyfile(test_m=TESTS)
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    userjobs.makepyfile(test_m=TESTS.replace('"steps": 6', '"steps": 6, "lr": 0.07'))
    result = userjobs.runpytest("--repro", "--repro-report=r.json", "--repro-html=r.html")
    result.assert_outcomes(failed=1)
    report = json.loads((userjobs.path / "r.json").read_text())
    jsonschema.validate(report, json.loads((Path(pytest_repro.__file__).parent / "report.schema.json").read_text()))
    assert report["schema_version"] == 3
    (test,) = report["tests"]
    (losses,) = [d for d in test["differences"] if d["section"] == "losses"]
    ref, run = test["curves"]["reference"], test["curves"]["run 1"]
    steps = [abs(a - b) for a, b in zip(ref, run, strict=True)]
    step = losses["step"]
    assert losses["first_step_abs"] == pytest.approx(steps[step], rel=1e-12)
    assert losses["max_abs"] == pytest.approx(max(steps), rel=1e-12) == test["max_abs"]["losses"]
    assert losses["first_step_abs"] < losses["max_abs"]  # the case where the two meanings used to be mixed up
    first, biggest = f"{losses['first_step_abs']:.3g}", f"{losses['max_abs']:.3g}"
    out = result.stdout.str()
    assert f"abs diff {first}, rel diff" in out and f"steps differ, max abs diff {biggest}, max rel diff" in out
    page = (userjobs.path / "r.html").read_text()
    table = page[page.index('<table data-table="differences">') :]
    table = table[: table.index("</table>")]
    assert "<th>abs diff at that step</th>" in table and "<th>max abs diff (over those differing)</th>" in table
    row = table[table.index("<td>losses</td>") :]
    assert f"<td class=num>{losses['first_step_abs']:.4g}</td>" in row.split("</tr>")[0]
    assert f"<td class=num>{losses['max_abs']:.4g}</td>" in row.split("</tr>")[0]
    assert "largest over the whole section" in page


# ---------------------------------------------------------------- drift said once per session

DRIFT_TESTS = """
import pytest
from userjobs import train

@pytest.mark.reproducible
@pytest.mark.parametrize("steps", [3, 4, 5])
def test_t(repro, steps):
    repro.check(train, config={"steps": steps})
"""


@pytest.mark.slow
def test_drift_shared_by_every_check_is_said_once(userjobs: pytest.Pytester) -> None:
    userjobs.makepyfile(test_d=DRIFT_TESTS)
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=3)
    folders = sorted((userjobs.path / "reference_outputs" / "test_d").glob(f"*/{env_key()}"))
    assert len(folders) == 3
    for k, folder in enumerate(folders):
        manifest = yaml.safe_load((folder / "manifest.yaml").read_text())
        manifest["torch"]["version"] = "0.0.1"
        if k == 2:
            manifest["torch"]["blas"] = "oldblas"
        (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    result = userjobs.runpytest("--repro")
    result.assert_outcomes(passed=3)
    out = result.stdout.str()
    assert out.count("torch.version: '0.0.1' -> ") == 1, out
    result.stdout.fnmatch_lines(
        [
            "environment drift: these passed, but numerics-relevant parts of the environment changed*",
            "  the same for all 3 checks that passed with drift:",
            "    numeric  torch.version: '0.0.1' -> *",
            "  test_d.py::test_t?5?, also:",
            "    numeric  torch.blas: 'oldblas' -> *",
        ]
    )
    block = out.split("environment drift:")[1].split("reproducibility: ")[0].split("warnings:")[0]
    assert "test_d.py::test_t[3]" not in block and "test_d.py::test_t[5], also:" in block  # [3]: nothing of its own


def test_drift_block_lines_unit() -> None:
    from pytest_repro._publish.report import _drift_lines

    one = [{"nodeid": "t::a", "name": None, "drift": ["x", "y"]}]
    assert _drift_lines(one) == ["  t::a:", "    x", "    y"]
    disjoint = [{"nodeid": "t::a", "name": None, "drift": ["x"]}, {"nodeid": "t::b", "name": "n", "drift": ["y"]}]
    assert _drift_lines(disjoint) == ["  t::a:", "    x", "  t::b [n]:", "    y"]


# ---------------------------------------------------------------- lists as sets, (absent) vs None


def test_list_drift_is_items_added_and_removed() -> None:
    old = {"cpu": {"isa_flags": ["avx", "avx2", "fma"]}, "gpu": [{"name": "A", "driver": "1"}]}
    new = {"cpu": {"isa_flags": ["amx_bf16", "avx2", "avx512_fp16", "fma"]}, "gpu": [{"name": "A", "driver": "2"}]}
    lines = [d.describe() for d in diff_manifests(old, new)]
    assert lines == [
        "numeric  cpu.isa_flags: added amx_bf16, avx512_fp16; removed avx",
        "numeric  gpu.0.driver: '1' -> '2'",  # a list of records keeps its index: which GPU
    ]
    swapped = diff_manifests({"cpu": {"isa_flags": ["a", "b"]}}, {"cpu": {"isa_flags": ["b", "a"]}})
    assert [d.describe() for d in swapped] == [  # a set in another order: shown, but not numeric drift
        "cosmetic cpu.isa_flags: same items, reordered: ['a', 'b'] -> ['b', 'a']"
    ]
    assert numeric_drift({"cpu": {"isa_flags": ["a", "b"]}}, {"cpu": {"isa_flags": ["b", "a"]}}) == []


FLAGS = st.lists(st.sampled_from(["avx", "avx2", "fma", "f16c", "amx_bf16", "avx512f", "sve"]), unique=True)


@given(FLAGS, FLAGS)
def test_list_drift_names_exactly_the_set_difference(old: list[str], new: list[str]) -> None:
    drifts = diff_manifests({"cpu": {"isa_flags": old}}, {"cpu": {"isa_flags": new}})
    if old == new:
        assert drifts == []
        return
    (d,) = drifts
    assert d.path == "cpu.isa_flags" and d.old == old and d.new == new
    text = d.describe().split("cpu.isa_flags: ", 1)[1]
    said: dict[str, set[str]] = {"added": set(), "removed": set()}
    for part in text.split("; "):
        word, _, items = part.partition(" ")
        if word in said:
            said[word] = set(items.split(", "))
    if set(old) == set(new):
        assert text.startswith("same items, reordered") and d.category == "cosmetic"
    else:
        assert said == {"added": set(new) - set(old), "removed": set(old) - set(new)}


def test_absent_is_a_missing_field_and_none_an_explicit_null(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pytest_repro.cli import main

    old = {"schema": 2, "python": {}, "cpu": {}, "torch": {}, "env": {}, "packages": {"peft": None, "gone": "1.0"}}
    new = {**old, "env": {"OMP_NUM_THREADS": "1"}, "packages": {"peft": "0.13"}, "cpu": {"isa_flags": ["avx2"]}}
    old = {**old, "cpu": {"isa_flags": ["avx", "avx2"]}}
    lines = [d.describe() for d in diff_manifests(old, new)]
    assert "numeric  env.OMP_NUM_THREADS: (absent) -> '1'" in lines
    assert "numeric  packages.peft: None -> '0.13'" in lines
    assert "numeric  packages.gone: '1.0' -> (absent)" in lines
    (tmp_path / "a.json").write_text(json.dumps(old))
    (tmp_path / "b.json").write_text(json.dumps(new))
    assert main(["diff", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
    text = capsys.readouterr().out
    assert "numeric  cpu.isa_flags: removed avx\n" in text and "isa_flags.0" not in text
    assert main(["diff", "--json", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
    changes = {c["path"]: c for c in json.loads(capsys.readouterr().out)["changes"]}
    assert changes["cpu.isa_flags"] == {
        "path": "cpu.isa_flags",
        "category": "numeric",
        "change": "changed",
        "old": ["avx", "avx2"],
        "new": ["avx2"],
        "added": [],
        "removed": ["avx"],
    }
    added, null, removed = changes["env.OMP_NUM_THREADS"], changes["packages.peft"], changes["packages.gone"]
    assert added == {"path": "env.OMP_NUM_THREADS", "category": "numeric", "change": "added", "new": "1"}
    assert null == {"path": "packages.peft", "category": "numeric", "change": "changed", "old": None, "new": "0.13"}
    assert removed == {"path": "packages.gone", "category": "numeric", "change": "removed", "old": "1.0"}


def test_a_run_setting_missing_from_the_reference_is_absent_not_none() -> None:
    from pytest_repro._judge.policy import changes

    stored = SimpleNamespace(provenance={}, manifest={}, record=Record(losses=[1.0], meta={"seed": 1, "device": None}))
    record = Record(losses=[1.0], meta={"seed": 1, "device": "cpu", "dtype": "float32"})
    assert changes(stored, record, {}, {}) == [
        "device: reference None, this run 'cpu'",
        "dtype: reference (absent), this run 'float32'",
    ]


# ---------------------------------------------------------------- bundle README


def _readme(git: dict[str, Any], installs: list[str]) -> str:
    from pytest_repro._publish.bundle.readme import render_readme

    index = {"test": "t.py::test_x", "environment_key": "cpu-x", "plugin_version": "0.1.0", "files": {}}
    index.update(contents="the reference", created="2026-01-01T00:00:00+00:00")
    manifest = {"git": git, "torch": {"version": "2.5.1+cpu"}, "packages": {"numpy": "2.0.0"}}
    record = {"losses": [1.0, 0.5], "meta": {"job": "userjobs:train", "seed": 1}}
    return render_readme(index, {"command": "pytest --repro"}, manifest, record, None, None, installs)


def test_bundle_readme_without_git_info_says_so_instead_of_none() -> None:
    readme = _readme({"commit": None}, ["pip install 'pytest-repro @ git+https://example.org/r.git@abc'"])
    assert "None" not in readme  # nothing here is an explicit null
    assert not any(line.startswith("git checkout") for line in readme.splitlines())
    assert "torch 2.5.1+cpu (CUDA (absent), cuDNN (absent), BLAS (absent))" in readme and "dtype (absent)" in readme
    assert "- no git commit recorded: the project was not a git checkout when the reference was recorded" in readme
    assert "pip install 'pytest-repro @ git+https://example.org/r.git@abc'" in readme
    assert "pytest-repro==" not in readme
    with_git = _readme({"commit": "c0ffee", "branch": "main", "dirty": False}, [])
    assert "- git commit `c0ffee` on main" in with_git and "git checkout c0ffee" in with_git


@pytest.mark.parametrize(
    ("direct_url", "checkout", "expected"),
    [
        (None, {}, ["pip install pytest-repro==0.1.0"]),
        (
            {"url": "https://github.com/o/pytest-repro.git", "vcs_info": {"vcs": "git", "commit_id": "abc"}},
            {},
            ["pip install 'pytest-repro @ git+https://github.com/o/pytest-repro.git@abc'"],
        ),
        (
            {"url": "file:///src/pytest-repro", "dir_info": {"editable": True}},
            {"commit": "abc", "remote": "https://github.com/o/pytest-repro.git", "dirty": False},
            [
                "pip install 'pytest-repro @ git+https://github.com/o/pytest-repro.git@abc'"
                "   # pytest-repro 0.1.0 was installed from the checkout /src/pytest-repro"
            ],
        ),
        (
            {"url": "file:///src/pytest-repro", "dir_info": {}},
            {"commit": "abc", "dirty": True},
            [
                "# pytest-repro 0.1.0 was installed from commit abc of the checkout /src/pytest-repro "
                "(it had uncommitted changes); elsewhere, use your copy of it:",
                "pip install /src/pytest-repro",
            ],
        ),
        (
            {"url": "file:///w/pytest_repro-0.1.0-py3-none-any.whl", "archive_info": {}},
            {},
            [
                "pip install file:///w/pytest_repro-0.1.0-py3-none-any.whl"
                "   # pytest-repro 0.1.0 was installed from this file"
            ],
        ),
    ],
)
def test_install_command_follows_how_it_was_installed(
    direct_url: dict[str, Any] | None, checkout: dict[str, Any], expected: list[str]
) -> None:
    from pytest_repro._publish.bundle.readme import install_command

    assert install_command("pytest-repro", "0.1.0", direct_url, lambda _: checkout) == expected


BUNDLE_TESTS = """
import pytest
from userjobs import train

@pytest.mark.reproducible
def test_bad(repro):
    repro.check(train, config={"steps": 3})
"""


@pytest.mark.slow
def test_bundle_of_a_project_without_git(userjobs: pytest.Pytester) -> None:
    userjobs.makepyfile(test_nogit=BUNDLE_TESTS)
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    userjobs.makepyfile(test_nogit=BUNDLE_TESTS.replace('"steps": 3', '"steps": 3, "lr": 0.07'))
    userjobs.runpytest("--repro", "--repro-bundle-dir=b").assert_outcomes(failed=1)
    (archive,) = (userjobs.path / "b").iterdir()
    with tarfile.open(archive) as tar:
        name = next(n for n in tar.getnames() if n.endswith("/README.md"))
        readme = tar.extractfile(name).read().decode()  # type: ignore[union-attr]
    assert "git commit `None`" not in readme and "on None" not in readme
    assert not any(line.startswith("git checkout") for line in readme.splitlines())
    assert "no git commit recorded" in readme
    reproduce = readme[readme.index("## Reproduce") :]
    assert "pytest-repro==" not in reproduce  # pytest-repro here is installed from a checkout, not an index
    installs = [line for line in reproduce.splitlines() if "pytest-repro" in line and "verify" not in line]
    assert installs and ("was installed from" in installs[0] or installs[0].startswith("pip install"))
