"""Reports: JSON (validated against its schema), JUnit properties, unused references, pytest-xdist."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import env_key

pytestmark = pytest.mark.slow

TESTS = """
import pytest
from userjobs import train

@pytest.mark.reproducible
def test_a(repro):
    repro.check(train, config={"steps": 4})

@pytest.mark.reproducible
def test_b(repro):
    repro.check(train, config={"steps": 5})

@pytest.mark.reproducible
@pytest.mark.parametrize("lr", [0.01, 0.02])
def test_c(repro, lr):
    repro.check(train, config={"steps": 3, "lr": lr})

def test_plain():
    pass
"""


def test_json_report_matches_its_schema(userjobs: pytest.Pytester) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    import pytest_repro

    userjobs.makepyfile(test_many=TESTS)
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=5)
    userjobs.makepyfile(test_many=TESTS.replace('"steps": 5', '"steps": 5, "lr": 0.07'))
    result = userjobs.runpytest("--repro", "--repro-report=out/report.json")
    result.assert_outcomes(passed=4, failed=1)
    report = json.loads((userjobs.path / "out" / "report.json").read_text())
    schema = json.loads((Path(pytest_repro.__file__).parent / "report.schema.json").read_text())
    jsonschema.validate(report, schema)
    assert report["summary"] == {"passed": 3, "differs": 1}
    by_id = {t["nodeid"]: t for t in report["tests"]}
    assert by_id["test_many.py::test_b"]["verdict"] == "differs"
    assert by_id["test_many.py::test_b"]["detail"] == "differs from the reference at step 1"
    assert by_id["test_many.py::test_a"]["env_key"] == env_key() and len(by_id["test_many.py::test_a"]["seconds"]) == 2
    assert report["exitstatus"] == 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**report, "tests": [{"nodeid": "x"}]}, schema)


def test_junit_xml_carries_key_figures(userjobs: pytest.Pytester) -> None:
    userjobs.makepyfile(test_many=TESTS)
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=5)
    userjobs.runpytest("--repro", "--junitxml=junit.xml").assert_outcomes(passed=5)
    root = ET.parse(userjobs.path / "junit.xml").getroot()
    case = next(c for c in root.iter("testcase") if c.get("name") == "test_a")
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert props["repro_verdict"] == "passed"
    assert props["repro_environment"] == env_key() and props["repro_device"] == "cpu"
    assert props["repro_seed"].isdigit() and len(props["repro_run_seconds"].split()) == 2
    plain = next(c for c in root.iter("testcase") if c.get("name") == "test_plain")
    assert not list(plain.iter("property"))


def test_unused_references_report_fail_delete_and_filtered_runs(userjobs: pytest.Pytester) -> None:
    userjobs.makepyfile(test_many=TESTS)
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=5)
    refs = userjobs.path / "reference_outputs" / "test_many"
    userjobs.makepyfile(test_many=TESTS.replace("def test_b(", "def test_b_renamed("))
    result = userjobs.runpytest("--repro", "--repro-regen=missing", "--repro-unused=report")
    result.stdout.fnmatch_lines(
        ["reproducibility: 1 unused reference folder(s)*", f"  reference_outputs/test_many/test_b/{env_key()}"]
    )
    assert result.ret == 0

    result = userjobs.runpytest("--repro", "-k", "test_a", "--repro-unused=delete")
    result.stdout.fnmatch_lines(["*unused references not checked: the run was filtered (-k 'test_a')*"])
    assert (refs / "test_b").exists()

    result = userjobs.runpytest("--repro", "--repro-unused=fail")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*1 unused reference folder(s): failing (--repro-unused=fail)*"])

    result = userjobs.runpytest("--repro", "-m", "reproducible", "--repro-unused=delete")
    result.stdout.fnmatch_lines(["*deleted 1 unused reference folder(s)*"])
    assert not (refs / "test_b").exists() and (refs / "test_a" / env_key() / "record.json").exists()
    userjobs.runpytest("--repro", "--repro-unused=fail").assert_outcomes(passed=5)


def test_xdist_gives_the_serial_verdicts_and_merges_reports(userjobs: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    userjobs.makepyfile(test_many=TESTS)
    serial = userjobs.runpytest("--repro", "--repro-regen")
    serial.assert_outcomes(passed=5)
    userjobs.makepyfile(test_many=TESTS.replace('"steps": 4', '"steps": 4, "lr": 0.07'))
    serial = userjobs.runpytest("--repro", "--repro-report=serial.json")
    parallel = userjobs.runpytest("--repro", "-n", "2", "--repro-report=parallel.json", "--repro-unused=report")
    parallel.assert_outcomes(passed=4, failed=1)

    def verdicts(name: str) -> dict[str, str]:
        data = json.loads((userjobs.path / name).read_text())
        return {t["nodeid"]: t["verdict"] for t in data["tests"]}

    assert verdicts("parallel.json") == verdicts("serial.json")
    assert len(verdicts("parallel.json")) == 4  # every reproducible test, merged from both workers
    parallel.stdout.fnmatch_lines(
        [
            f"*DIFFERS*test_many.py::test_a ({env_key()})*",
            "reproducibility: 1 differs, 3 passed",
            "reproducibility: no unused references",
        ]
    )


def test_html_report_is_self_contained_with_plots_and_tables(userjobs: pytest.Pytester) -> None:
    pytest.importorskip("matplotlib")
    userjobs.makepyfile(test_many=TESTS)
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=5)
    userjobs.makepyfile(test_many=TESTS.replace('"steps": 5', '"steps": 5, "lr": 0.07'))
    result = userjobs.runpytest("--repro", "--repro-html=out/report.html", "--repro-report=out/report.json")
    result.assert_outcomes(passed=4, failed=1)
    page = (userjobs.path / "out" / "report.html").read_text()
    assert page.count('data-plot="loss"') == 4  # one loss plot per check
    assert page.count('data-plot="diff"') == 1  # and a difference plot for the check that differs
    assert "<th>max abs diff vs reference (largest over the whole section, any tolerance)</th>" in page
    assert "<th>steps / elements differing</th>" in page
    assert f"DIFFERS · {env_key()}" in page and "differs from the reference at step 1" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page  # no network, no CDN
    assert page.index("test_many.py::test_b") < page.index("test_many.py::test_a")  # failures first

    from pytest_repro.cli import main

    assert main(["html", str(userjobs.path / "out" / "report.json"), "-o", str(userjobs.path / "again.html")]) == 0
    assert (userjobs.path / "again.html").read_text().count('data-plot="loss"') == 4
    ref = userjobs.path / "reference_outputs" / "test_many" / "test_a" / env_key()
    assert main(["plot", str(ref), "-o", str(userjobs.path / "loss.png")]) == 0
    assert (userjobs.path / "loss.png").read_bytes().startswith(b"\x89PNG")


STAT_TEST = """
import pytest
from pytest_repro import statistical
from userjobs import noisy

