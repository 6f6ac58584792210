"""What a user reads when something is wrong: each message says what happened, where, and the fix (issue 20, item 7)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_repro import callsites
from pytest_repro._judge.audit import near_misses
from pytest_repro._judge.tolerances import parse_tolerance, unmatched_keys
from pytest_repro._publish import extras

# Jobs steered by config["case"]: small, torch only.
MSG_JOBS = textwrap.dedent(
    """
    import ctypes
    import os
    import sys

    import torch


    def job(ctx):
        case = ctx.config.get("case", "ok")
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        losses = [1.0, 0.5, 0.25]
        if case == "exit":
            print("about to leave with os._exit(3)", file=sys.stderr, flush=True)
            os._exit(3)
        if case == "segfault":
            print("about to read address 0", file=sys.stderr, flush=True)
            ctypes.string_at(0)
        if case == "silent_exit":
            os._exit(0)
        if case == "loss_nan":
            losses[1] = float("nan")
        if case == "weight_nan":
            weights["bias"][0] = float("nan")
        if case == "metric_nan":
            return {"losses": losses, "metrics": {"mse": float("nan")}}
        if case == "loss_key":
            return {"loss": losses, "weights": weights}
        return {"losses": losses, "weights": weights, "metrics": {"mse": 0.25, "acc": 0.5},
                "outputs": {"y": model(torch.ones(1, 3)).detach()}}


    def schemaless(ctx):
        steps = ctx.config["steps"]
        return {"losses": [1.0 / (i + 1) for i in range(steps)]}
    """
)


@pytest.fixture
def msgs(heavy_modules: None, pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester project with the message jobs."""
    pytester.makepyfile(msgjobs=MSG_JOBS)
    pytester.makeini("[pytest]\nrepro_timeout = 60\n")
    pytester.syspathinsert()
    return pytester


def _test(p: pytest.Pytester, body: str, marker: str = "") -> None:
    p.makepyfile(
        test_msg=f"import pytest\nfrom msgjobs import job, schemaless\n\n\n@pytest.mark.reproducible{marker}\n"
        f"def test_it(repro):\n{textwrap.indent(textwrap.dedent(body), '    ')}"
    )


def _written(p: pytest.Pytester) -> list[Path]:
    return [f for f in (p.path / "reference_outputs").rglob("*") if f.is_file()]


def _out(result: pytest.RunResult) -> str:
    return result.stdout.str() + result.stderr.str()


# a. --repro-html without matplotlib


def test_html_without_matplotlib_is_a_usage_error_before_any_test_runs(
    msgs: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _test(msgs, 'repro.check(job, config={"case": "ok"})')
    monkeypatch.setattr(extras, "installed", lambda module: module != "matplotlib")
    result = msgs.runpytest("--repro", "--repro-regen", "--repro-html=report.html")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*pytest-repro: --repro-html=report.html needs matplotlib (it draws the loss curves), which is not installed*"]
    )
    out = _out(result)
    assert "pip install matplotlib" in out and "[report]" in out
    assert "writable" not in out
    assert not _written(msgs), "no test ran"
    assert not (msgs.path / "report.html").exists()


@pytest.mark.parametrize(
    ("direct_url", "command"),
    [
        (
            {"url": "file:///src/pytest-repro", "dir_info": {"editable": True}},
            "pip install -e '/src/pytest-repro[report]'",
        ),
        ({"url": "file:///src/my%20copy", "dir_info": {}}, "pip install '/src/my copy[report]'"),
        (
            {"url": "https://github.com/o/r.git", "vcs_info": {"vcs": "git", "commit_id": "abc123"}},
            "pip install 'pytest-repro[report] @ git+https://github.com/o/r.git@abc123'",
        ),
        (None, "pip install 'pytest-repro[report]'"),
    ],
)
def test_the_extra_install_follows_how_pytest_repro_was_installed(direct_url: dict | None, command: str) -> None:
    assert extras.extra_install_for("report", direct_url) == command


