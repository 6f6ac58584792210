"""The README's examples and demo run as written, in a project that is not this repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TAGGED = re.compile(r"<!-- readme-test: (?P<name>[\w-]+) -->\n```python\n(?P<code>.*?)\n```", re.S)


def readme_examples() -> dict[str, str]:
    """Return the README's tagged Python examples by name."""
    return {m["name"]: m["code"] + "\n" for m in TAGGED.finditer(README.read_text(encoding="utf-8"))}


def test_the_packaged_data_of_the_built_in_job_is_the_fixtures() -> None:
    # lora_finetune without a data config uses the package's copy; this repository's configs use fixtures/.
    root = README.parent
    for name in ("corpus.jsonl", "splits_v1.json", "tokenizer.json"):
        packaged = root / "pytest_repro" / "jobs" / "data" / name
        assert packaged.read_bytes() == (root / "fixtures" / name).read_bytes(), "rerun fixtures/make_fixtures.py"


def test_a_missing_packaged_data_file_names_what_ships() -> None:
    from pytest_repro.context import JobContext
    from pytest_repro.jobs.lora import data_path

    ctx = JobContext.__new__(JobContext)
    with pytest.raises(
        FileNotFoundError, match=r"'package:nope.txt': pytest-repro ships no such data file .*package:corpus.jsonl"
    ):
        data_path(ctx, "package:nope.txt")


def test_a_data_path_that_is_not_a_file_names_its_key_and_the_shipped_data(tmp_path: Path) -> None:
    from pytest_repro.context import JobContext
    from pytest_repro.jobs.lora import data_path

    ctx = JobContext.__new__(JobContext)
    object.__setattr__(ctx, "config_dir", tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"data.splits: 'splits_v1.json' is not a file .*'package:splits_v1.json'"
    ):
        data_path(ctx, "splits_v1.json", "data.splits")
    (tmp_path / "mine.json").write_text("{}")
    assert data_path(ctx, "mine.json", "data.splits") == tmp_path / "mine.json"


def test_a_bundle_of_the_built_in_job_names_its_shipped_split_instead_of_a_missing_one(tmp_path: Path) -> None:
    import hashlib

    from pytest_repro._publish.bundle import Bundle
    from pytest_repro._publish.bundle.build import _add_inputs
    from pytest_repro.jobs import packaged_file

    split_sha = hashlib.sha256(packaged_file("package:splits_v1.json").read_bytes()).hexdigest()
    effective = {
        "data.splits": {"value": "package:splits_v1.json", "source": "default"},
        "data.corpus": {"value": "package:corpus.jsonl", "source": "default"},
        "train.lr": {"value": 0.002, "source": "default"},
    }
    bundle = Bundle(index={"files": {}})
    provenance = {"config_source": "dict", "config": {}, "effective_config": effective}
    _add_inputs(bundle, provenance, {"job_meta": {"split_sha256": split_sha}}, tmp_path)
    assert bundle.index["split"] == {"record_sha256": split_sha, "file": None, "packaged": "package:splits_v1.json"}
    assert bundle.index["data_files"]["package:corpus.jsonl"]["packaged"].startswith("pytest-repro ")
    assert not bundle.notes  # no claim that the split file changed
    other = Bundle()  # nothing bundled before the inputs
    _add_inputs(other, {**provenance, "effective_config": {}}, {"job_meta": {"split_sha256": split_sha}}, tmp_path)
    assert any("the split file changed" in note for note in other.notes)


def test_the_readme_contents_list_every_section_in_order() -> None:
    text = README.read_text(encoding="utf-8")
    sections = [line[3:].replace("`", "") for line in text.splitlines() if line.startswith("## ")]
    listed = re.findall(r"^- \[(.+?)\]\(#[\w-]+\)$", text.split("## Contents", 1)[1].split("\n## ", 1)[0], re.M)
    assert listed == [s for s in sections if s != "Contents"]


def test_the_readme_tags_its_runnable_examples() -> None:
    assert set(readme_examples()) >= {"first-example", "statistical-example"}


@pytest.mark.slow
@pytest.mark.parametrize(("name", "tests"), [("first-example", 2), ("statistical-example", 1)])
def test_readme_example_runs_as_written_in_a_separate_project(pytester: pytest.Pytester, name: str, tests: int) -> None:
    # pytester's folder has no fixtures/, no conftest and no reference: what a user starts from.
    pytester.makeini("[pytest]\nrepro_reference_dir = reference_outputs\n")
    pytester.makepyfile(test_example=readme_examples()[name])
    first = pytester.runpytest_subprocess("--repro", "--repro-regen=missing")
    first.assert_outcomes(passed=tests)
    first.stdout.fnmatch_lines([f"reproducibility: {tests} written*"])
    again = pytester.runpytest_subprocess("--repro")
    again.assert_outcomes(passed=tests)
    again.stdout.fnmatch_lines([f"reproducibility: {tests} passed*"])


@pytest.mark.slow
def test_the_demo_records_passes_then_fails_on_the_change(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest_repro.cli", "demo", "--keep", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert out.index("reproducibility: 1 written") < out.index("reproducibility: 1 passed")
    assert "config train.lr: reference 0.002, this run 0.0021 (user:dict)" in out
    assert "losses: first divergent step 1:" in out and "reproducibility: 1 differs" in out
    assert "regenerate the reference with: pytest --repro --repro-regen test_demo.py::test_lora_is_reproducible" in out
    assert "The gate works" in out
