"""``pytest-repro bisect``: the first commit whose results differ from the ``--good`` commit's reference.

Everything happens in a temporary detached worktree (``git worktree add --detach``) in which ``git bisect``
is driven step by step: git keeps a worktree's HEAD, index and bisect state apart from the main checkout's,
so the user's HEAD, index, files, references and any bisect of their own are never touched. The ``--good``
commit's reference folder is copied once from that worktree's checkout (git's own checkout, so LFS and eol
filters apply as in the user's tests) and every step runs ``python -m pytest --repro ARGS
-o repro_reference_dir=<copy>`` with that commit's code first on ``PYTHONPATH`` (see ``step_env``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from ..storage import pid_alive
from .common import CliError

GOOD, BAD, SKIP, DIVERGED = "good", "bad", "skip", "diverged"
FOUND, NOT_FOUND, USAGE, INTERRUPTED = 0, 1, 2, 130  # exit codes
ATTEMPTS = 3  # a commit whose runs diverge runs this many times; the majority decides
TEMP_PREFIX = "pytest-repro-bisect-"
OWNER_FILE = "owner.pid"
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
_GIT_ENV_DROP = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_PREFIX", "GIT_OBJECT_DIRECTORY")

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


HELP = """\
Find the first commit between --good and --bad whose reproducibility results differ from the
reference committed at --good (later commits may have regenerated theirs). Each step runs
'python -m pytest --repro ARGS -o repro_reference_dir=<copy of --good's reference>' in a temporary
worktree, with that commit's code first on PYTHONPATH. Commits that do not collect or import are
skipped; a commit whose runs diverge is run 3 times and the majority decides. Your checkout, HEAD,
index and any bisect of your own are never touched.

  pytest-repro bisect --good v1.2 -- tests/test_eval.py::test_eval_loss

exit codes: 0 found; 1 only untestable commits left next to it (candidates listed);
2 usage error or failed preflight (--good does not pass, --bad does not differ);
130 interrupted (Ctrl-C), 143 stopped (SIGTERM); the temporary worktree is removed either way.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments (its one-line help is its row in ``cli.COMMANDS``)."""
    parser.description = HELP
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--good", required=True, metavar="REV", help="a commit whose results are right (e.g. v1.2)")
    parser.add_argument("--bad", default="HEAD", metavar="REV", help="a commit whose results differ (default: HEAD)")
    parser.add_argument("--repro-timeout", metavar="SECONDS", help="per-run time limit, passed to each step's pytest")
    parser.add_argument("--step-timeout", type=float, metavar="SECONDS", help="kill a step's pytest after this (skip)")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="pytest arguments or node ids (after --)")


def command(args: argparse.Namespace) -> int:
    """Bisect from the current folder; return the exit code (see HELP)."""
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    try:
        return run(args.good, args.bad, pytest_args, Path.cwd(), args.repro_timeout, args.step_timeout)
    except BisectError as exc:
        for line in exc.output:
            print(f"  | {line}", file=sys.stderr)
        raise CliError(exc.problem, exc.fix) from None


class BisectError(Exception):
    """Bisect cannot start or go on: ``problem`` and its ``fix``, and pytest's last output lines if any."""

    def __init__(self, problem: str, fix: str, output: Sequence[str] = ()) -> None:
        self.problem = problem
        self.fix = fix
        self.output = list(output)
        super().__init__(f"{problem}; {fix}")