def test_report_install_names_this_checkout_when_pytest_repro_is_one() -> None:
    checkout = Path(extras.__file__).resolve().parents[2]
    command = extras.report_install()
    assert command.startswith("install it with: pip install matplotlib")
    if (checkout / "pyproject.toml").is_file():
        assert f"pip install -e '{checkout}[report]'" in command


# b. a job process that ends without a traceback


@pytest.mark.parametrize(
    ("case", "happened", "printed"),
    [
        ("exit", "the job process exited with code 3 and wrote no record", "about to leave with os._exit(3)"),
        ("segfault", "the job process was killed by SIGSEGV", "about to read address 0"),
        ("silent_exit", "the job process exited with code 0 and wrote no record", None),
    ],
)
def test_a_crashed_job_process_says_what_happened_not_the_traceback_above(
    msgs: pytest.Pytester, case: str, happened: str, printed: str | None
) -> None:
    _test(msgs, f'repro.check(job, config={{"case": "{case}"}})')
    result = msgs.runpytest("--repro", "--repro-regen")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = _out(result)
    assert f"run 1 of test_msg.py::test_it: {happened}; no Python traceback was produced" in out
    assert "traceback above" not in out
    if printed is None:
        assert "Nothing was captured on its stdout or stderr." in out
    else:
        assert "Its output (stdout and stderr, last lines):" in out and printed in out
    assert "then rerun: pytest --repro test_msg.py::test_it" in out


# c. the NaN hint names the section the NaN is in


@pytest.mark.parametrize(
    ("case", "section", "tolerance"),
    [
        ("loss_nan", "the losses", '{"losses": {"atol": 0, "equal_nan": True}}'),
        ("weight_nan", "weights['bias']", '{"weights": {"bias": {"atol": 0, "equal_nan": True}}}'),
        ("metric_nan", "metrics['mse']", '{"metrics": {"mse": {"atol": 0, "equal_nan": True}}}'),
    ],
)
def test_the_nan_hint_names_the_section_the_nan_is_in(
    msgs: pytest.Pytester, case: str, section: str, tolerance: str
) -> None:
    _test(msgs, f'repro.check(job, config={{"case": "{case}"}})')
    result = msgs.runpytest("--repro", "--repro-regen")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = _out(result).replace("\n", " ")
    assert (
        f"If NaN is expected in {section}, allow it there with @pytest.mark.reproducible(tolerance={tolerance})" in out
    )
    assert '"outputs"' not in out
    # the hint is right: with it, the check passes
    _test(msgs, f'repro.check(job, config={{"case": "{case}"}})', marker=f"(tolerance={tolerance})")
    assert msgs.runpytest("--repro", "--repro-regen").ret == pytest.ExitCode.OK


# d. unknown result keys


def test_an_unknown_result_key_gets_the_close_known_one(msgs: pytest.Pytester) -> None:
    _test(msgs, 'repro.check(job, config={"case": "loss_key"})')
    result = msgs.runpytest("--repro", "--repro-regen")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert "job result has unknown key(s) ['loss'] (did you mean 'losses' for 'loss'?)" in _out(result)


# e. tolerance keys that name nothing


def test_a_tolerance_key_that_names_no_metric_is_an_error_with_a_suggestion(msgs: pytest.Pytester) -> None:
    _test(msgs, 'repro.check(job, config={"case": "ok"})', marker='(tolerance={"metrics": {"mes": {"atol": 0.1}}})')
    result = msgs.runpytest("--repro", "--repro-regen")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = _out(result)
    assert (
        "metrics: 'mes' names no metric the job returned (did you mean 'mse'?); the job returned metrics: acc, mse"
        in out
    )
    assert "then rerun: pytest --repro test_msg.py::test_it" in out
    assert not _written(msgs), "nothing was written"


