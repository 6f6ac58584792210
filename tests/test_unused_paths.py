"""--repro-unused: paths on the command line that cover every test path are the whole suite, not a filter."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

ONE = """
import pytest

pytestmark = pytest.mark.slow
from userjobs import train

@pytest.mark.reproducible
def test_a(repro):
    repro.check(train, config={"steps": 2})

@pytest.mark.reproducible
def test_b(repro):
    repro.check(train, config={"steps": 3})
"""


def _with_unused_reference(p: pytest.Pytester, where: str) -> None:
    """Record test_a and test_b under ``where``, then rename test_b: its reference becomes unused."""
    (p.path / where).mkdir(exist_ok=True)
    (p.path / where / "test_one.py").write_text(ONE)
    p.runpytest("--repro", "--repro-regen", where).assert_outcomes(passed=2)
    (p.path / where / "test_one.py").write_text(ONE.replace("def test_b(", "def test_b_renamed("))
    p.runpytest("--repro", "--repro-regen=missing", where).assert_outcomes(passed=2)


@pytest.mark.parametrize("arg", [".", "./", "ROOT"])
def test_the_rootdir_is_the_whole_suite(userjobs: pytest.Pytester, arg: str) -> None:
    _with_unused_reference(userjobs, "tests")
    arg = str(userjobs.path) if arg == "ROOT" else arg
    result = userjobs.runpytest("--repro", "--repro-unused=fail", arg)
    out = result.stdout.str()
    assert "1 unused reference folder(s): failing (--repro-unused=fail)" in out, out
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_a_path_covering_every_testpath_is_the_whole_suite(userjobs: pytest.Pytester) -> None:
    userjobs.makeini("[pytest]\nrepro_timeout = 60\ntestpaths = suite/unit suite/more\n")
    (userjobs.path / "suite" / "more").mkdir(parents=True)
    _with_unused_reference(userjobs, "suite/unit")
    result = userjobs.runpytest("--repro", "--repro-unused=fail", "suite")
    assert "1 unused reference folder(s): failing (--repro-unused=fail)" in result.stdout.str(), result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    # a path that covers only some of the test paths is still a filtered run
    result = userjobs.runpytest("--repro", "--repro-unused=fail", "suite/unit")
    assert "unused references not checked: the run was filtered (test paths given" in result.stdout.str()
    assert result.ret == pytest.ExitCode.OK
    # a node id narrows the run: it never covers its file's folder
    result = userjobs.runpytest("--repro", "--repro-unused=fail", "suite/more", "suite/unit/test_one.py::test_a")
    assert "unused references not checked: the run was filtered" in result.stdout.str()
