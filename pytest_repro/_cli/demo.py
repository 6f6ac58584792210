"""``pytest-repro demo``: the gate's whole loop in a throw-away project — record, pass, change, fail."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

TEST_FILE = "test_demo.py"
TEST = textwrap.dedent(
    """\
    import pytest
    from pytest_repro.jobs import lora_finetune   # the built-in LoRA job; its tiny data ships with pytest-repro

    CONFIG = {{"train": {{"steps": 8, "lr": {lr}}}}}

    @pytest.mark.reproducible                      # default tolerance: bitwise
    def test_lora_is_reproducible(repro):
        repro.check(lora_finetune, config=CONFIG)
    """
)
INI = "[pytest]\nrepro_reference_dir = reference_outputs\n"
LR, CHANGED_LR = "0.002", "0.0021"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments (its one-line help is its row in ``cli.COMMANDS``)."""
    parser.add_argument(
        "--keep", metavar="DIR", help="build the demo project in DIR and keep it (default: a temp folder)"
    )


def command(args: argparse.Namespace) -> int:
    """Run the demo (in --keep's folder, if given); return its exit code."""
    return run(Path(args.keep) if args.keep else None)


def _step(title: str, project: Path, args: list[str], expect: int) -> bool:
    """Run pytest in the project, stream its output, and say whether it exited as expected."""
    command = ["pytest", *args]
    print(f"\n=== {title}\n$ {' '.join(command)}", flush=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    code = subprocess.call([sys.executable, "-m", *command], cwd=project, env=env)
    if code != expect:
        print(f"pytest-repro demo: expected exit code {expect} from this step, got {code}", file=sys.stderr)
    return code == expect


def run(keep: Path | None = None) -> int:
    """Run the demo in ``keep`` (or a temporary folder); return 0 when every step behaved as expected."""
    with tempfile.TemporaryDirectory(prefix="pytest-repro-demo-") as tmp:
        project = keep if keep is not None else Path(tmp)
        project.mkdir(parents=True, exist_ok=True)
        (project / "pytest.ini").write_text(INI, encoding="utf-8")
        test = project / TEST_FILE
        test.write_text(TEST.format(lr=LR), encoding="utf-8")
        print(f"pytest-repro demo in {project}:\n\n{test.read_text(encoding='utf-8')}")
        # The demo's project is its own: recording there is what a user does once, so CI's refusal does not apply.
        force = ["--repro-regen-force"] if os.environ.get("CI") else []
        common = ["-q", "--no-header", "-p", "no:cacheprovider"]
        ok = _step(
            "1. record the reference (once, and after an intentional change)",
            project,
            ["--repro", "--repro-regen=missing", *force, *common],
            0,
        )
        ok = ok and _step(
            "2. check: two fresh runs, bitwise equal to each other and to the reference",
            project,
            ["--repro", *common],
            0,
        )
        test.write_text(TEST.format(lr=CHANGED_LR), encoding="utf-8")
        print(f"\n=== 3. a deliberate change: the learning rate {LR} -> {CHANGED_LR} in {TEST_FILE}")
        ok = ok and _step(
            "   check again: the gate fails and says where and by how much", project, ["--repro", *common], 1
        )
        if ok:
            print(
                "\nThe gate works: the reference passed bitwise and the changed run failed. After an intentional "
                "change you would now run `pytest --repro --repro-regen` and review `git diff reference_outputs/`."
            )
        return 0 if ok else 1
