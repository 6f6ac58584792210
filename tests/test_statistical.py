"""Statistical reproducibility: TOST equivalence across seeds, loss bands, same-seed spread."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("scipy")

from pytest_repro._judge.stats import TooFewSeedsError, compare_statistical, loss_band_exit, tost
from pytest_repro._judge.tolerances import Statistical, ToleranceError, parse_tolerance, statistical

samples = st.lists(st.floats(-100, 100, allow_nan=False), min_size=2, max_size=12)


@settings(deadline=None)
@given(samples, samples, st.floats(0, 10), st.sampled_from([0.9, 0.95, 0.99]))
def test_tost_is_symmetric(a: list[float], b: list[float], margin: float, confidence: float) -> None:
    ab, ba = tost("m", a, b, margin, confidence), tost("m", b, a, margin, confidence)
    assert ab.equivalent == ba.equivalent
    assert ab.p_value == pytest.approx(ba.p_value, rel=1e-9, abs=1e-12)
    assert ab.diff == pytest.approx(-ba.diff, rel=1e-9, abs=1e-9)


@settings(deadline=None)
@given(samples, samples)
def test_zero_margin_never_passes_when_samples_differ(a: list[float], b: list[float]) -> None:
    if sorted(a) == sorted(b):
        b = [*b[:-1], b[-1] + 1.0]
    assert not tost("m", a, b, 0.0, 0.95).equivalent


def test_tost_verdicts_and_report_line() -> None:
    ref = [1.00, 1.01, 0.99, 1.005, 0.995]
    close = [1.002, 1.012, 0.992, 1.001, 0.998]
    far = [x + 0.2 for x in close]
    ok = tost("score", ref, close, 0.05, 0.95)
    assert ok.equivalent and ok.ci_low > -0.05 and ok.ci_high < 0.05
    assert ok.describe().startswith("score: reference mean 1 (n=5), this run mean 1.001 (n=5), diff +0.001")
    assert "90% CI [" in ok.describe() and "margin ±0.05 -> equivalent (TOST p=" in ok.describe()
    assert not tost("score", ref, far, 0.05, 0.95).equivalent
    with pytest.raises(TooFewSeedsError, match="at least 2 values on each side"):
        tost("score", [1.0], close, 0.05, 0.95)


def test_paired_by_seed_identical_values_are_equivalent_at_any_positive_margin() -> None:
    # The README's example: 5 seeds whose eval_loss spreads by ~1e-2, margin 0.1% of ~3.78; rerun unchanged.
    ref = [3.781, 3.802, 3.764, 3.790, 3.771]
    welch = tost("eval_loss", ref, list(ref), 0.00378, 0.95)
    assert not welch.equivalent and welch.unresolved  # unpaired, the seeds' spread hides a zero difference
    assert welch.seeds_needed is not None and welch.seeds_needed > 5
    paired = tost("eval_loss", ref, list(ref), 0.00378, 0.95, paired=True)
    assert paired.equivalent and paired.diff == 0 and "paired by seed" in paired.describe()
    moved = tost("eval_loss", ref, [x + 0.01 for x in ref], 0.00378, 0.95, paired=True)
    assert not moved.equivalent and not moved.unresolved  # a real shift, known exactly: NOT equivalent


def test_unresolvable_margin_says_what_would_resolve_it() -> None:
    ref = [1.0, 1.02, 0.98, 1.01, 0.99]
    new = [1.01, 0.99, 1.0, 0.985, 1.015]
    e = tost("score", ref, new, 0.001, 0.95)
    assert e.unresolved and not e.equivalent
    text = e.explain_resolution()
    assert "is below what 5 seeds can resolve" in text and f"needs about {e.seeds_needed} seeds" in text
    assert "says neither that the code or data changed nor that they did not" in text
    assert e.half_width > e.margin
    # A margin above |diff| + the half-width is decided (equivalent here), not unresolved.
    wide = tost("score", ref, new, (abs(e.diff) + e.half_width) * 1.01, 0.95)
    assert wide.equivalent and not wide.unresolved


def test_a_difference_whose_ci_lies_outside_the_margin_is_not_equivalent_however_narrow_the_margin() -> None:
    # A real regression (+0.5) with a little per-seed noise: the CI is far outside ±0.001, so this is
    # established non-equivalence (DIFFERS), not an unresolvable margin.
    ref = [1.03, 0.96, 1.01, 0.99, 1.05]
    new = [x + 0.5 + n for x, n in zip(ref, [0.01, -0.02, 0.015, -0.005, 0.02], strict=True)]
    e = tost("score", ref, new, 0.001, 0.95, paired=True)
    assert e.ci_low > e.margin and e.half_width > e.margin
    assert not e.equivalent and not e.unresolved and "NOT equivalent" in e.describe()


def test_a_run_with_fewer_seeds_is_paired_on_the_seeds_both_ran() -> None:
    spec = Statistical(("score",), seeds=3, margin=0.01)
    reference = {"seeds": [7, 8, 9, 10, 11], "metrics": {"score": [1.0, 1.1, 0.9, 1.05, 0.95]}, "losses": []}
    new = {"seeds": [7, 8, 9], "metrics": {"score": [1.0, 1.1, 0.9]}, "losses": []}
    (result,), _ = compare_statistical(reference, new, spec)
    assert result.paired and result.n_ref == result.n_new == 3 and result.diff == 0 and result.equivalent
    other = {"seeds": [1, 2, 3], "metrics": {"score": [1.0, 1.1, 0.9]}, "losses": []}
    (welch,), _ = compare_statistical(reference, other, spec)
    assert not welch.paired and welch.n_ref == 5


@settings(deadline=None)
@given(
    st.lists(st.floats(-10, 10, allow_nan=False), min_size=3, max_size=8, unique=True),
    st.floats(0.01, 1.0),
    st.floats(1e-4, 0.5),
)
def test_seeds_needed_is_enough_seeds(base: list[float], scale: float, margin: float) -> None:
    # Unpaired samples whose spread makes `margin` unresolvable: with seeds_needed seeds of about the same
    # spread (the same values, repeated), equivalence of an identical sample is established.
    ref = [x * scale for x in base]
    e = tost("m", ref, list(ref), margin, 0.95)
    if not e.unresolved:
        return
    assume(e.seeds_needed is not None and e.seeds_needed <= 20_000)  # None: beyond MAX_SEEDS
    assert e.seeds_needed is not None and e.seeds_needed > len(ref)
    k = -(-e.seeds_needed // len(ref))
    more = ref * k
    assert tost("m", more, list(more), margin, 0.95).equivalent


def test_loss_band_reports_the_first_step_outside() -> None:
    spec = Statistical(margin=0.05)
    ref = [[2.0, 1.9, 1.8, 1.7], [2.01, 1.91, 1.79, 1.71], [1.99, 1.89, 1.81, 1.69]]
    assert loss_band_exit(ref, [list(t) for t in ref], spec) is None
    moved = [[t[0], t[1], t[2] + 0.5, t[3] + 0.5] for t in ref]
    exit_ = loss_band_exit(ref, moved, spec)
    assert exit_ is not None and exit_.step == 2


def test_statistical_tolerance_parsing() -> None:
    spec = parse_tolerance(statistical(metrics=["acc"], seeds=6, margin=0.001, relative=True))
    assert spec.statistical == Statistical(("acc",), 6, 0.001, True, 0.95, True, False)
    assert spec.statistical.margin_for(2.0) == pytest.approx(0.002)
    with pytest.raises(ToleranceError, match="needs at least 2 runs"):
        parse_tolerance({"mode": "statistical", "seeds": 1})
    with pytest.raises(ToleranceError, match=r"confidence: expected a number between 0\.5 and 1"):
        parse_tolerance({"mode": "statistical", "confidence": 1.5})
    with pytest.raises(ToleranceError, match="unknown mode 'bayes'"):
        parse_tolerance({"mode": "bayes"})


TEST = """
import pytest
from pytest_repro import statistical
from userjobs import noisy