def test_the_markers_cross_env_keys_are_checked_too(msgs: pytest.Pytester) -> None:
    _test(msgs, 'repro.check(job, config={"case": "ok"})', marker='(cross_env={"weights": {"wieght": "close"}})')
    result = msgs.runpytest("--repro", "--repro-regen")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = _out(result)
    assert "@pytest.mark.reproducible(cross_env=…) names keys the job did not return" in out
    assert "weights: 'wieght' names no weight the job returned (did you mean 'weight'?)" in out


@pytest.mark.parametrize(
    ("tolerance", "ok"),
    [
        ('{"metrics": {"ms*": {"atol": 0.1}, "default": "close"}, "weights": {"*": "close"}}', True),
        ('{"outputs": {"y": "close"}, "weights": {"default": "bitwise"}}', True),
        ('{"weights": {"layer.*": "close"}}', False),
        ('{"losses": {"step0": "close"}}', False),
    ],
)
def test_glob_patterns_and_default_are_errors_only_when_they_match_nothing(
    msgs: pytest.Pytester, tolerance: str, ok: bool
) -> None:
    _test(msgs, 'repro.check(job, config={"case": "ok"})', marker=f"(tolerance={tolerance})")
    result = msgs.runpytest("--repro", "--repro-regen")
    assert (result.ret == pytest.ExitCode.OK) is ok, _out(result)
    if not ok:
        assert "names keys the job did not return" in _out(result)


@given(
    keys=st.sets(st.text("abcxyz.", min_size=1, max_size=6), min_size=1, max_size=5),
    data=st.data(),
)
def test_a_tolerance_naming_a_returned_key_is_never_a_problem(keys: set[str], data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(sorted(keys)))
    spec = parse_tolerance({"metrics": {key: "close", "default": "bitwise"}, "outputs": {key: {"atol": 1.0}}})
    assert unmatched_keys(spec, {"metrics": keys, "outputs": keys, "weights": set()}) == []
    missing = key + "-missing"
    spec = parse_tolerance({"metrics": {missing: "close"}})
    assert len(unmatched_keys(spec, {"metrics": keys})) == 1


def test_a_tolerance_problem_lists_at_most_twelve_returned_keys() -> None:
    spec = parse_tolerance({"weights": {"layer.*": "close"}})
    (problem,) = unmatched_keys(spec, {"weights": {f"block{i}.w" for i in range(40)}})
    assert problem.endswith("… and 28 more") and problem.count("block") == 12


# f. a schema-less job's KeyError points at the config's near-miss key


def test_a_keyerror_for_a_misspelt_config_key_says_did_you_mean(msgs: pytest.Pytester) -> None:
    _test(msgs, 'repro.check(schemaless, config={"stpes": 3})')
    result = msgs.runpytest("--repro", "--repro-regen")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = _out(result)
    assert "KeyError: 'steps'" in out
    assert (
        "Config audit: the job read config key 'steps', which the config does not have; the config has 'stpes', "
        "which the job never read: did you mean 'steps'?"
    ) in out
    assert "Fix the config key (or the job)" in out


def test_a_tolerance_section_typo_says_did_you_mean() -> None:
    from pytest_repro._judge.tolerances import ToleranceError, parse_tolerance

    with pytest.raises(
        ToleranceError, match=r"unknown section\(s\) 'metric' \(did you mean 'metrics' for 'metric'\?\)"
    ):
        parse_tolerance({"metric": {"acc": {"atol": 0.01}}})


def test_a_typo_read_with_a_default_is_one_did_you_mean_warning() -> None:
    from types import SimpleNamespace

    from pytest_repro._judge.audit import audit_findings

    audit = {"undeclared_reads": ["steps", "lr"], "unused_keys": ["stpes", "unused_knob"]}
    record = SimpleNamespace(meta={"config_audit": audit})
    assert audit_findings(record) == [  # type: ignore[arg-type]
        "the job read config key 'steps', which the config does not have; the config has 'stpes', which the job "
        "never read: did you mean 'steps'?",
        "the job read config key 'lr', which the config does not declare (it used a default)",
        "config key 'unused_knob' was never read by the job",
    ]


