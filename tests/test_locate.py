"""Where a difference from the reference starts: module digests recorded at regen, compared on failure."""

from __future__ import annotations

import json

import pytest

from pytest_repro._judge.locate import compact, where_it_starts

JOB = """
import pytest
import torch


class Scale(torch.nn.Module):
    def forward(self, x):
        return x * SCALE


def train(ctx):
    torch.manual_seed(ctx.seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), Scale(),
        torch.nn.Linear(8, 8), torch.nn.Linear(8, 1),
    )
    if NUDGE:
        with torch.no_grad():  # one bias element of module 4 moved by one ulp before training
            b = model[4].bias
            b[0] = torch.nextafter(b[0], torch.tensor(1.0))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "weights": dict(model.state_dict())}


@pytest.mark.reproducible
def test_loc(repro):
    repro.check(train)
"""


def job(nudge: bool = False, scale: str = "1.0") -> str:
    return JOB.replace("NUDGE", str(nudge)).replace("SCALE", scale)


@pytest.fixture
def project(heavy_modules: None, pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini("[pytest]\nrepro_timeout = 60\n")
    pytester.makepyfile(test_loc=job())
    pytester.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    return pytester


def digests_of(p: pytest.Pytester) -> list[dict[str, object]]:
    (folder,) = (p.path / "reference_outputs" / "test_loc" / "test_loc").iterdir()
    return json.loads((folder / "digests.json").read_text())


@pytest.mark.slow
def test_a_one_ulp_change_of_a_parameter_is_located_to_its_module(project: pytest.Pytester) -> None:
    stored = digests_of(project)
    assert [e["name"] for e in stored if e["step"] == 0 and e["kind"] == "module"] == [
        "0",
        "1",
        "2",
        "3",
        "4",
        "5",
        "(model)",
    ]
    assert len(json.dumps(stored)) < 8000  # a few KB
    project.makepyfile(test_loc=job(nudge=True))
    result = project.runpytest("--repro", "--repro-report=r.json", "--repro-html=r.html")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "Where it starts (this run's first 2 steps against the reference's module digests): module `4` output at "
            "step 0 differs from the reference's while its input matched: its own parameters or buffers differ from "
            "the reference's: they changed",
            "If the change is intended, regenerate the reference with: "
            "pytest --repro --repro-regen test_loc.py::test_loc",
        ]
    )
    test = json.loads((project.path / "r.json").read_text())["tests"][0]
    assert test["details"][-1].startswith("module `4` output at step 0 differs")
    assert test["origin"] == test["details"][-1]  # its own field in the JSON report (schema), and in the HTML
    assert 'data-origin="1">module `4` output at step 0 differs' in (project.path / "r.html").read_text()


@pytest.mark.slow
def test_a_change_of_a_modules_code_is_located_to_it(project: pytest.Pytester) -> None:
    project.makepyfile(test_loc=job(scale="1.001"))
    result = project.runpytest("--repro")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "Where it starts *: module `3` output at step 0 differs from the reference's while its input matched: its "
            "own parameters match: its code (or an op it calls) changed",
        ]
    )


@pytest.mark.slow
def test_a_reference_without_digests_gets_them_at_the_next_regen(project: pytest.Pytester) -> None:
    (folder,) = (project.path / "reference_outputs" / "test_loc" / "test_loc").iterdir()
    (folder / "digests.json").unlink()
    project.makepyfile(test_loc=job(nudge=True))
    result = project.runpytest("--repro")
    result.assert_outcomes(failed=1)
    assert "Where it starts" not in result.stdout.str()  # never a claim without the recorded digests
    project.makepyfile(test_loc=job())
    result = project.runpytest("--repro", "--repro-regen", "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["WRITTEN*test_loc.py::test_loc*same values; digests.json recorded*"])
    assert (folder / "digests.json").is_file()
    project.runpytest("--repro", "--repro-regen").stdout.fnmatch_lines(["UNCHANGED*"])


def test_crafted_digests_never_crash_and_never_locate() -> None:
    traced = [{"step": 0, "name": "0", "kind": "module", "sha256": "a" * 64, "args": "b" * 64, "own": "c" * 64}]
    for crafted in ({"not": "a list"}, [1, 2], [{"step": "0"}], None):
        assert where_it_starts(crafted, traced).startswith("the reference's digests.json is not a list")
    same = compact(traced)
    assert where_it_starts(same, traced).startswith("every module's output matched the reference's in steps 0-0")
    moved = [{**traced[0], "sha256": "d" * 64, "args": "e" * 64}]
    assert "its arguments already differ" in where_it_starts(same, moved)
    renamed = [{**traced[0], "name": "other"}]
    assert "the model's structure or control flow changed" in where_it_starts(same, renamed)


UNSEEDED = """
import os
import pytest
import torch


class Jitter(torch.nn.Module):
    def forward(self, x):
        return x + (int.from_bytes(os.urandom(2), "little") + 1) * 1e-7  # unseeded noise, from step 0


def train(ctx):
    torch.manual_seed(ctx.seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), Jitter(), torch.nn.Linear(8, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "weights": dict(model.state_dict())}


@pytest.mark.reproducible
def test_jitter(repro):
    repro.check(train)
"""


@pytest.mark.slow
def test_unseeded_noise_in_a_custom_module_is_located_to_it_and_its_op(
    heavy_modules: None, pytester: pytest.Pytester
) -> None:
    pytester.makeini("[pytest]\nrepro_timeout = 60\n")
    pytester.makepyfile(test_jitter=UNSEEDED)
    result = pytester.runpytest("--repro", "--repro-diagnose")
    result.assert_outcomes(failed=1)
    line = next(i for i, text in enumerate(UNSEEDED.splitlines()) if "os.urandom" in text)
    result.stdout.fnmatch_lines(
        [
            "Diagnosis (two more runs, *): module `2` output at step 0 differs while its inputs matched: this module "
            "computes nondeterministically or draws unseeded randomness (*); the first op whose output differs while "
            f"its inputs matched: aten.add.Tensor in module `2` (test_jitter.py:{line}) at step 0*",
        ]
    )
