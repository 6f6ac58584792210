"""The pure decisions (policy.py) and the verdict reconciliation, on hand-made records: no process, no pytest run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from pytest_repro._judge import policy  # noqa: E402
from pytest_repro._judge.tolerances import CLOSE, ToleranceSpec  # noqa: E402
from pytest_repro._judge.verdict import CheckOutcome, Verdict, reconcile  # noqa: E402
from pytest_repro.check import ValueByValue  # noqa: E402
from pytest_repro.record import Record  # noqa: E402
from pytest_repro.storage import Reference  # noqa: E402


def rec(losses: list[float], w: float = 1.0, dtype: str = "float32", seed: int = 1) -> Record:
    return Record(losses=losses, weights={"w": torch.full((4,), w)}, meta={"seed": seed, "dtype": dtype})


def facts(regen: str | None = None, tolerance: ToleranceSpec | None = None) -> policy.Facts:
    strategy = ValueByValue(tolerance or ToleranceSpec())
    return policy.Facts("t.py::test", regen, strategy, ToleranceSpec(default=CLOSE), {}, {}, {})


def ref(record: Record, folder: str = "cpu-amd-avx512") -> Reference:
    return Reference(Path(folder), record, {}, {"config": {}})


def test_same_environment_reference_passes_or_differs() -> None:
    found = policy.Found("cpu-amd-avx512", Path("x/cpu-amd-avx512"), here=ref(rec([1.0, 0.5])))
    assert policy.against_reference(found, rec([1.0, 0.5]), facts()).verdict is Verdict.PASSED
    d = policy.against_reference(found, rec([1.0, 0.25]), facts())
    assert d.verdict is Verdict.DIFFERS and d.detail == "differs from the reference at step 1"
    assert "pytest --repro --repro-regen t.py::test" in d.message and not d.write


def test_regen_all_writes_only_what_changed_and_missing_never_replaces() -> None:
    here = ref(rec([1.0, 0.5]))
    found = policy.Found("k", Path("x/k"), here=here)
    assert policy.against_reference(found, rec([1.0, 0.5]), facts("all")).verdict is Verdict.UNCHANGED
    changed = policy.against_reference(found, rec([1.0, 0.4]), facts("all"))
    assert changed.verdict is Verdict.WRITTEN and changed.write
    assert policy.against_reference(found, rec([1.0, 0.4]), facts("missing")).verdict is Verdict.DIFFERS
    corrupt = policy.Found("k", Path("x/k"), problem=("corrupt", "sha256 mismatch"))
    assert policy.against_reference(corrupt, rec([1.0]), facts("missing")).verdict is Verdict.CORRUPT
    assert policy.against_reference(corrupt, rec([1.0]), facts("all")).write
    blocked = policy.Found("k", Path("x/k"), problem=("blocked", "x/k: is a file"))
    unreadable = policy.Found("k", Path("x/k"), problem=("unreadable", "x: OSError: [Errno 24] Too many open files"))
    for regen in (None, "missing", "all"):
        d = policy.against_reference(blocked, rec([1.0]), facts(regen))
        assert d.verdict is Verdict.ERROR and not d.write and "move it out of the way" in d.message
        d = policy.against_reference(unreadable, rec([1.0]), facts(regen))
        assert d.verdict is Verdict.ERROR and not d.write and "ulimit -n" in d.message
        assert "move it out of the way" not in d.message


def test_missing_and_cross_environment() -> None:
    none = policy.Found("cpu-intel-avx512", Path("x/cpu-intel-avx512"))
    d = policy.against_reference(none, rec([1.0]), facts())
    assert d.verdict is Verdict.MISSING and "--repro-regen=missing" in d.message
    other = policy.Found("cpu-intel-avx512", Path("x/cpu-intel-avx512"), others=[("cpu-amd-avx512", ref(rec([1.0])))])
    moved = rec([1.0 + 4.8e-7])  # the float32 difference measured across CPU kernels
    d = policy.against_reference(other, moved, facts())
    assert d.verdict is Verdict.PASSED_CROSS_ENV and "not bitwise" in d.detail and d.compared_with == "cpu-amd-avx512"
    d = policy.against_reference(other, rec([1.1]), facts())
    assert d.verdict is Verdict.DIFFERS and "this does not mean your change broke anything" in d.message


def test_half_precision_models_get_their_precision_across_environments() -> None:
    spec, described = policy.cross_env_spec(ToleranceSpec(default=CLOSE), rec([1.0], dtype="bfloat16"))
    assert described.startswith("close for a bfloat16 model") and spec.for_key("weights", "w").atol == 5e-2
    other = policy.Found("b", Path("x/b"), others=[("a", ref(rec([2.0], w=1.0, dtype="bfloat16")))])
    nearby = rec([2.0 + 2.7e-4], w=1.0 + 0.0078, dtype="bfloat16")  # measured bf16 drift
    assert policy.against_reference(other, nearby, facts()).verdict is Verdict.PASSED_CROSS_ENV
    f32_spec, f32_described = policy.cross_env_spec(ToleranceSpec(default=CLOSE), rec([1.0]))
    assert f32_spec == ToleranceSpec(default=CLOSE) and f32_described.startswith("close: ")
    far = rec([2.0 * 1.01], dtype="bfloat16")  # a 1% loss regression is not hidden
    assert policy.against_reference(other, far, facts()).verdict is Verdict.DIFFERS


def test_results_that_compare_nothing_or_hold_nan_are_refused() -> None:
    assert policy.invalid_results([Record(losses=[])], ToleranceSpec(), "t").verdict is Verdict.ERROR
    nan = Record(losses=[1.0], metrics={"acc": math.nan}, meta={"seed": 7})
    d = policy.invalid_results([rec([1.0]), nan], ToleranceSpec(), "t")
    assert d is not None and d.verdict is Verdict.NON_FINITE and "run 2 (seed 7)" in d.message


def test_run_to_run_names_the_first_divergent_step() -> None:
    d = policy.run_to_run([rec([1.0, 0.5, 0.2]), rec([1.0, 0.5, 0.3])], ToleranceSpec(), "t", True)
    assert d is not None and d.verdict is Verdict.DIVERGED and d.detail == "runs 1 and 2 diverge at step 2"
    assert policy.run_to_run([rec([1.0]), rec([1.0])], ToleranceSpec(), "t", True) is None


@pytest.mark.parametrize("verdict", [Verdict.PASSED, Verdict.WRITTEN, Verdict.UNCHANGED, Verdict.PASSED_CROSS_ENV])
@pytest.mark.parametrize("outcome", ["failed", "error", "skipped", "xfailed"])
def test_a_passing_verdict_never_survives_a_test_that_did_not_pass(verdict: Verdict, outcome: str) -> None:
    o = reconcile(CheckOutcome("t", None, verdict=verdict), outcome, "assert 0.4 > 0.5")
    assert o.verdict is Verdict.TEST_FAILED and outcome in o.detail and o.test_outcome == outcome
    assert reconcile(CheckOutcome("t", None, verdict=verdict), "passed").verdict is verdict
    assert CheckOutcome("t", None).verdict is Verdict.ERROR, "an outcome nobody decided is an error"