def test_near_misses_compare_keys_of_one_section_only() -> None:
    audit = {"undeclared_reads": ["optim.lr", "steps", "seed"], "unused_keys": ["optim.lrr", "stpes", "model.seeds"]}
    assert near_misses(audit) == [
        "the job read config key 'optim.lr', which the config does not have; the config has 'optim.lrr', which "
        "the job never read: did you mean 'optim.lr'?",
        "the job read config key 'steps', which the config does not have; the config has 'stpes', which the job "
        "never read: did you mean 'steps'?",
    ]
    assert near_misses(None) == [] and near_misses({"undeclared_reads": ["a"], "unused_keys": []}) == []


# g. two checks of one test without name=


def test_two_unnamed_checks_fail_on_the_first_run_before_anything_runs(msgs: pytest.Pytester) -> None:
    _test(msgs, 'repro.check(job, config={"case": "ok"})\nrepro.check(schemaless, config={"steps": 2})\n')
    result = msgs.runpytest("--repro")  # no reference yet: the first check alone would only say "missing"
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = _out(result)
    assert "test_msg.py::test_it: repro.check is called at lines 7 and 8 of test_msg.py without name=" in out
    assert "give each check of the test its own name" in out
    assert "no reference for" not in out, "reported before the first check ran"


def test_a_second_unnamed_check_the_source_does_not_show_fails_before_it_runs(msgs: pytest.Pytester) -> None:
    _test(msgs, 'for check in (repro.check, repro.check):\n    check(job, config={"case": "ok"})\n')
    result = msgs.runpytest("--repro", "--repro-regen")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = _out(result)
    assert "repro.check is called a second time without name=: the checks would share one reference folder" in out
    assert not _written(msgs), "the failed test committed nothing"


def test_named_checks_and_exclusive_branches_are_not_refused(msgs: pytest.Pytester) -> None:
    body = """
    import os
    if os.environ.get("NEVER_SET_HERE"):
        repro.check(job, config={"case": "ok"})
    else:
        repro.check(job, config={"case": "ok"})
    repro.check(job, config={"case": "ok"}, name="again")
    for n in (2, 3):
        repro.check(schemaless, config={"steps": n}, name=f"steps{n}")
    """
    _test(msgs, body)
    result = msgs.runpytest("--repro", "--repro-regen")
    assert result.ret == pytest.ExitCode.OK, _out(result)


def _two(repro: object) -> None:
    repro.check("a")  # type: ignore[attr-defined]
    repro.check("b", name=None)  # type: ignore[attr-defined]


def _loop(repro: object) -> None:
    for _ in range(2):
        repro.check("a", {}, "same")  # type: ignore[attr-defined]


def _fine(repro: object, flag: bool) -> None:
    repro.check("a") if flag else repro.check("b")  # type: ignore[attr-defined]
    repro.check("a", name="x")  # type: ignore[attr-defined]
    repro.check_resume("a", name="y", at=1)  # type: ignore[attr-defined]

    def helper() -> None:
        repro.check("c")  # type: ignore[attr-defined]


def _resume_and_check(repro: object) -> None:
    repro.check("a", name="x")  # type: ignore[attr-defined]
    repro.check_resume("a", name="x", at=1)  # type: ignore[attr-defined]


def test_clashing_checks_reads_names_branches_and_loops() -> None:
    first = _two.__code__.co_firstlineno
    assert callsites.clashing_checks(_two) == (None, [first + 1, first + 2])
    assert callsites.clashing_checks(_loop) == ("same", [_loop.__code__.co_firstlineno + 2])
    assert callsites.clashing_checks(_fine) is None
    assert callsites.clashing_checks(_resume_and_check) is not None
    assert callsites.clashing_checks(print) is None  # no source