@pytest.mark.reproducible(tolerance=statistical(seeds=3, margin=0.05))
def test_s(repro):
    repro.check(noisy, config={config})
"""


def test_reports_carry_the_why_of_failing_checks(userjobs: pytest.Pytester) -> None:
    """JSON: context lines, TOST lines and per-seed values of this run and the reference."""
    userjobs.makepyfile(test_many=TESTS, test_stat=STAT_TEST.format(config="{}"))
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=6)
    userjobs.makepyfile(
        test_many=TESTS.replace('"steps": 5', '"steps": 5, "lr": 0.07'),
        test_stat=STAT_TEST.format(config='{"shift": 0.5}'),
    )
    result = userjobs.runpytest("--repro", "--repro-report=r.json", "--repro-html=r.html")
    result.assert_outcomes(passed=4, failed=2)
    report = json.loads((userjobs.path / "r.json").read_text())
    by_id = {t["nodeid"]: t for t in report["tests"]}
    differs = by_id["test_many.py::test_b"]
    assert differs["test_outcome"] == "failed" and differs["verdict"] == "differs"
    assert "config lr: reference (absent), this run 0.07 (user:dict)" in differs["context"]
    stat = by_id["test_stat.py::test_s"]
    assert stat["verdict"] == "differs" and stat["test_outcome"] == "failed"
    assert any("NOT equivalent" in line and "reference mean" in line and "CI [" in line for line in stat["details"])
    assert len(stat["statistical"]["seeds"]) == 3 and len(stat["statistical"]["metrics"]["score"]) == 3
    assert len(stat["statistical"]["reference"]["metrics"]["score"]) == 3
    assert any(label.startswith("seed ") for label in stat["curves"])
    page = (userjobs.path / "r.html").read_text()
    assert "config lr: reference (absent), this run 0.07 (user:dict)" in page and "NOT equivalent" in page
    assert 'data-table="seeds"' in page


def test_forgetting_repro_is_visible(userjobs: pytest.Pytester) -> None:
    userjobs.makepyfile(test_many=TESTS)
    result = userjobs.runpytest()
    result.assert_outcomes(passed=1, skipped=4)
    result.stdout.fnmatch_lines(["reproducibility: 4 reproducibility test(s) skipped: run them with `pytest --repro`"])
