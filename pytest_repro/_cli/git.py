"""Git plumbing for commands that work on other commits: run git, resolve revisions, temporary worktrees, bisect.

A temporary worktree (``git worktree add --detach``) keeps its own HEAD, index and bisect state apart from
the main checkout's, so a command can check out, reset and bisect there without touching the user's files.
Its folder lives in a temporary folder that names its owner (``OWNER_FILE``), so that a later run can remove
what a killed one left registered (``stale_worktrees``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..errors import FixableError

OWNER_FILE = "owner.pid"
# Set by git for hooks and aliases: they would point this process's git at another repository or index
ENV_DROP = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_PREFIX", "GIT_OBJECT_DIRECTORY")
_CANNOT_BISECT = ("We cannot bisect more", "only 'skip'ped commits left")


class GitError(FixableError):
    """A git command failed: ``problem`` (the command and git's message) and its ``fix``."""


def git(args: Sequence[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``git ARGS`` in ``cwd`` (C locale, never prompting); GitError when ``check`` and it fails."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
    env.update(LC_ALL="C", LANGUAGE="C", GIT_TERMINAL_PROMPT="0")
    try:
        result = subprocess.run(
            ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
        )
    except OSError as exc:  # git missing, or the folder is gone
        result = subprocess.CompletedProcess(["git", *args], 127, "", f"{exc}")
    if check and result.returncode != 0:
        message = " ".join((result.stderr or result.stdout).split())[:300]
        raise GitError(f"'git {' '.join(args)}' failed: {message}", "check the repository and the revisions")
    return result


# -- the repository and its revisions ----------------------------------------------------------------------


def toplevel(cwd: Path) -> Path | None:
    """The top folder of the checkout ``cwd`` lies in; None outside a git repository."""
    top = git(["rev-parse", "--show-toplevel"], cwd, check=False)
    return Path(top.stdout.strip()) if top.returncode == 0 else None


def prefix(cwd: Path) -> str:
    """``cwd`` relative to its checkout's top folder ('' at the top, else ending in /)."""
    return git(["rev-parse", "--show-prefix"], cwd).stdout.strip()


def commit(rev: str, cwd: Path) -> str | None:
    """The full sha of the commit ``rev`` names; None when it names none."""
    found = git(["rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd, check=False)
    return found.stdout.strip() if found.returncode == 0 else None


def is_ancestor(older: str, newer: str, cwd: Path) -> bool:
    """Whether ``older`` is on ``newer``'s history."""
    return git(["merge-base", "--is-ancestor", older, newer], cwd, check=False).returncode == 0


def head(worktree: Path) -> str:
    """The sha checked out in ``worktree``."""
    return git(["rev-parse", "HEAD"], worktree).stdout.strip()


def subject(sha: str, cwd: Path) -> str:
    """The commit's subject line."""
    return git(["show", "-s", "--format=%s", sha], cwd).stdout.strip()


def describe(sha: str, cwd: Path) -> tuple[str, str, str, str]:
    """The commit's full sha, subject, author date (ISO) and author name."""
    full, title, date, author = git(["show", "-s", "--format=%H%n%s%n%aI%n%an", sha], cwd).stdout.splitlines()[:4]
    return full, title, date, author


def is_sha(text: str) -> bool:
    """Whether ``text`` is a full (40 hex digit) sha."""
    return len(text) == 40 and all(c in "0123456789abcdef" for c in text)


# -- temporary worktrees -----------------------------------------------------------------------------------


def make_temp(temp_prefix: str) -> Path:
    """Create a temporary folder for a worktree, owned by this process (its pid in ``OWNER_FILE``)."""
    temp = Path(tempfile.mkdtemp(prefix=temp_prefix)).resolve()
    (temp / OWNER_FILE).write_text(str(os.getpid()))
    return temp


def add_worktree(top: Path, worktree: Path, sha: str) -> None:
    """Check ``sha`` out, detached, in a new worktree of the repository at ``top``."""
    git(["worktree", "add", "--detach", "--quiet", str(worktree), sha], top)


def checkout(worktree: Path, sha: str) -> None:
    """Check ``sha`` out, detached, in ``worktree``."""
    git(["checkout", "--quiet", "--detach", sha], worktree)


def reset(worktree: Path) -> None:
    """Drop every change and untracked or ignored file in ``worktree`` (so that git can check out the next)."""
    git(["reset", "--hard", "--quiet"], worktree)
    git(["clean", "-ffdxq"], worktree)


def remove_worktree(top: Path, worktree: Path, temp: Path) -> bool:
    """Remove ``worktree`` and its temporary folder ``temp``, and unregister it; return whether it stayed."""
    git(["worktree", "remove", "--force", str(worktree)], top, check=False)
    shutil.rmtree(temp, ignore_errors=True)
    git(["worktree", "prune"], top, check=False)
    listed = git(["worktree", "list", "--porcelain"], top, check=False).stdout
    return temp.exists() or f"worktree {worktree}" in listed.splitlines()


def remove_stale_worktrees(top: Path, temp_prefix: str) -> list[tuple[Path, bool]]:
    """Remove the worktrees in ``temp_prefix`` folders whose owner is gone (killed: SIGKILL, power loss).

    Return each one found with whether it is gone now; a worktree whose owner still runs is left alone.
    """
    from ..storage import pid_alive

    found = []
    listing = git(["worktree", "list", "--porcelain"], top).stdout
    for line in listing.splitlines():
        if not line.startswith("worktree "):
            continue
        path = Path(line[len("worktree ") :])
        if not path.parent.name.startswith(temp_prefix):
            continue
        try:
            owner = int((path.parent / OWNER_FILE).read_text())
        except (OSError, ValueError):
            owner = 0
        if owner and pid_alive(owner):
            continue  # another run is using it
        git(["worktree", "remove", "--force", str(path)], top, check=False)
        shutil.rmtree(path.parent, ignore_errors=True)
        found.append((path, not path.parent.exists()))
    git(["worktree", "prune"], top, check=False)
    return found


# -- git bisect, driven step by step in a worktree ---------------------------------------------------------


def bisect(worktree: Path, args: Sequence[str]) -> str:
    """Run ``git bisect ARGS`` in ``worktree``; return its output (GitError unless it ran or cannot go on)."""
    result = git(["bisect", *args], worktree, check=False)
    out = result.stdout + result.stderr
    if result.returncode != 0 and not any(marker in out for marker in _CANNOT_BISECT):
        raise GitError(f"'git bisect {' '.join(args)}' failed: {' '.join(out.split())[:300]}", "report this")
    return out


def first_bad(out: str) -> str | None:
    """The sha that ``git bisect``'s output names as the first bad commit, if it does."""
    for line in out.splitlines():
        words = line.split()
        if line.endswith("is the first bad commit") and words and is_sha(words[0]):
            return words[0]
    return None


def cannot_bisect_more(out: str) -> bool:
    """Whether ``git bisect``'s output says only skipped commits are left next to the first bad one."""
    return any(marker in out for marker in _CANNOT_BISECT)


def candidates(out: str) -> list[str]:
    """The shas ``git bisect`` lists when it cannot narrow the first bad commit down to one."""
    return [line.split()[0] for line in out.splitlines() if len(line) >= 40 and is_sha(line.split()[0])]
