"""One step of ``pytest-repro bisect``: run the tests at a commit and say what they show (good, bad, skip, diverged).

Every step runs ``python -m pytest --repro ARGS -o repro_reference_dir=<copy>`` in the worktree, in its own
process group (killed with bisect), with that commit's code first on ``PYTHONPATH`` (see ``step_env``), and is
classified from its exit code and JSON report (``classify``). The copy is the ``--good`` commit's reference
folder, found by asking pytest itself at ``--good`` (``Runner.probe``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._exec.procs import kill_group
from ..errors import FixableError
from .git import ENV_DROP

GOOD, BAD, SKIP, DIVERGED = "good", "bad", "skip", "diverged"
PROBE_MODULE = "_pytest_repro_bisect_probe"
PROBE_ENV = "PYTEST_REPRO_BISECT_PROBE"
_PASSING = frozenset({"passed", "passed-cross-env", "unchanged"})
_CHANGED = frozenset({"differs", "non-finite"})
_PYTEST_EXIT = {
    2: "pytest was interrupted (collection or import errors)",
    3: "pytest had an internal error",
    4: "pytest reported a usage error",
    5: "no tests were collected",
}

# Run in the --good commit's worktree as `pytest -p PROBE_MODULE ARGS`: pytest itself says which rootdir and
# repro_reference_dir those arguments give, then the run stops before collecting anything.
_PROBE = """
import json, os

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    try:
        value = config.getini("repro_reference_dir")
    except ValueError:  # the pytest-repro plugin is not loaded
        value = None
    with open(os.environ["PYTEST_REPRO_BISECT_PROBE"], "w", encoding="utf-8") as fh:
        json.dump({"rootdir": str(config.rootpath), "reference_dir": value}, fh)
    return 0
"""


class BisectError(FixableError):
    """Bisect cannot start or go on: ``problem`` and its ``fix``, and pytest's last output lines if any."""

    def __init__(self, problem: str, fix: str, output: Sequence[str] = ()) -> None:
        super().__init__(problem, fix)
        self.output = list(output)


@dataclass(frozen=True)
class Outcome:
    """What one run of the tests at a commit says: good, bad, skip or diverged, and one line why."""

    state: str
    reason: str
    details: tuple[str, ...] = ()  # bad: what differed (the check's differences and context)


def classify(returncode: int | None, report: dict[str, Any] | None, timeout: float | None = None) -> Outcome:
    """Classify one pytest run from its exit code and JSON report (None: killed after ``timeout`` s)."""
    if returncode is None:
        return Outcome(SKIP, f"the step took longer than {timeout:g} s (--step-timeout) and was killed")
    if returncode in _PYTEST_EXIT:
        return Outcome(SKIP, f"{_PYTEST_EXIT[returncode]} (exit {returncode})")
    if returncode not in (0, 1):
        how = f"signal {-returncode}" if returncode < 0 else f"exit {returncode}"
        return Outcome(SKIP, f"pytest ended with {how}")
    if report is None:
        return Outcome(SKIP, f"pytest exited {returncode} without writing its JSON report")
    tests = [t for t in report.get("tests") or [] if isinstance(t, dict)]
    compared = [t for t in tests if t.get("verdict") != "missing"]  # tests added after --good: no reference
    changed = [t for t in compared if t.get("verdict") in _CHANGED]
    if changed:
        first = changed[0]
        more = f" (and {len(changed) - 1} more check(s))" if len(changed) > 1 else ""
        return Outcome(BAD, check_line(first) + more, tuple(difference_lines(first)))
    diverged = [t for t in compared if t.get("verdict") == DIVERGED]
    if diverged:
        return Outcome(DIVERGED, check_line(diverged[0]))
    if not compared:
        missing = f" ({len(tests)} without a reference at --good)" if tests else ""
        return Outcome(SKIP, f"no reproducibility check was compared with the --good reference{missing}")
    other = [t for t in compared if t.get("verdict") not in _PASSING]
    if other:
        return Outcome(SKIP, check_line(other[0]))
    if len(compared) < len(tests):
        return Outcome(
            SKIP,
            f"{len(tests) - len(compared)} check(s) have no reference at --good (tests added later), so pytest "
            f"failed; pass the node ids of tests that exist at --good",
        )
    if returncode != 0:
        return Outcome(SKIP, f"every check passed, but pytest exited {returncode} (another test failed)")
    return Outcome(GOOD, f"{len(compared)} check(s) passed")


