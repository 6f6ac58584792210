"""The measured noise floor: its arithmetic (properties), its parsing, and the job-side perturbation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_repro._judge import noise, stored_floor
from pytest_repro._judge.noise import Floor, NoiseFloor, floor_of, judge
from pytest_repro._judge.noise_verdict import match_noise
from pytest_repro._judge.tolerances import Noise, ToleranceError, parse_tolerance
from pytest_repro.record import Record

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
small = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


def record(losses: list[float], metric: float = 1.0, w: torch.Tensor | None = None) -> Record:
    weights = {"w": w if w is not None else torch.ones(3)}
    return Record(losses=list(losses), weights=weights, metrics={"m": metric}, outputs={})


def shifted(base: Record, by: list[float], metric_by: float = 0.0, w_by: float = 0.0) -> Record:
    return record(
        [x + d for x, d in zip(base.losses, by, strict=True)],
        base.metrics["m"] + metric_by,
        base.weights["w"] + w_by,
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=8), st.data())
def test_a_floor_is_never_negative_never_below_a_few_ulps_and_grows_with_the_steps(base_losses, data) -> None:
    base = record(base_losses)
    moves = data.draw(st.lists(st.lists(small, min_size=len(base_losses), max_size=len(base_losses)), min_size=1))
    fl = floor_of(base, [shifted(base, m) for m in moves])
    assert all(f >= 0 for f in fl.losses)
    assert all(f >= noise.MIN_ULPS * 2**-23 * abs(v) * 0.999 for f, v in zip(fl.losses, base_losses, strict=True))
    assert all(b >= a - noise.MIN_ULPS * 2**-23 * 1e6 for a, b in zip(fl.losses, fl.losses[1:], strict=False))


@settings(max_examples=60, deadline=None)
@given(st.lists(small, min_size=3, max_size=3), st.floats(min_value=1.0, max_value=100.0))
def test_the_floor_is_monotone_in_the_perturbation(moves, factor) -> None:
    base = record([3.0, 2.0, 1.0], metric=0.5)
    weak = floor_of(base, [shifted(base, moves, metric_by=moves[0], w_by=moves[1])])
    strong = floor_of(base, [shifted(base, [m * factor for m in moves], moves[0] * factor, moves[1] * factor)])
    assert all(s >= w for s, w in zip(strong.losses, weak.losses, strict=True))
    assert strong.metrics["m"] >= weak.metrics["m"]
    assert strong.weights["w"] >= weak.weights["w"] * 0.999999


@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=0.0, max_value=1e3), st.floats(min_value=1e-9, max_value=1e3), st.floats(0.5, 20))
def test_ratio_arithmetic(diff, floor, k) -> None:
    r = noise.Ratio("metrics", "m", None, diff, floor)
    assert r.ratio >= 0
    assert r.ratio == pytest.approx(diff / floor)
    assert noise.exceeds(r, k) == (diff / floor > k)


@pytest.mark.parametrize(
    ("diff", "floor"), [(math.nan, 1.0), (1.0, math.nan), (math.nan, math.nan), (1.0, 0.0), (math.inf, 1.0)]
)
def test_nan_and_a_zero_floor_never_pass(diff, floor) -> None:
    r = noise.Ratio("losses", None, 3, diff, floor)
    assert noise.exceeds(r, 1e9)


def test_nothing_differs_nothing_exceeds_and_a_nan_run_fails() -> None:
    base = record([1.0, 0.5])
    fl = NoiseFloor(("rounding",), 2, 0.0, floor_of(base, [shifted(base, [0.0, 1e-3])]))
    assert judge(base, base, fl, 6.0).ok
    nan_run = record([1.0, math.nan])
    j = judge(base, nan_run, fl, 6.0)
    assert not j.ok
    assert j.first_beyond is not None and j.first_beyond.step == 1


def test_a_difference_is_judged_in_units_of_its_own_floor() -> None:
    base = record([2.0, 1.0, 0.5], metric=0.7, w=torch.tensor([1.0, 2.0, 3.0]))
    perturbed = shifted(base, [0.0, 1e-3, 2e-3], metric_by=1e-3, w_by=1e-3)
    fl = NoiseFloor(("rounding", "random streams"), 1, 0.5, floor_of(base, [perturbed]))
    within = shifted(base, [0.0, 2e-3, 5e-3], metric_by=4e-3, w_by=3e-3)
    m = match_noise(base, within, Noise(k=6.0), fl, "reference")
    assert m.ok, m.lines
    assert m.lines[0].startswith("largest difference 4 x the noise floor")
    assert m.noise is not None and m.noise["resolution"][0] == "m above 0.006"
    beyond = shifted(base, [0.0, 2e-3, 5e-2], metric_by=1e-4)
    m = match_noise(base, beyond, Noise(k=6.0), fl, "reference")
    assert not m.ok
    assert m.where == "at step 2"
    assert m.lines[0] == "at step 2: differs by 0.05 = 25 x the noise floor 0.002 (limit 6 x)"


def test_structure_must_match_exactly() -> None:
    base = record([2.0, 1.0])
    fl = NoiseFloor(("rounding",), 2, 0.0, floor_of(base, [shifted(base, [1.0, 1.0])]))
    m = match_noise(base, record([2.0]), Noise(), fl, "reference")
    assert not m.ok and "length" in m.differences[0]["kind"]
    m = match_noise(base, record([2.0, 1.0], w=torch.ones(4)), Noise(), fl, "reference")
    assert not m.ok and m.differences[0]["kind"] == "shape"


def test_floor_round_trips_and_crafted_floors_are_refused() -> None:
    base = record([2.0, 1.0])
    fl = NoiseFloor(("rounding",), 2, 1.25, floor_of(base, [shifted(base, [1e-3, 1e-3])]), source="here")
    assert NoiseFloor.from_dict(fl.to_dict(), "here") == fl
    for bad in ({**fl.to_dict(), "losses": [-1.0]}, {**fl.to_dict(), "metrics": {"m": "x"}}, {"parts": "x"}, []):
        with pytest.raises(ValueError):
            NoiseFloor.from_dict(bad, "crafted")  # type: ignore[arg-type]


def test_noise_tolerances_parse_and_bad_ones_say_why() -> None:
    assert parse_tolerance("noise").noise == Noise()
    assert parse_tolerance({"mode": "noise", "k": 3, "runs": 4}).noise == Noise(3.0, 4)
    for bad, why in (
        ({"mode": "noise", "k": 0}, "k: expected a finite number > 0"),
        ({"mode": "noise", "runs": 1}, "2 to 100 perturbed runs"),
        ({"mode": "noise", "kk": 1}, "unknown key(s) ['kk']"),
        ({"mode": "nois"}, "the modes are 'statistical' and 'noise'"),
    ):
        with pytest.raises(ToleranceError, match=None) as exc:
            parse_tolerance(bad)
        assert why in str(exc.value)


# ---------------------------------------------------------------- the job-side perturbation


def _train(dropout: float, seed: int = 0, perturb: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    from pytest_repro._exec.perturb import perturbed

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(dropout), torch.nn.Linear(16, 1))
    x = torch.randn(32, 8)
    with perturbed(perturb) if perturb is not None else _nothing() as counts:
        for _ in range(3):
            model(x).pow(2).mean().backward()
    after = torch.randn(4)  # what the job would draw next from the global generator (a batch, say)
    return model[0].weight.grad.clone(), after, counts


class _nothing:
    def __enter__(self) -> dict:
        return {}

    def __exit__(self, *exc: object) -> None:
        return None


def test_random_streams_change_dropout_masks_but_not_the_global_stream() -> None:
    plain_grad, plain_next, _ = _train(0.5)
    grad, nxt, counts = _train(0.5, perturb=1)
    assert counts["streams"] == 3 and counts["rounding"] > 0
    assert not torch.equal(grad, plain_grad)  # other masks
    assert torch.equal(nxt, plain_next)  # what the job draws later is unchanged: data order is kept
    again, _, _ = _train(0.5, perturb=1)
    assert torch.equal(again, grad)  # a perturbation is itself reproducible


def test_without_dropout_only_rounding_moves_and_only_by_ulps() -> None:
    plain_grad, _, _ = _train(0.0)
    grad, _, counts = _train(0.0, perturb=2)
    assert counts["streams"] == 0 and counts["rounding"] == 12  # 4 modules (Sequential too) x 3 forwards
    assert not torch.equal(grad, plain_grad)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-5, atol=1e-6)


def test_draws_from_the_jobs_own_generators_are_left_alone() -> None:
    from pytest_repro._exec.perturb import perturbed

    gen = torch.Generator().manual_seed(5)
    expected = torch.bernoulli(torch.full((64,), 0.5), generator=torch.Generator().manual_seed(5))
    with perturbed(3) as counts:
        got = torch.bernoulli(torch.full((64,), 0.5), generator=gen)
    assert torch.equal(got, expected) and counts["streams"] == 0


def test_statistical_without_a_margin_takes_k_times_the_measured_floor() -> None:
    from pytest_repro import statistical
    from pytest_repro._judge.stats import compare_statistical

    stat = parse_tolerance(statistical(seeds=3)).statistical
    assert stat is not None and stat.margin is None and "measured" in stat.describe()
    ref = {"seeds": [1, 2, 3], "metrics": {"m": [1.0, 1.1, 0.9]}, "losses": [[2.0, 1.0]] * 3}
    new = {"seeds": [1, 2, 3], "metrics": {"m": [1.01, 1.11, 0.91]}, "losses": [[2.0, 1.0]] * 3}
    with pytest.raises(KeyError, match="no measured noise floor"):
        compare_statistical(ref, new, stat)
    (wide,), band = compare_statistical(ref, new, stat, ({"m": 0.05}, [1e-3, 1e-3]))
    assert wide.margin == 0.05 and wide.equivalent and band is None
    (narrow,), _ = compare_statistical(ref, new, stat, ({"m": 0.001}, [1e-3, 1e-3]))
    assert narrow.margin == 0.001 and not narrow.equivalent
    given = parse_tolerance(statistical(seeds=3, margin=0.2)).statistical
    assert given is not None
    (hand,), _ = compare_statistical(ref, new, given, ({"m": 0.001}, [1e-3, 1e-3]))
    assert hand.margin == 0.2  # a hand-given margin wins


def test_every_bernoulli_overload_is_replaced_and_infinities_stay_infinite() -> None:
    from pytest_repro._exec.perturb import perturbed

    def draws() -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        probs = torch.bernoulli(torch.full((64,), 0.3))  # bernoulli(probs): the overload a hand-made mask uses
        torch.bernoulli(torch.ones(4), 0.5)
        torch.full((4,), 0.5).bernoulli_(torch.full((4,), 0.2))
        return probs, torch.randn(3)  # what the job draws next from the global generator

    plain, after_plain = draws()
    with perturbed(7) as counts:
        probs, after = draws()
        out = torch.nn.Linear(2, 2)(torch.tensor([[float("-inf"), 1.0]]))
    assert counts["streams"] == 3 and not torch.equal(probs, plain)
    assert torch.equal(after, after_plain)  # the global stream advanced exactly as without the perturbation
    assert not out.isnan().any()  # an infinite output is left as it is, not nudged into NaN


def test_perturbed_runs_that_break_are_named_not_measured() -> None:
    base = record([2.0, 1.0], metric=0.5)
    cases = {
        "another structure than run 1: losses": record([2.0]),
        "loss at step 1 is not finite": record([2.0, math.nan], metric=0.5),
        "metrics['m'] is not finite": record([2.0, 1.0], metric=math.nan),
    }
    for why, run in cases.items():
        problem = noise.floor_run_problem(base, [run], floor_of(base, [run]) if len(run.losses) == 2 else Floor())
        assert problem is not None and why in problem, problem
    fine = shifted(base, [1e-3, 1e-3])
    assert noise.floor_run_problem(base, [fine], floor_of(base, [fine])) is None


def test_a_stored_floor_must_fit_its_reference_and_be_plausible() -> None:
    base = record([2.0, 1.0], metric=0.5)
    here = NoiseFloor(("rounding",), 2, 0.1, floor_of(base, [shifted(base, [1e-3, 1e-3], metric_by=1e-3)]))
    assert stored_floor.stored_floor_problem(here, base) is None and stored_floor.implausible(here, here) is None
    longer = NoiseFloor(("rounding",), 2, 0.1, Floor((1.0, 1.0, 1.0), {"m": 1.0}, {"w": 1.0}, {}))
    assert "3 loss steps, the reference has 2" in str(stored_floor.stored_floor_problem(longer, base))
    other_keys = NoiseFloor(("rounding",), 2, 0.1, Floor((1.0, 1.0), {"x": 1.0}, {"w": 1.0}, {}))
    assert "metrics are not the reference's" in str(stored_floor.stored_floor_problem(other_keys, base))
    huge = NoiseFloor(("rounding",), 2, 0.1, Floor((1e300, 1e300), {"m": 1e300}, {"w": 1e300}, {}))
    assert "x the" in str(stored_floor.implausible(huge, here))
    with pytest.raises(ValueError, match="at least 2 perturbed runs"):
        NoiseFloor.from_dict({**here.to_dict(), "runs": 1}, "crafted")


def test_noise_is_a_whole_record_tolerance_and_its_options_are_bounded() -> None:
    with pytest.raises(ToleranceError, match="'noise' judges the whole record"):
        parse_tolerance({"metrics": "noise"})
    with pytest.raises(ToleranceError, match="2 to 100 perturbed runs"):
        parse_tolerance({"mode": "noise", "runs": 10**9})
    assert parse_tolerance({"mode": "noise", "k": "1e-3"}).noise == Noise(1e-3, 2)  # YAML 1.1 reads 1e-3 as text
    with pytest.raises(ToleranceError, match="k: expected a number"):
        parse_tolerance({"mode": "noise", "k": "six"})