@pytest.mark.reproducible(tolerance=statistical({args}))
def test_noisy(repro):
    result = repro.check(noisy, config={config})
    assert len(result.meta["statistical"]["seeds"]) == len(set(result.meta["statistical"]["seeds"]))
"""


@pytest.mark.slow
def test_statistical_pass_then_fail_beyond_margin(userjobs: pytest.Pytester) -> None:
    args = 'metrics=["score"], seeds=5, margin=0.05'
    userjobs.makepyfile(test_stat=TEST.format(args=args, config="{}"))
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    # Same distribution, other seeds' values are not needed to be equal: shift within the margin passes.
    userjobs.makepyfile(test_stat=TEST.format(args=args, config='{"shift": 0.005}'))
    result = userjobs.runpytest("--repro", "-v")
    result.assert_outcomes(passed=1)
    userjobs.makepyfile(test_stat=TEST.format(args=args, config='{"shift": 0.2}'))
    result = userjobs.runpytest("--repro")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*score: reference mean * (n=5), this run mean * (n=5), diff +0.2*, 90% CI *, margin ±0.05 -> NOT equivalent*"]
    )


@pytest.mark.slow
def test_statistical_margin_below_the_resolution_is_inconclusive_not_a_change(userjobs: pytest.Pytester) -> None:
    args = 'metrics=["score"], seeds=3, margin=0.001'
    userjobs.makepyfile(test_stat=TEST.format(args=args, config="{}"))
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    userjobs.runpytest("--repro").assert_outcomes(passed=1)  # unchanged: paired by seed, the difference is 0
    userjobs.makepyfile(test_stat=TEST.format(args=args, config='{"jitter": 0.01}'))
    result = userjobs.runpytest("--repro")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*the statistical check is inconclusive, not failed*",
            "*score: the margin ±0.001 is below what 3 seeds can resolve*so no margin below ±* can be established*",
            "*Fix: widen the margin or run the seeds it needs*",
            "ERROR *test_stat.py::test_noisy (*): the margin of metrics*score* is below what these seeds can resolve",
        ]
    )
    assert "DIFFERS" not in result.stdout.str() and "regenerate the reference with" not in result.stdout.str()


@pytest.mark.slow
def test_statistical_loss_band(userjobs: pytest.Pytester) -> None:
    args = 'metrics=["score"], seeds=4, margin=0.05'
    userjobs.makepyfile(test_stat=TEST.format(args=args, config="{}"))
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    userjobs.makepyfile(test_stat=TEST.format(args=args, config='{"loss_shift": 1.0, "loss_shift_from": 3}'))
    result = userjobs.runpytest("--repro")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*losses: the mean loss leaves the reference band first at step 3:*"])


@pytest.mark.slow
def test_too_few_seeds_is_an_error_not_a_pass(userjobs: pytest.Pytester) -> None:
    userjobs.makepyfile(test_stat=TEST.format(args="seeds=1, margin=0.05", config="{}"))
    result = userjobs.runpytest("--repro", "--repro-regen")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*statistical mode needs at least 2 runs to estimate a spread, got 1*"])


@pytest.mark.slow
def test_same_seed_spread(userjobs: pytest.Pytester) -> None:
    args = 'metrics=["score"], seeds=3, margin=0.0, same_seed=True'
    userjobs.makepyfile(
        test_stat=TEST.format(args=args, config="{}").replace(
            "    assert len(result.meta",
            "    assert len(set(result.meta['statistical']['seeds'])) == 1 or len(result.meta",
        )
    )
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
