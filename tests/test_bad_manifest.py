"""A reference whose manifest.yaml is not a manifest: used, but environment drift is said to be unknown."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import env_key, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_repro import cli
from pytest_repro.manifest import collect_manifest, manifest_problem
from pytest_repro.storage import parse_yaml, read_manifest

UNREADABLE = "environment drift unknown: manifest.yaml of the reference is unreadable ("
SAME_ENV = "Same config, seed, device, determinism and environment as the reference"


def alias_bomb(levels: int = 9) -> str:
    """YAML 'billion laughs': 9 ** levels strings from a few hundred bytes, if the aliases are followed."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
    return "schema: 2\npython: {version: '3.11'}\ntorch: {version: '2.0'}\n" + "\n".join(lines) + f"\nenv: *a{levels}\n"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("foo: bar\n", "no integer 'schema' field: not a pytest-repro manifest"),
        ("just some words\n", "a YAML str, not a mapping"),
        ("- 1\n- 2\n", "a YAML list, not a mapping"),
        ("schema: 2\npython: {}\n", "no 'torch' section"),
        ("schema: [unclosed\n", "not valid YAML: "),
        ("!!python/object/apply:os.system ['true']\n", "could not determine a constructor"),
        (alias_bomb(), "not valid YAML: found the alias *a0, which pytest-repro never writes (line 5"),
        ("[" * 50_000, "not valid YAML: nested too deeply"),
        ("a: 1\n" * 300_000, "larger than 1024 KiB"),
    ],
)
def test_an_unreadable_manifest_says_why(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "manifest.yaml"
    path.write_text(text)
    data, problem = read_manifest(path)
    assert data == {} and problem is not None and why in problem


def test_missing_and_binary_manifests_say_why(tmp_path: Path) -> None:
    assert read_manifest(tmp_path / "manifest.yaml") == ({}, "the file is missing")
    (tmp_path / "manifest.yaml").write_bytes(b"\xff\xfe\x00garbage")
    assert read_manifest(tmp_path / "manifest.yaml")[1].startswith("not UTF-8 text")  # type: ignore[union-attr]


def test_a_real_manifest_reads_back(tmp_path: Path) -> None:
    manifest = collect_manifest()
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    assert read_manifest(tmp_path / "manifest.yaml") == (manifest, None)


def test_an_alias_bomb_is_refused_fast_and_small(tmp_path: Path) -> None:
    (tmp_path / "manifest.yaml").write_text(alias_bomb(12))  # 9**12 strings if expanded
    tracemalloc.start()
    start = time.perf_counter()
    try:
        _, problem = read_manifest(tmp_path / "manifest.yaml")
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert problem is not None and "alias" in problem
    assert seconds < 2 and peak < 20 << 20, (seconds, peak)


def test_diff_refuses_an_alias_bomb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.yaml").write_text(alias_bomb())
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(collect_manifest()))
    assert cli.main(["diff", str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")]) == 2
    assert "is not valid YAML or JSON" in capsys.readouterr().err


YAMLISH = st.text(alphabet=st.sampled_from(list("ab:{}[]-&*!?,|>%#'\"\n 12")), max_size=60)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=YAMLISH | st.text(max_size=60))
def test_any_text_is_a_manifest_or_a_reason(tmp_path: Path, text: str) -> None:
    (tmp_path / "manifest.yaml").write_text(text, encoding="utf-8")
    data, problem = read_manifest(tmp_path / "manifest.yaml")  # never raises: every failure is a reason
    assert (problem is None and isinstance(data, dict) and "schema" in data) or (data == {} and problem)
    if problem is not None and not problem.startswith("not valid YAML"):  # parsed, but not a manifest
        assert manifest_problem(parse_yaml(text)) == problem


TEST = """
import pytest
from userjobs import train

@pytest.mark.reproducible
def test_train(repro):
    repro.check(train, config={{"steps": 4, "lr": {lr}}})
"""


def _manifest(p: pytest.Pytester) -> Path:
    return p.path / "reference_outputs" / "test_mf" / "test_train" / env_key() / "manifest.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["bomb", "garbage"])
def test_a_check_never_claims_an_environment_it_did_not_compare(userjobs: pytest.Pytester, bad: str) -> None:
    userjobs.makepyfile(test_mf=TEST.format(lr=0.05))
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    _manifest(userjobs).write_text(alias_bomb() if bad == "bomb" else "foo: bar\n")
    why = "found the alias *a0" if bad == "bomb" else "no integer 'schema' field"
    before = snapshot(userjobs.path / "reference_outputs")

    # a pass: used, and the summary says the environment was not compared, with the fix
    result = userjobs.runpytest("--repro", "-p", "no:cacheprovider", "--repro-report=r.json")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert "environment not compared: these passed, but their reference's manifest could not be read:" in out
    assert f"test_mf.py::test_train: {UNREADABLE}" in out and why in out
    assert "fix: restore reference_outputs/test_mf/test_train/" in out
    assert "or rewrite it from this run: pytest --repro --repro-regen test_mf.py::test_train" in out
    assert "numerics-relevant parts of the environment changed" not in out
    (check,) = json.loads((userjobs.path / "r.json").read_text())["tests"]
    assert check["drift"] and check["drift"][0].startswith(UNREADABLE)

    # a failure: the message says drift is unknown and never "same ... environment"
    userjobs.makepyfile(test_mf=TEST.format(lr=0.06))
    result = userjobs.runpytest("--repro", "--repro-report=r.json")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert SAME_ENV not in out
    assert "Changed since the reference was recorded:" in out and f"  {UNREADABLE}" in out and why in out
    (check,) = json.loads((userjobs.path / "r.json").read_text())["tests"]
    assert check["verdict"] == "differs" and check["drift"][0].startswith(UNREADABLE)
    assert snapshot(userjobs.path / "reference_outputs") == before, "the reference was changed"

    # same values again: the failure's context block alone says so, and --repro-regen rewrites the manifest
    userjobs.makepyfile(test_mf=TEST.format(lr=0.05))
    result = userjobs.runpytest("--repro", "--repro-regen")
    result.assert_outcomes(passed=1)
    assert "same values; manifest.yaml rewritten (it was unreadable: " in result.stdout.str()
    assert read_manifest(_manifest(userjobs))[1] is None


@pytest.mark.slow
def test_same_config_but_unknown_environment_is_said_in_one_line(userjobs: pytest.Pytester) -> None:
    userjobs.makepyfile(test_mf=TEST.format(lr=0.05))
    userjobs.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    folder = _manifest(userjobs).parent
    (folder / "manifest.yaml").unlink()
    record = json.loads((folder / "record.json").read_text())
    record["losses"][-1] += 1.0
    (folder / "record.json").write_text(json.dumps(record))
    result = userjobs.runpytest("--repro")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert SAME_ENV not in out
    assert (
        "Same config, seed, device and determinism as the reference; environment drift unknown: manifest.yaml of "
        "the reference is unreadable (the file is missing)." in out
    )


def _policy_case(problem: str | None) -> tuple[Any, Any, Any]:
    import torch

    from pytest_repro._judge import policy
    from pytest_repro._judge.tolerances import ToleranceSpec
    from pytest_repro.check import ValueByValue
    from pytest_repro.record import Record
    from pytest_repro.storage import Reference

    record = Record(losses=[1.0, 0.5], weights={"w": torch.ones(3)}, meta={"seed": 1})
    stored = Reference(Path("x/cpu-a"), record, {}, {"config": {}}, manifest_problem=problem)
    facts = policy.Facts("t.py::test", None, ValueByValue(ToleranceSpec()), ToleranceSpec(), {}, {}, collect_manifest())
    return stored, record, facts


def test_a_reference_from_another_environment_with_a_bad_manifest_says_drift_unknown() -> None:
    from pytest_repro._judge import policy

    stored, record, facts = _policy_case("no integer 'schema' field: not a pytest-repro manifest")
    found = policy.Found("cpu-b", Path("x/cpu-b"), others=[("cpu-a", stored)])
    decision = policy.against_reference(found, record, facts)
    assert decision.verdict.value == "passed-cross-env"
    assert decision.drift == [UNREADABLE + "no integer 'schema' field: not a pytest-repro manifest)"]


def test_regen_all_rewrites_an_unreadable_manifest_and_only_then(tmp_path: Path) -> None:
    from dataclasses import replace

    from pytest_repro._judge import policy

    for problem, verdict in (("the file is missing", "written"), (None, "unchanged")):
        stored, record, facts = _policy_case(problem)
        found = policy.Found("cpu-a", Path("x/cpu-a"), here=stored)
        decision = policy.against_reference(found, record, replace(facts, regen="all"))
        assert decision.verdict.value == verdict and decision.write == (problem is not None), decision.detail


def test_a_manifest_the_system_will_not_let_us_read_is_an_error_not_drift(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from pytest_repro import staging, storage

    _, record, _ = _policy_case(None)
    staging.write_reference(tmp_path / "cpu-a", record, collect_manifest(), {"config": {}})

    def refuse(path: Path, limit: int = 0) -> str:
        raise OSError(errno.EMFILE, "Too many open files", str(path))

    monkeypatch.setattr(storage, "read_yaml_text", refuse)
    with pytest.raises(OSError, match="Too many open files"):
        storage.load_reference(tmp_path / "cpu-a")
