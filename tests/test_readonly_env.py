"""A read-only environment folder (its parent writable), as a user without root sees it: a regeneration fails
clearly and changes nothing; a stale staging folder that cannot be removed is said to be there, not removed."""

from __future__ import annotations

import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import env_key, snapshot

pytestmark = pytest.mark.slow

TEST = """
import pytest
from userjobs import train

@pytest.mark.reproducible
def test_y(repro):
    repro.check(train, config={{"lr": {lr}}})
"""

# Root ignores permission bits. To see what a user sees, the inner pytest runs with the capabilities that let
# root override them dropped from its bounding set (so from every process it starts): permission bits apply.
NO_PRIVILEGES = """
import ctypes
import os
import sys

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 1, 2, 3
if os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            sys.exit("cannot drop capability %d: %s" % (cap, os.strerror(ctypes.get_errno())))
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""

READ_ONLY = stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH


def _unprivileged(p: pytest.Pytester, *args: str) -> pytest.RunResult:
    """Run python (``args``) in the pytester folder, in a process that permission bits apply to."""
    wrapper = p.path / "no_privileges.py"
    if not wrapper.exists():
        wrapper.write_text(NO_PRIVILEGES)
    return p.run(sys.executable, str(wrapper), *args, timeout=300)


@pytest.fixture
def project(userjobs: pytest.Pytester) -> Iterator[pytest.Pytester]:
    """A project with one recorded reference, checked to be unwritable to an unprivileged process when read-only."""
    probe = userjobs.path / "probe"
    probe.mkdir()
    probe.chmod(READ_ONLY)
    tried = _unprivileged(
        userjobs, "-c", "try:\n    open('probe/x', 'w')\nexcept PermissionError:\n    print('denied')"
    )
    probe.chmod(0o755)
    assert tried.ret == 0, tried.stderr.str()
    if tried.stdout.lines != ["denied"]:
        pytest.skip("cannot run a process that read-only permission bits apply to (root without capability drop)")
    userjobs.makepyfile(test_x=TEST.format(lr=0.05))
    assert userjobs.runpytest("--repro", "--repro-regen").ret == 0
    yield userjobs
    for folder in _test_dir(userjobs).iterdir():  # let pytester's cleanup remove everything, also as non-root
        folder.chmod(0o755)


def _test_dir(p: pytest.Pytester) -> Path:
    return p.path / "reference_outputs" / "test_x" / "test_y"


def _pytest(p: pytest.Pytester, *args: str) -> str:
    result = _unprivileged(p, "-m", "pytest", "-p", "no:cacheprovider", "--repro", "-rA", *args)
    return result.stdout.str() + result.stderr.str()


def test_regen_into_a_read_only_environment_folder_fails_and_changes_nothing(project: pytest.Pytester) -> None:
    env = _test_dir(project) / env_key()
    before = snapshot(env)
    env.chmod(READ_ONLY)
    project.makepyfile(test_x=TEST.format(lr=0.1))  # different values: the regeneration must replace the reference
    out = _pytest(project, "--repro-regen")
    assert "reproducibility: 1 error" in out, out
    assert "WRITTEN" not in out and "1 written" not in out, "a write that did not happen is never reported"
    assert f"cannot replace {env}: permission denied (it is read-only" in out, out
    assert f"chmod -R u+w {env}" in out and "make the reference folder writable" in out, "the fix is named"
    assert snapshot(env) == before, "the old reference is intact"
    assert not [x.name for x in _test_dir(project).iterdir() if x.name.startswith(".")], "no staging left behind"

    out = _pytest(project)  # a later run: nothing stale to clean, and it says nothing about cleaning
    assert "stale" not in out, out
    assert "1 differs" in out, "the old reference is still the one compared with"


def test_a_stale_staging_folder_that_cannot_be_removed_is_not_reported_removed(project: pytest.Pytester) -> None:
    stale = _test_dir(project) / f".{env_key()}.new-99999999"  # a killed regeneration's, pid 99999999 is gone
    stale.mkdir()
    (stale / "weights.safetensors").write_bytes(b"partial")
    stale.chmod(READ_ONLY)
    out = _pytest(project)
    assert "reproducibility: 1 passed" in out, out
    assert "removed the stale" not in out, "a removal that did not happen is never reported"
    assert f"could not remove the leftover staging folder {stale} of an earlier regeneration" in out, out
    assert "Permission denied" in out and f"chmod -R u+w {stale} && rm -rf {stale}" in out, "the cause and the fix"
    assert (stale / "weights.safetensors").read_bytes() == b"partial"

    stale.chmod(0o755)  # made writable as the note says: the next run removes it and says so
    out = _pytest(project)
    assert "removed the stale staging folder" in out and not stale.exists(), out


def _chattr(flag: str, path: Path) -> bool:
    import subprocess

    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


def test_an_old_reference_that_cannot_be_removed_after_the_swap_is_said_to_be_left(userjobs: pytest.Pytester) -> None:
    userjobs.makepyfile(test_x=TEST.format(lr=0.05))
    assert userjobs.runpytest("--repro", "--repro-regen").ret == 0
    env = _test_dir(userjobs) / env_key()
    notes = env / "NOTES.md"  # a file of the user's that nobody, root included, may remove
    notes.write_text("mine\n")
    if not _chattr("+i", notes):
        pytest.skip("chattr +i is not possible here (no CAP_LINUX_IMMUTABLE, or the filesystem lacks it)")
    try:
        userjobs.makepyfile(test_x=TEST.format(lr=0.1))
        out = userjobs.runpytest("--repro", "--repro-regen", "-rA").stdout.str()
        assert "reproducibility: 1 written" in out, out
        assert (env / "NOTES.md").read_text() == "mine\n", "the user's file is carried over"
        left = [x for x in _test_dir(userjobs).iterdir() if x.name.startswith(".")]
        assert len(left) == 1 and (left[0] / "NOTES.md").exists(), left
        assert f"the new reference is in place, but the old one, moved to {left[0]}, could not be removed" in out
        assert "Operation not permitted" in out and f"rm -rf {left[0]}" in out, out
    finally:
        for folder in _test_dir(userjobs).iterdir():
            _chattr("-i", folder / "NOTES.md")
