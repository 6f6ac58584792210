"""pytest-repro bisect, end to end in throw-away git repositories; the step classification as pure functions."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import USER_JOBS

from pytest_repro._cli.bisect import TEMP_PREFIX, decide
from pytest_repro._cli.bisect_step import BAD, DIVERGED, GOOD, SKIP, Outcome, classify, step_env

TEST = """
import pytest
from userjobs import train

@pytest.mark.reproducible
def test_model(repro):
    repro.check(train, config={CONFIG})
"""
CONFIG = '"steps": 3, "lr": 0.05'


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def commit(repo: Path, subject: str, files: dict[str, str] | None = None, regen: bool = False) -> str:
    for name, text in (files or {}).items():
        (repo / name).write_text(text)
    if regen:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "--repro", "--repro-regen", "-q", "-p", "no:cacheprovider"],
            cwd=repo,
            env={k: v for k, v in os.environ.items() if k != "CI"},  # a module fixture: _no_ci does not apply
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    git(repo, "add", "-A")
    count = subprocess.run(["git", "rev-list", "--count", "--all"], cwd=repo, capture_output=True, text=True)
    day = int(count.stdout.strip() or 0) + 1
    date = f"2024-05-{day:02d}T12:00:00+00:00"  # one day apart: git bisect's order does not hang on timing
    subprocess.run(
        ["git", "commit", "-q", "-m", subject],
        cwd=repo,
        env={**os.environ, "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date},
        check=True,
    )
    return git(repo, "rev-parse", "HEAD").strip()


def new_repo(path: Path) -> Path:
    path.mkdir()
    git(path, "init", "-q")
    git(path, "config", "user.email", "dev@example.com")
    git(path, "config", "user.name", "Dev")
    (path / ".gitignore").write_text("__pycache__/\n.pytest_cache/\n")
    (path / "pytest.ini").write_text("[pytest]\nrepro_timeout = 60\n")
    commit(path, "v1.2: the model", {"userjobs.py": USER_JOBS, "test_model.py": TEST.replace("CONFIG", CONFIG)}, True)
    git(path, "tag", "v1.2")
    return path


def bisect(repo: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_repro.cli", "bisect", *args],
        cwd=repo,
        env=bisect_env(repo),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def bisect_env(repo: Path) -> dict[str, str]:
    temp = repo.parent / "tmp"
    temp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(temp)}


def state(repo: Path) -> dict[str, object]:
    """Everything of the user's checkout that bisect must leave as it was."""
    files = {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}
    git_dir = repo / ".git"
    return {
        "status": git(repo, "status", "--porcelain", "--untracked-files=all"),  # first: it refreshes the index
        "head": git(repo, "rev-parse", "HEAD"),
        "branch": git(repo, "rev-parse", "--symbolic-full-name", "HEAD"),
        "index": git(repo, "ls-files", "--stage"),
        "worktrees": git(repo, "worktree", "list", "--porcelain"),
        "refs": git(repo, "for-each-ref"),
        "bisect_log": (git_dir / "BISECT_LOG").read_text() if (git_dir / "BISECT_LOG").exists() else None,
        "files": {k: v for k, v in files.items() if not k.startswith(".git/") or k.endswith("BISECT_LOG")},
        "temp_left": sorted(p.name for p in (repo.parent / "tmp").glob(f"{TEMP_PREFIX}*")),
    }


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """v1.2, two docs commits, one that fails to import, a flaky one, a harmless one, the culprit, a regeneration.

    In this order git bisect tests the broken commit first, then the flaky one, whatever the commit hashes.
    """
    repo = new_repo(tmp_path_factory.mktemp("history") / "repo")
    shas = {"good": git(repo, "rev-parse", "HEAD").strip()}
    shas["docs"] = commit(repo, "docs: readme", {"README.md": "a model\n"})
    shas["changelog"] = commit(repo, "docs: changelog", {"CHANGES.md": "v1.3: coming\n"})
    shas["broken"] = commit(repo, "wip: broken import", {"userjobs.py": "import no_such_module_here\n" + USER_JOBS})
    flaky = TEST.replace("CONFIG", CONFIG + ', "unseeded_at": 1')
    shas["flaky"] = commit(repo, "fix import; try unseeded noise", {"userjobs.py": USER_JOBS, "test_model.py": flaky})
    shas["harmless"] = commit(repo, "drop the noise", {"test_model.py": TEST.replace("CONFIG", CONFIG)})
    changed = TEST.replace("CONFIG", CONFIG.replace("0.05", "0.06"))
    shas["culprit"] = commit(repo, "tune: lr 0.06", {"test_model.py": changed})
    shas["regen"] = commit(repo, "regenerate the references", regen=True)
    return repo, shas