def check_line(test: dict[str, Any]) -> str:
    """The check's summary line: ``VERDICT nodeid [name]: detail``."""
    name = f" [{test['name']}]" if test.get("name") else ""
    detail = f": {test['detail']}" if test.get("detail") else ""
    return f"{str(test.get('verdict', '?')).upper()} {test.get('nodeid')}{name}{detail}"


def difference_lines(test: dict[str, Any], limit: int = 5) -> list[str]:
    """What differed, one line per tensor/value (section, key, step, how many elements, largest difference)."""
    lines = []
    diffs = [d for d in test.get("differences") or [] if isinstance(d, dict)]
    for d in diffs[:limit]:
        where = str(d.get("section", "?")) + (f" {d['key']}" if d.get("key") else "")
        where += f" at step {d['step']}" if d.get("step") is not None else ""
        unit = "step(s)" if d.get("section") == "losses" else "element(s)"
        size = f": {d['n_diff']} of {d['numel']} {unit} differ" if "n_diff" in d and "numel" in d else ""
        largest = f", max abs diff {d['max_abs']:.3g}" if isinstance(d.get("max_abs"), (int, float)) else ""
        lines.append(f"{where}{size}{largest}" + (f" ({d['detail']})" if d.get("detail") else ""))
    if len(diffs) > limit:
        lines.append(f"... and {len(diffs) - limit} more difference(s)")
    lines += [f"changed since the reference: {c}" for c in test.get("context") or []]
    return lines


def step_env(worktree: Path, toplevel: Path, base: dict[str, str]) -> dict[str, str]:
    """The environment of a step: the commit's worktree (and its ``src/``) first on PYTHONPATH.

    Entries of the user's PYTHONPATH inside their own checkout are dropped, so that the commit's code is
    imported, never the checkout's; everything else (the installed pytest-repro plugin, torch, ...) comes
    from the environment bisect runs in.
    """
    env = {k: v for k, v in base.items() if k not in ENV_DROP}
    paths = [str(worktree / "src")] if (worktree / "src").is_dir() else []
    paths.append(str(worktree))
    for entry in base.get("PYTHONPATH", "").split(os.pathsep):
        if entry and not _inside(Path(entry), toplevel):
            paths.append(entry)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    # Each step's worktree is temporary (and PYTHONPATH differs per commit): a worker daemon started there would
    # serve no later session and idle for half an hour.
    env["PYTEST_REPRO_WORKER"] = "session"
    return env


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _die_with_parent() -> None:
    """Linux: have the kernel kill the step's pytest if bisect itself is killed (SIGKILL)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _snapshot(folder: Path) -> list[tuple[str, int, int]]:
    """Path, size and mtime of every file: enough to notice a step that wrote into the reference copy."""
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    )


def tail(log: Path | None, lines: int = 15) -> list[str]:
    """The last non-blank lines of a step's log (none when there is no log)."""
    if log is None:
        return []
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