class _Stop(BaseException):
    """SIGTERM/SIGHUP: unwind through every ``finally`` like Ctrl-C does."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signum)


@dataclass(frozen=True)
class Outcome:
    """What one run of the tests at a commit says: good, bad, skip or diverged, and one line why."""

    state: str
    reason: str
    details: tuple[str, ...] = ()  # bad: what differed (the check's differences and context)


@dataclass
class Step:
    """A tested commit and its outcome (after retries)."""

    sha: str
    subject: str
    outcome: Outcome
    attempts: list[Outcome] = field(default_factory=list)


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


def decide(attempts: Sequence[Outcome]) -> Outcome | None:
    """Return the verdict of a commit's attempts, or None while another attempt could still decide."""
    if attempts and attempts[0].state != DIVERGED:
        return attempts[0]
    need, left = ATTEMPTS // 2 + 1, ATTEMPTS - len(attempts)
    for state in (GOOD, BAD):
        hits = [a for a in attempts if a.state == state]
        if len(hits) >= need:
            return hits[0]
    if any(len([a for a in attempts if a.state == s]) + left >= need for s in (GOOD, BAD)):
        return None
    seen = ", ".join(a.state for a in attempts)
    return Outcome(SKIP, f"no majority of {ATTEMPTS} attempts ({seen}): {attempts[0].reason}")


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
    env = {k: v for k, v in base.items() if k not in _GIT_ENV_DROP}
    paths = [str(worktree / "src")] if (worktree / "src").is_dir() else []
    paths.append(str(worktree))
    for entry in base.get("PYTHONPATH", "").split(os.pathsep):
        if entry and not _inside(Path(entry), toplevel):
            paths.append(entry)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _git(args: Sequence[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in _GIT_ENV_DROP}
    env.update(LC_ALL="C", LANGUAGE="C", GIT_TERMINAL_PROMPT="0")
    try:
        result = subprocess.run(
            ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
        )
    except OSError as exc:  # git missing, or the folder is gone
        result = subprocess.CompletedProcess(["git", *args], 127, "", f"{exc}")
    if check and result.returncode != 0:
        message = " ".join((result.stderr or result.stdout).split())[:300]
        raise BisectError(f"'git {' '.join(args)}' failed: {message}", "check the repository and the revisions")
    return result


def _die_with_parent() -> None:
    """Linux: have the kernel kill the step's pytest if bisect itself is killed (SIGKILL)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def say(line: str) -> None:
    """Print one progress line at once: a bisect takes minutes, and its reader may be a pipe."""
    print(line, flush=True)


def _snapshot(folder: Path) -> list[tuple[str, int, int]]:
    """Path, size and mtime of every file: enough to notice a step that wrote into the reference copy."""
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    )


class Bisect:
    """One bisection: a temporary worktree, the copied reference, and the steps tested so far."""

    def __init__(
        self,
        good: str,
        bad: str,
        pytest_args: Sequence[str],
        cwd: Path,
        repro_timeout: str | None = None,
        step_timeout: float | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.good_rev, self.bad_rev = good, bad
        self.pytest_args = list(pytest_args)
        self.cwd = cwd
        self.repro_timeout = repro_timeout
        self.step_timeout = step_timeout
        self.echo = echo or say
        self.steps: dict[str, Step] = {}
        self.temp: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.last_log: Path | None = None

    # -- set-up ---------------------------------------------------------------------------------------------

    def _resolve(self) -> None:
        top = _git(["rev-parse", "--show-toplevel"], self.cwd, check=False)
        if top.returncode != 0:
            raise BisectError(f"{self.cwd} is not inside a git repository", "run pytest-repro bisect in your checkout")
        self.toplevel = Path(top.stdout.strip())
        self._clean_stale()
        self.prefix = _git(["rev-parse", "--show-prefix"], self.cwd).stdout.strip()
        shas = []
        for flag, rev in (("--good", self.good_rev), ("--bad", self.bad_rev)):
            found = _git(["rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], self.cwd, check=False)
            if found.returncode != 0:
                raise BisectError(f"{flag} {rev} is not a commit of this repository", "pass a commit, tag or branch")
            shas.append(found.stdout.strip())
        self.good, self.bad = shas
        if self.good == self.bad:
            raise BisectError(f"--good and --bad are the same commit ({self.good[:10]})", "pass an older --good")
        if _git(["merge-base", "--is-ancestor", self.good, self.bad], self.cwd, check=False).returncode != 0:
            raise BisectError(
                f"--good {self.good_rev} ({self.good[:10]}) is not an ancestor of --bad {self.bad_rev} "
                f"({self.bad[:10]})",
                "pass a --good on --bad's history (e.g. the release tag it was branched from)",
            )

    def _clean_stale(self) -> None:
        """Remove worktrees that a killed bisect (SIGKILL, power loss) left registered in this repository."""
        listing = _git(["worktree", "list", "--porcelain"], self.toplevel).stdout
        for line in listing.splitlines():
            if not line.startswith("worktree "):
                continue
            path = Path(line[len("worktree ") :])
            if not path.parent.name.startswith(TEMP_PREFIX):
                continue
            try:
                owner = int((path.parent / OWNER_FILE).read_text())
            except (OSError, ValueError):
                owner = 0
            if owner and pid_alive(owner):
                continue  # another bisect is running in this repository
            _git(["worktree", "remove", "--force", str(path)], self.toplevel, check=False)
            shutil.rmtree(path.parent, ignore_errors=True)
            if path.parent.exists():
                self.echo(f"could not remove {path}, left by an earlier bisect; remove it with: rm -rf {path.parent}")
            else:
                self.echo(f"removed {path}, the worktree of an earlier bisect that was killed")
        _git(["worktree", "prune"], self.toplevel, check=False)

    def _subject(self, sha: str) -> str:
        return _git(["show", "-s", "--format=%s", sha], self.toplevel).stdout.strip()

    # -- running a step -------------------------------------------------------------------------------------

    def _pytest(self, extra: Sequence[str], env: dict[str, str], log: Path) -> int | None:
        """Run pytest in the worktree (its own process group, killed with bisect); None when it timed out."""
        assert self.temp is not None
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
                _kill_group(self.proc.pid)  # the run's job processes too
                self.proc.wait()
                self.proc = None

    def _probe(self) -> Path:
        """Return the --good commit's reference folder, as pytest itself resolves it there."""
        assert self.temp is not None
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
                f"pytest could not start at --good {self.good[:10]} (exit {code})",
                "check the pytest arguments; they are the same as for 'pytest --repro'",
                _tail(log),
            ) from None
        if answer["reference_dir"] is None:
            raise BisectError(
                f"pytest does not load the pytest-repro plugin at --good {self.good[:10]}",
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
                f"--good {self.good_rev} ({self.good[:10]}) has no reference folder "
                f"{folder.relative_to(self.worktree)} ({shown})",
                "pass a --good whose references are committed, or record them there with pytest --repro --repro-regen",
            )
        return folder

    def _run_once(self, sha: str) -> Outcome:
        assert self.temp is not None
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

    def test(self, sha: str, label: str) -> Outcome:
        """Test the worktree's checked-out commit ``sha``, retrying runs that diverge; print and keep the result."""
        subject = self._subject(sha)
        attempts: list[Outcome] = []
        while True:
            attempts.append(self._run_once(sha))
            decided = decide(attempts)
            if decided is not None:
                break
            self.echo(
                f"{label}: {sha[:10]} {subject!r}: runs diverge ({attempts[-1].reason}); attempt "
                f"{len(attempts) + 1} of {ATTEMPTS}"
            )
        self.steps[sha] = Step(sha, subject, decided, attempts)
        self.echo(f"{label}: {sha[:10]} {subject!r}: {decided.state} ({decided.reason})")
        return decided

    # -- the bisection --------------------------------------------------------------------------------------

    def run(self) -> int:
        """Bisect; print the first changed commit and return the exit code (FOUND, NOT_FOUND)."""
        self._resolve()
        self.temp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX)).resolve()
        (self.temp / OWNER_FILE).write_text(str(os.getpid()))
        self.worktree = self.temp / "worktree"
        _git(["worktree", "add", "--detach", "--quiet", str(self.worktree), self.good], self.toplevel)
        source = self._probe()
        self.reference = self.temp / "reference"
        shutil.copytree(source, self.reference, symlinks=True)
        self.reference_files = _snapshot(self.reference)
        rel = source.relative_to(self.worktree)
        self.echo(
            f"bisect: --good {self.good[:10]} ({self.good_rev}), --bad {self.bad[:10]} ({self.bad_rev}); "
            f"reference: {rel} as committed at --good"
        )
        self._preflight()
        self._clean()
        out = self._bisect(["start", self.bad, self.good])
        while True:
            first = _first_bad(out)
            if first is not None:
                return self._found(first)
            if "We cannot bisect more" in out or "only 'skip'ped commits left" in out:
                return self._ambiguous(out)
            sha = _git(["rev-parse", "HEAD"], self.worktree).stdout.strip()
            if sha in self.steps:
                raise BisectError(f"git bisect asked for {sha[:10]} twice", "report this as a pytest-repro bug")
            outcome = self.test(sha, f"step {len(self.steps) - 1}")
            self._clean()
            out = self._bisect([outcome.state])

    def _preflight(self) -> None:
        good = self.test(self.good, "preflight --good")
        if good.state != GOOD:
            why = "its results differ from its own reference" if good.state == BAD else "it cannot be tested"
            raise BisectError(
                f"--good {self.good_rev} ({self.good[:10]}) does not pass here: {why} ({good.reason})",
                f"pass a --good at which 'pytest --repro {' '.join(self.pytest_args)}' passes (in this environment)",
                _tail(self.last_log) if good.state != BAD else good.details,
            )
        self._clean()
        _git(["checkout", "--quiet", "--detach", self.bad], self.worktree)
        bad = self.test(self.bad, "preflight --bad")
        if bad.state == GOOD:
            raise BisectError(
                f"--bad {self.bad_rev} ({self.bad[:10]}) still matches --good's reference: nothing to bisect",
                "pass a --bad whose results differ (e.g. the commit where you saw the change), or other tests",
            )
        if bad.state != BAD:
            raise BisectError(
                f"--bad {self.bad_rev} ({self.bad[:10]}) cannot be tested: {bad.reason}",
                "pass a --bad whose tests run (fix or pick another commit)",
                _tail(self.last_log),
            )

    def _clean(self) -> None:
        """Remove what the last step left in the worktree (caches, reports) so that git can check out the next."""
        _git(["reset", "--hard", "--quiet"], self.worktree)
        _git(["clean", "-ffdxq"], self.worktree)

    def _bisect(self, args: Sequence[str]) -> str:
        result = _git(["bisect", *args], self.worktree, check=False)
        out = result.stdout + result.stderr
        if result.returncode != 0 and "We cannot bisect more" not in out and "only 'skip'ped" not in out:
            raise BisectError(f"'git bisect {' '.join(args)}' failed: {' '.join(out.split())[:300]}", "report this")
        return out

    def _found(self, sha: str) -> int:
        step = self.steps.get(sha)
        show = _git(["show", "-s", "--format=%H%n%s%n%aI%n%an", sha], self.toplevel).stdout.splitlines()
        self.echo(f"first changed commit: {show[0]}")
        self.echo(f"  subject:     {show[1]}")
        self.echo(f"  author:      {show[3]}, {show[2]}")
        if step is not None:
            self.echo(f"  what differs from --good's reference: {step.outcome.reason}")
            for line in step.outcome.details:
                self.echo(f"    {line}")
        self._tally()
        return FOUND

    def _ambiguous(self, out: str) -> int:
        candidates = [line.split()[0] for line in out.splitlines() if len(line) >= 40 and _is_sha(line.split()[0])]
        self.echo("no single first changed commit: commits that could not be tested lie next to it; it is one of:")
        for sha in candidates:
            step = self.steps.get(sha)
            state = f"{step.outcome.state}: {step.outcome.reason}" if step else "not tested"
            self.echo(f"  {sha[:10]} {self._subject(sha)!r} ({state})")
        self.echo("fix what keeps the skipped commits from running, or bisect again with other tests or revisions")
        self._tally()
        return NOT_FOUND

    def _tally(self) -> None:
        states = [s.outcome.state for s in self.steps.values()]
        words = {GOOD: "good", BAD: "bad", SKIP: "skipped"}
        counts = ", ".join(f"{states.count(s)} {w}" for s, w in words.items() if states.count(s))
        self.echo(f"tested {len(states)} commit(s) (preflight included): {counts}; {self.runs} pytest run(s)")

    def close(self) -> Path | None:
        """Kill a running step, remove the temporary worktree (and its bisect state); return it if it stayed."""
        if self.proc is not None:
            _kill_group(self.proc.pid)
            with contextlib.suppress(Exception):
                self.proc.wait(timeout=30)
        if self.temp is None:
            return None
        worktree = self.temp / "worktree"
        _git(["worktree", "remove", "--force", str(worktree)], self.toplevel, check=False)
        shutil.rmtree(self.temp, ignore_errors=True)
        _git(["worktree", "prune"], self.toplevel, check=False)
        listed = _git(["worktree", "list", "--porcelain"], self.toplevel, check=False).stdout
        stayed = self.temp.exists() or f"worktree {worktree}" in listed.splitlines()
        self.temp = None
        return worktree if stayed else None


