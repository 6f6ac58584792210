"""``pytest-repro bisect``: the first commit whose results differ from the ``--good`` commit's reference.

Everything happens in a temporary detached worktree (``git worktree add --detach``) in which ``git bisect``
is driven step by step: git keeps a worktree's HEAD, index and bisect state apart from the main checkout's,
so the user's HEAD, index, files, references and any bisect of their own are never touched. The ``--good``
commit's reference folder is copied once from that worktree's checkout (git's own checkout, so LFS and eol
filters apply as in the user's tests) and every step runs ``python -m pytest --repro ARGS
-o repro_reference_dir=<copy>`` with that commit's code first on ``PYTHONPATH`` (see ``bisect_step``).

This module is the search: preflight of both ends, retries of a commit whose runs diverge (the majority
decides), and the report; running one step is ``bisect_step``, the git plumbing ``git``.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from . import git
from .bisect_step import BAD, DIVERGED, GOOD, SKIP, BisectError, Outcome, Runner, tail
from .common import CliError

FOUND, NOT_FOUND, USAGE, INTERRUPTED = 0, 1, 2, 130  # exit codes
ATTEMPTS = 3  # a commit whose runs diverge runs this many times; the majority decides
TEMP_PREFIX = "pytest-repro-bisect-"

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
    except git.GitError as exc:
        raise CliError(exc.problem, exc.fix) from None


class _Stop(BaseException):
    """SIGTERM/SIGHUP: unwind through every ``finally`` like Ctrl-C does."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signum)


@dataclass
class Step:
    """A tested commit and its outcome (after retries)."""

    sha: str
    subject: str
    outcome: Outcome
    attempts: list[Outcome] = field(default_factory=list)


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


def say(line: str) -> None:
    """Print one progress line at once: a bisect takes minutes, and its reader may be a pipe."""
    print(line, flush=True)


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
        self.runner: Runner | None = None

    def _resolve(self) -> None:
        top = git.toplevel(self.cwd)
        if top is None:
            raise BisectError(f"{self.cwd} is not inside a git repository", "run pytest-repro bisect in your checkout")
        self.toplevel = top
        self._clean_stale()
        self.prefix = git.prefix(self.cwd)
        shas = []
        for flag, rev in (("--good", self.good_rev), ("--bad", self.bad_rev)):
            sha = git.commit(rev, self.cwd)
            if sha is None:
                raise BisectError(f"{flag} {rev} is not a commit of this repository", "pass a commit, tag or branch")
            shas.append(sha)
        self.good, self.bad = shas
        if self.good == self.bad:
            raise BisectError(f"--good and --bad are the same commit ({self.good[:10]})", "pass an older --good")
        if not git.is_ancestor(self.good, self.bad, self.cwd):
            raise BisectError(
                f"--good {self.good_rev} ({self.good[:10]}) is not an ancestor of --bad {self.bad_rev} "
                f"({self.bad[:10]})",
                "pass a --good on --bad's history (e.g. the release tag it was branched from)",
            )

    def _clean_stale(self) -> None:
        """Remove worktrees that a killed bisect (SIGKILL, power loss) left registered in this repository."""
        for path, removed in git.remove_stale_worktrees(self.toplevel, TEMP_PREFIX):
            if removed:
                self.echo(f"removed {path}, the worktree of an earlier bisect that was killed")
            else:
                self.echo(f"could not remove {path}, left by an earlier bisect; remove it with: rm -rf {path.parent}")

    def test(self, sha: str, label: str) -> Outcome:
        """Test the worktree's checked-out commit ``sha``, retrying runs that diverge; print and keep the result."""
        assert self.runner is not None
        subject = git.subject(sha, self.toplevel)
        attempts: list[Outcome] = []
        while True:
            attempts.append(self.runner.run_once(sha))
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
        self.temp = git.make_temp(TEMP_PREFIX)
        self.worktree = self.temp / "worktree"
        git.add_worktree(self.toplevel, self.worktree, self.good)
        self.runner = Runner(
            self.temp,
            self.worktree,
            self.toplevel,
            self.prefix,
            self.pytest_args,
            self.repro_timeout,
            self.step_timeout,
        )
        source = self.runner.probe(self.good, self.good_rev)
        self.runner.copy_reference(source)
        rel = source.relative_to(self.worktree)
        self.echo(
            f"bisect: --good {self.good[:10]} ({self.good_rev}), --bad {self.bad[:10]} ({self.bad_rev}); "
            f"reference: {rel} as committed at --good"
        )
        self._preflight()
        git.reset(self.worktree)
        out = git.bisect(self.worktree, ["start", self.bad, self.good])
        while True:
            first = git.first_bad(out)
            if first is not None:
                return self._found(first)
            if git.cannot_bisect_more(out):
                return self._ambiguous(out)
            sha = git.head(self.worktree)
            if sha in self.steps:
                raise BisectError(f"git bisect asked for {sha[:10]} twice", "report this as a pytest-repro bug")
            outcome = self.test(sha, f"step {len(self.steps) - 1}")
            git.reset(self.worktree)
            out = git.bisect(self.worktree, [outcome.state])

    def _preflight(self) -> None:
        assert self.runner is not None
        good = self.test(self.good, "preflight --good")
        if good.state != GOOD:
            why = "its results differ from its own reference" if good.state == BAD else "it cannot be tested"
            raise BisectError(
                f"--good {self.good_rev} ({self.good[:10]}) does not pass here: {why} ({good.reason})",
                f"pass a --good at which 'pytest --repro {' '.join(self.pytest_args)}' passes (in this environment)",
                tail(self.runner.last_log) if good.state != BAD else good.details,
            )
        git.reset(self.worktree)
        git.checkout(self.worktree, self.bad)
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
                tail(self.runner.last_log),
            )

    # -- the report -----------------------------------------------------------------------------------------

    def _found(self, sha: str) -> int:
        step = self.steps.get(sha)
        full, title, date, author = git.describe(sha, self.toplevel)
        self.echo(f"first changed commit: {full}")
        self.echo(f"  subject:     {title}")
        self.echo(f"  author:      {author}, {date}")
        if step is not None:
            self.echo(f"  what differs from --good's reference: {step.outcome.reason}")
            for line in step.outcome.details:
                self.echo(f"    {line}")
        self._tally()
        return FOUND

    def _ambiguous(self, out: str) -> int:
        self.echo("no single first changed commit: commits that could not be tested lie next to it; it is one of:")
        for sha in git.candidates(out):
            step = self.steps.get(sha)
            state = f"{step.outcome.state}: {step.outcome.reason}" if step else "not tested"
            self.echo(f"  {sha[:10]} {git.subject(sha, self.toplevel)!r} ({state})")
        self.echo("fix what keeps the skipped commits from running, or bisect again with other tests or revisions")
        self._tally()
        return NOT_FOUND

    def _tally(self) -> None:
        states = [s.outcome.state for s in self.steps.values()]
        words = {GOOD: "good", BAD: "bad", SKIP: "skipped"}
        counts = ", ".join(f"{states.count(s)} {w}" for s, w in words.items() if states.count(s))
        runs = self.runner.runs if self.runner is not None else 0
        self.echo(f"tested {len(states)} commit(s) (preflight included): {counts}; {runs} pytest run(s)")

    def close(self) -> Path | None:
        """Kill a running step, remove the temporary worktree (and its bisect state); return it if it stayed."""
        if self.runner is not None:
            self.runner.kill()
        if self.temp is None:
            return None
        worktree = self.temp / "worktree"
        stayed = git.remove_worktree(self.toplevel, worktree, self.temp)
        self.temp = None
        return worktree if stayed else None


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