class Runner:
    """Runs pytest in the worktree at its checked-out commit: the probe at ``--good``, then each step."""

    def __init__(
        self,
        temp: Path,
        worktree: Path,
        toplevel: Path,
        prefix: str,
        pytest_args: Sequence[str],
        repro_timeout: str | None = None,
        step_timeout: float | None = None,
    ) -> None:
        self.temp, self.worktree, self.toplevel, self.prefix = temp, worktree, toplevel, prefix
        self.pytest_args = list(pytest_args)
        self.repro_timeout = repro_timeout
        self.step_timeout = step_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.last_log: Path | None = None
        self.reference = temp / "reference"
        self.reference_files: list[tuple[str, int, int]] = []

    def _pytest(self, extra: Sequence[str], env: dict[str, str], log: Path) -> int | None:
        """Run pytest in the worktree (its own process group, killed with bisect); None when it timed out."""
        where = self.worktree / self.prefix
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pytest", *self.pytest_args, *extra],
                cwd=where,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
            try:
                return self.proc.wait(timeout=self.step_timeout)
            except subprocess.TimeoutExpired:
                return None
            finally:
                kill_group(self.proc.pid)  # the run's job processes too
                self.proc.wait()
                self.proc = None

    def probe(self, good: str, good_rev: str) -> Path:
        """Return the --good commit's reference folder, as pytest itself resolves it there."""
        probe_dir = self.temp / "probe"
        probe_dir.mkdir()
        (probe_dir / f"{PROBE_MODULE}.py").write_text(_PROBE, encoding="utf-8")
        env = step_env(self.worktree, self.toplevel, dict(os.environ))
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(probe_dir)])
        env[PROBE_ENV] = str(probe_dir / "answer.json")
        log = self.temp / "probe.log"
        code = self._pytest(["-p", PROBE_MODULE], env, log)
        try:
            answer = json.loads((probe_dir / "answer.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise BisectError(
                f"pytest could not start at --good {good[:10]} (exit {code})",
                "check the pytest arguments; they are the same as for 'pytest --repro'",
                tail(log),
            ) from None
        if answer["reference_dir"] is None:
            raise BisectError(
                f"pytest does not load the pytest-repro plugin at --good {good[:10]}",
                "install pytest-repro in this environment (pip install pytest-repro)",
            )
        folder = Path(str(answer["rootdir"])) / str(answer["reference_dir"])
        shown = f"repro_reference_dir ({answer['reference_dir']})"
        if not _inside(folder, self.worktree):
            raise BisectError(
                f"{shown} lies outside the repository, so --good's reference is not in git",
                "commit the references in the repository (the default: reference_outputs in the rootdir)",
            )
        if not folder.is_dir():
            raise BisectError(
                f"--good {good_rev} ({good[:10]}) has no reference folder "
                f"{folder.relative_to(self.worktree)} ({shown})",
                "pass a --good whose references are committed, or record them there with pytest --repro --repro-regen",
            )
        return folder

    def copy_reference(self, source: Path) -> None:
        """Copy --good's reference folder once; every step is compared with this copy."""
        shutil.copytree(source, self.reference, symlinks=True)
        self.reference_files = _snapshot(self.reference)

    def run_once(self, sha: str) -> Outcome:
        """Run the tests once at the checked-out commit ``sha`` and classify the run."""
        self.runs += 1
        report = self.temp / f"report-{self.runs}.json"
        log = self.temp / f"step-{self.runs}.log"
        where = self.worktree / self.prefix
        self.last_log = None
        if not where.is_dir():
            return Outcome(SKIP, f"the folder {self.prefix} does not exist at this commit")
        extra = ["--repro", f"--repro-report={report}", "-o", f"repro_reference_dir={self.reference}"]
        extra += ["-o", f"cache_dir={self.temp / 'cache'}"]
        if self.repro_timeout is not None:
            extra.append(f"--repro-timeout={self.repro_timeout}")
        code = self._pytest(extra, step_env(self.worktree, self.toplevel, dict(os.environ)), log)
        if _snapshot(self.reference) != self.reference_files:
            raise BisectError(
                f"the tests at {sha[:10]} wrote into the copy of --good's reference; later steps cannot trust it",
                "drop --repro-regen (also from addopts and PYTEST_ADDOPTS) and run bisect again",
            )
        data = None
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(report.read_text(encoding="utf-8"))
        outcome = classify(code, data if isinstance(data, dict) else None, self.step_timeout)
        self.last_log = log
        return outcome

    def kill(self) -> None:
        """Kill a running step (and its job processes)."""
        if self.proc is not None:
            kill_group(self.proc.pid)
            with contextlib.suppress(Exception):
                self.proc.wait(timeout=30)
