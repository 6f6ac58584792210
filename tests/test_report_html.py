"""The HTML report rendered from hand-built JSON reports: schema 2 fields, difference plots, old reports."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import pytest

from pytest_repro._publish.report_html import render_html, write_html

pytest.importorskip("matplotlib")

BASE = [2.3 - 0.1 * i for i in range(20)]


def check(nodeid: str, verdict: str, **fields: Any) -> dict[str, Any]:
    """A schema-2 per-check outcome with defaults for the fields a test does not care about."""
    out: dict[str, Any] = {
        "nodeid": nodeid,
        "name": None,
        "verdict": verdict,
        "test_outcome": "passed" if verdict in ("passed", "unchanged", "passed-cross-env", "written") else "failed",
        "path": f"reference_outputs/{nodeid.split('::')[-1]}/cpu",
        "detail": "",
        "seconds": [1.25, 1.5],
        "env_key": "cpu",
        "compared_with": None,
        "drift": [],
        "details": [],
        "warnings": [],
        "seed": 1234,
        "device": "cpu",
        "curves": {"run 1": BASE, "run 2": BASE, "reference": BASE},
        "differences": [],
        "max_abs": {},
        "context": [],
        "statistical": None,
    }
    out.update(fields)
    return out


def report(*tests: dict[str, Any], version: int = 2) -> dict[str, Any]:
    summary: dict[str, int] = {}
    for t in tests:
        summary[t["verdict"]] = summary.get(t["verdict"], 0) + 1
    return {
        "schema_version": version,
        "plugin_version": "0.0.test",
        "created": "2025-01-01T00:00:00+00:00",
        "rootdir": "/project",
        "exitstatus": 1,
        "summary": summary,
        "tests": list(tests),
    }


def self_contained(page: str) -> None:
    assert "http://" not in page and "https://" not in page and "<script" not in page.lower()
    assert re.search(r"<img[^>]+src=\"(?!data:image/png;base64,)", page) is None  # every image is embedded


TINY = [v + (1e-7 * (i - 11) if i > 11 else 0.0) for i, v in enumerate(BASE)]  # drifts 1e-7.. from step 12


def test_failing_cross_env_check_shows_context_outcome_and_difference_plot(tmp_path: Path) -> None:
    context = [
        "config lr: reference 0.05, this run 0.1 (user:dict)",
        "numeric  torch.version: '2.12' -> '2.13'",
    ]
    failing = check(
        "test_jobs.py::test_train",
        "differs",
        detail="differs from the reference at step 12",
        curves={"run 1": TINY, "run 2": TINY, "reference": BASE},
        differences=[{"section": "losses", "key": None, "kind": "value", "step": 12, "max_abs": 1e-7}],
        max_abs={"losses": 8e-7},
        context=context,
        compared_with="cuda-a100",
    )
    passing = check("test_jobs.py::test_ok", "passed")
    page = render_html(report(passing, failing))
    self_contained(page)
    assert page.index("test_jobs.py::test_train") < page.index("test_jobs.py::test_ok")  # failures first
    assert "Changed since the reference was recorded" in page
    for line in context:
        assert html.escape(line) in page
    assert "DIFFERS · cpu" in page and 'data-outcome="failed"' in page and "test failed" in page
    assert page.count('data-plot="diff"') == 1  # the identical passing check gets a note, not a plot
    assert page.count('data-plot="loss"') == 2 and page.count("<img ") == 3
    assert 'data-plot="identical"' in page and "identical to the reference" in page
    assert "compared with" in page and "cuda-a100" in page


def test_context_is_only_shown_for_failing_checks() -> None:
    passing = check("test_jobs.py::test_ok", "passed-cross-env", context=["config lr: reference 0.05, this run 0.1"])
    page = render_html(report(passing))
    assert "Changed since the reference was recorded" not in page
    assert "this run 0.1" not in page


def test_test_failed_verdict_and_failed_test_are_never_shown_as_a_pass() -> None:
    agreed_then_failed = check("test_a.py::test_assert", "test-failed", test_outcome="failed")
    passed_check_error = check("test_a.py::test_teardown", "passed", test_outcome="error")
    fine = check("test_a.py::test_fine", "passed")
    page = render_html(report(fine, passed_check_error, agreed_then_failed))
    assert page.index("test_a.py::test_teardown") < page.index("test_a.py::test_fine")
    assert page.index("test_a.py::test_assert") < page.index("test_a.py::test_fine")
    assert "TEST-FAILED" in page and 'data-outcome="failed"' in page
    assert "TEST ERROR (check: passed)" in page  # the check's pass is not what the header says
    header = re.search(r'<h2>test_a.py::test_teardown</h2>\s*<div class="verdict" style="color:([^"]+)"', page)
    assert header is not None and header.group(1) == "#cf222e"
    assert "1 test-failed" in page and "tests: " in page and "1 error" in page


def test_statistical_check_labels_curves_by_seed_and_tabulates_values() -> None:
    seeds = [123, 456, 789]
    ref_seeds = [123, 456, 789]
    losses = [[v + 0.01 * k for v in BASE] for k in range(3)]
    stat = {
        "seeds": seeds,
        "metrics": {"score": [0.91, 0.925, 0.9175]},
        "losses": losses,
        "reference": {
            "seeds": ref_seeds,
            "metrics": {"score": [0.9, 0.93, 0.915]},
            "losses": [[v + 0.01 * k + 1e-6 for v in BASE] for k in range(3)],
        },
    }
    t = check(
        "test_stat.py::test_noisy",
        "passed",
        curves={
            "run 1": losses[0],
            "run 2": losses[1],
            "run 3": losses[2],
            "reference": stat["reference"]["losses"][0],
        },
        statistical=stat,
        details=["score: reference mean 0.915 -> 0.9175 -> equivalent (TOST p=0.012)"],
    )
    page = render_html(report(t))
    self_contained(page)
    assert 'data-table="seeds"' in page
    for s in seeds:
        assert f"<th>seed {s}</th>" in page
    assert "<td>this run</td>" in page and "<td>reference</td>" in page
    assert "0.925" in page and "0.93" in page and "0.9175" in page  # a value and the mean of this run
    assert 'data-plot="diff"' in page  # each seed against the reference's run of the same seed
    assert "TOST p=0.012" in page
    assert "123, 456, 789" in page


def test_run_to_run_divergence_plots_against_run_1() -> None:
    t = check(
        "test_nd.py::test_nondeterministic",
        "diverged",
        path=None,
        curves={"run 1": BASE, "run 2": TINY},
        differences=[{"section": "losses", "key": None, "kind": "value", "step": 14, "max_abs": 3e-7}],
        detail="run 2 diverged from run 1 at step 14",
    )
    page = render_html(report(t))
    self_contained(page)
    assert page.count('data-plot="diff"') == 1 and "against the run 1" in page
    assert "DIVERGED" in page


def schema_1(t: dict[str, Any]) -> dict[str, Any]:
    """A per-check outcome as schema 1 wrote it: no test_outcome, context or statistical."""
    return {k: v for k, v in t.items() if k not in ("test_outcome", "context", "statistical")}


def test_old_schema_1_report_still_renders(tmp_path: Path) -> None:
    old = schema_1(check("test_old.py::test_x", "differs", curves={"run 1": TINY, "reference": BASE}))
    page_path = tmp_path / "out" / "report.html"
    write_html(page_path, report(old, schema_1(check("test_old.py::test_y", "passed")), version=1))
    page = page_path.read_text(encoding="utf-8")
    self_contained(page)
    assert "data-outcome" not in page and "Changed since" not in page and "tests: " not in page
    assert page.count('data-plot="diff"') == 1 and page.count('data-plot="loss"') == 2
    assert page.index("test_old.py::test_x") < page.index("test_old.py::test_y")


def test_difference_plot_is_a_png_with_zero_floor() -> None:
    from pytest_repro._publish.report_plots import diff_plot_png

    png = diff_plot_png({"run 1 − reference": [0.0, 0.0, 1e-7, float("nan"), 2e-7]}, 2, 2, "t")
    assert png.startswith(b"\x89PNG")