def _is_sha(text: str) -> bool:
    return len(text) == 40 and all(c in "0123456789abcdef" for c in text)


def _first_bad(out: str) -> str | None:
    for line in out.splitlines():
        words = line.split()
        if line.endswith("is the first bad commit") and words and _is_sha(words[0]):
            return words[0]
    return None


def _tail(log: Path | None, lines: int = 15) -> list[str]:
    if log is None:
        return []
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into an exception (so ``finally`` cleans up), and restore the handlers after."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stop(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run(
    good: str,
    bad: str,
    pytest_args: Sequence[str],
    cwd: Path,
    repro_timeout: str | None = None,
    step_timeout: float | None = None,
    echo: Callable[[str], None] | None = None,
) -> int:
    """Bisect from ``cwd``; return the exit code (0 found, 1 no single commit, 130/143 interrupted)."""
    for arg in pytest_args:
        if arg.startswith("--repro-regen"):
            raise BisectError(f"{arg} would overwrite references", "drop it: bisect only compares")
    echo = echo or say
    job = Bisect(good, bad, pytest_args, cwd, repro_timeout, step_timeout, echo)
    code, note = FOUND, ""
    with _signals_unwind():
        try:
            code = job.run()
        except KeyboardInterrupt:
            code, note = INTERRUPTED, "bisect: interrupted (Ctrl-C)"
        except _Stop as stop:
            code, note = 128 + stop.signum, f"bisect: stopped by signal {stop.signum}"
        finally:
            # a second Ctrl-C must not stop the clean-up
            previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
            try:
                left = job.close()
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
            if left:
                echo(
                    f"bisect: could not remove its temporary worktree {left}; "
                    f"remove it with: git worktree remove --force {left}"
                )
    if note:
        echo(f"{note}; its temporary worktree is removed, your checkout was not touched")
    return code