@pytest.mark.slow
def test_bisect_names_the_culprit_past_a_regenerated_reference_a_broken_and_a_flaky_commit(
    history: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(history[0], repo)
    shas = history[1]
    git(repo, "bisect", "start", shas["regen"], shas["docs"])  # the user's own bisect, in progress
    before = state(repo)
    result = bisect(repo, "--good", "v1.2", "--bad", "master")  # HEAD is where the user's own bisect stands
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert f"first changed commit: {shas['culprit']}" in out
    assert "subject:     tune: lr 0.06" in out and "author:      Dev, 2024-05-07T12:00:00+00:00" in out
    assert "DIFFERS test_model.py::test_model: differs from the reference at step 1" in out
    assert "losses at step 1: 2 of 3 step(s) differ, max abs diff" in out
    assert "changed since the reference: config lr: reference 0.05, this run 0.06" in out
    assert f"{shas['broken'][:10]} 'wip: broken import': skip (pytest was interrupted" in out
    assert f"{shas['flaky'][:10]} 'fix import; try unseeded noise': skip (no majority of 3 attempts" in out
    assert f"{shas['harmless'][:10]} 'drop the noise': good" in out
    assert ", 2 bad, 2 skipped;" in out
    assert state(repo) == before


@pytest.mark.slow
def test_bisect_says_when_the_preflight_fails_and_leaves_everything_as_it_was(
    history: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(history[0], repo)
    shas = history[1]
    (repo / "notes.txt").write_text("uncommitted work\n")
    (repo / "test_model.py").write_text("# a local edit\n" + (repo / "test_model.py").read_text())
    git(repo, "add", "notes.txt")
    before = state(repo)

    result = bisect(repo, "--good", "v1.2", "--bad", shas["docs"])
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"--bad {shas['docs']} ({shas['docs'][:10]}) still matches --good's reference: nothing to bisect" in (
        result.stderr
    )
    assert state(repo) == before

    result = bisect(repo, "--good", shas["broken"], "--bad", shas["regen"])
    assert result.returncode == 2
    assert "does not pass here: it cannot be tested (pytest was interrupted (collection or import errors)" in (
        result.stderr
    )
    assert "no_such_module_here" in result.stderr, "the tail of pytest's output shows why"
    assert state(repo) == before

    result = bisect(repo, "--good", "no-such-tag")
    assert result.returncode == 2 and "--good no-such-tag is not a commit of this repository" in result.stderr
    result = bisect(repo, "--good", shas["regen"], "--bad", "v1.2")
    assert result.returncode == 2 and "is not an ancestor of --bad v1.2" in result.stderr
    assert state(repo) == before


@pytest.mark.slow
def test_a_broken_commit_next_to_the_change_is_never_blamed(
    history: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(history[0], repo)
    shas = history[1]
    git(repo, "checkout", "-q", "-b", "hotfix", shas["broken"])
    changed = TEST.replace("CONFIG", CONFIG.replace("0.05", "0.06"))
    fix = commit(repo, "fix the import, lr 0.06", {"userjobs.py": USER_JOBS, "test_model.py": changed})
    before = state(repo)
    result = bisect(repo, "--good", "v1.2")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "no single first changed commit: commits that could not be tested lie next to it; it is one of:" in out
    assert f"  {shas['broken'][:10]} 'wip: broken import' (skip: pytest was interrupted" in out
    assert f"  {fix[:10]} 'fix the import, lr 0.06' (bad: DIFFERS" in out
    assert not [line for line in out.splitlines() if line.startswith("first changed commit")]
    assert state(repo) == before


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_an_interrupted_bisect_leaves_the_repository_as_it_was(
    history: tuple[Path, dict[str, str]], tmp_path: Path, how: signal.Signals
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(history[0], repo)
    before = state(repo)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest_repro.cli", "bisect", "--good", "v1.2"],
        cwd=repo,
        env=bisect_env(repo),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # a CI runner may start us with SIGINT ignored, which Python children inherit (no KeyboardInterrupt)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # printed once the worktree exists and the first step is about to run
    assert line.startswith("bisect: --good"), line
    time.sleep(1.0)  # inside the first step's pytest
    assert len(git(repo, "worktree", "list").splitlines()) == 2, "the temporary worktree is registered"
    proc.send_signal(how)
    rest = proc.communicate(timeout=120)[0]
    if how == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        # what a killed bisect leaves (its worktree) is removed by the next one, before anything else
        result = bisect(repo, "--good", "no-such-tag")
        assert "removed" in result.stdout and "the worktree of an earlier bisect that was killed" in result.stdout
    else:
        assert proc.returncode == (130 if how == signal.SIGINT else 128 + how), rest
        assert "its temporary worktree is removed, your checkout was not touched" in rest
    assert state(repo) == before


def report(*verdicts: str) -> dict[str, object]:
    tests = [{"nodeid": f"t.py::t{i}", "name": None, "verdict": v, "detail": "d"} for i, v in enumerate(verdicts)]
    return {"tests": tests}


@pytest.mark.parametrize(
    ("code", "verdicts", "expected"),
    [
        (0, ["passed", "unchanged"], GOOD),
        (0, ["passed-cross-env"], GOOD),
        (1, ["passed", "differs"], BAD),
        (1, ["non-finite"], BAD),
        (1, ["diverged", "passed"], DIVERGED),
        (1, ["differs", "diverged"], BAD),
        (1, ["passed", "error"], SKIP),
        (1, ["timeout"], SKIP),
        (1, ["test-failed"], SKIP),
        (1, ["passed"], SKIP),  # another (plain) test failed
        (1, ["missing"], SKIP),
        (1, ["passed", "missing"], SKIP),
        (0, ["written"], SKIP),
        (0, [], SKIP),
        (2, [], SKIP),
        (3, [], SKIP),
        (4, [], SKIP),
        (5, [], SKIP),
        (-9, [], SKIP),
    ],
)
def test_classify_by_exit_code_and_verdicts(code: int, verdicts: list[str], expected: str) -> None:
    assert classify(code, report(*verdicts)).state == expected


def test_classify_without_a_report_or_after_a_timeout_is_a_skip() -> None:
    assert classify(1, None).state == SKIP
    killed = classify(None, None, timeout=30)
    assert killed.state == SKIP and "longer than 30 s" in killed.reason


def test_tests_added_after_good_are_not_compared_and_do_not_decide() -> None:
    added = classify(1, report("passed", "missing"))
    assert added.state == SKIP and "1 check(s) have no reference at --good" in added.reason
    outcome = classify(1, report("missing", "differs"))
    assert outcome.state == BAD and "t.py::t1" in outcome.reason


D, G, B, S = (Outcome(DIVERGED, "d"), Outcome(GOOD, "g"), Outcome(BAD, "b"), Outcome(SKIP, "s"))


@pytest.mark.parametrize(
    ("attempts", "expected"),
    [
        ([G], GOOD),
        ([B], BAD),
        ([S], SKIP),
        ([D], None),
        ([D, G], None),
        ([D, G, G], GOOD),
        ([D, B, B], BAD),
        ([D, G, B], SKIP),
        ([D, D], SKIP),  # two of three diverged: no majority can come
        ([D, S], SKIP),
        ([D, G, D], SKIP),
    ],
)
def test_a_diverging_commit_is_decided_by_a_majority_of_three(attempts: list[Outcome], expected: str | None) -> None:
    decided = decide(attempts)
    assert (decided.state if decided else None) == expected


def test_step_env_puts_the_commit_first_and_drops_the_checkout(tmp_path: Path) -> None:
    checkout, worktree, other = tmp_path / "checkout", tmp_path / "wt", tmp_path / "lib"
    for folder in (checkout / "src", worktree / "src", other):
        folder.mkdir(parents=True)
    base = {"PYTHONPATH": os.pathsep.join([str(checkout), str(checkout / "src"), str(other)]), "GIT_DIR": "x"}
    env = step_env(worktree, checkout, base)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(worktree / "src"), str(worktree), str(other)]
    assert "GIT_DIR" not in env


def test_help_shows_bisect_its_example_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_repro.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "bisect" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bisect", "--help"])
    out = capsys.readouterr().out
    assert "pytest-repro bisect --good v1.2 -- tests/test_eval.py::test_eval_loss" in out
    assert "exit codes: 0 found;" in out and "130 interrupted" in out


def test_regenerating_while_bisecting_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_repro.cli import main

    assert main(["bisect", "--good", "HEAD~1", "--", "--repro-regen"]) == 2
    err = capsys.readouterr().err
    assert "pytest-repro bisect: --repro-regen would overwrite references; drop it: bisect only compares" in err
