"""The warm worker daemon: later sessions fork from it; killed, stale, concurrent, xdist, another venv, idle, CLI.

Each test starts real daemons (a few seconds of imports each) in its own pytester project and stops them
at teardown: none outlives the test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import USER_JOBS

from pytest_repro._exec import daemon as daemon_mod
from pytest_repro._exec import daemon_key
from pytest_repro._exec.daemon import DIR_NAME, DaemonUnavailable, Place, daemons, is_daemon, stop
from pytest_repro.session import daemon_wanted

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the daemon needs Linux (fork, /proc)")

TEST = """
import pytest
from userjobs import train


@pytest.mark.reproducible
@pytest.mark.parametrize("steps", [3, 4])
def test_a(repro, steps):
    repro.check(train, config={"steps": steps, **CONFIG})
"""
DAEMON = "--repro-worker=daemon"
STARTED = re.compile(r"started the worker daemon pid (\d+)")
WARM = re.compile(r"runs forked by the warm worker daemon pid (\d+)")


def _folder(project: Path) -> Path:
    return project / ".pytest_cache" / "d" / DIR_NAME


def _live(project: Path) -> list[int]:
    return [int(state["pid"]) for _, state, status in daemons(_folder(project)) if status is not None]


def _pid(pattern: re.Pattern[str], text: str) -> int:
    found = pattern.search(text)
    assert found is not None, text
    return int(found.group(1))


def _wait_for(predicate: object, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def _run(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """One pytest session in its own process (as a user would start it)."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:randomly", *args],
        cwd=project,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with two reproducible tests and their references (written once, without a daemon)."""
    path = tmp_path_factory.mktemp("daemon-template")
    (path / "userjobs.py").write_text(USER_JOBS)
    (path / "pytest.ini").write_text("[pytest]\nrepro_timeout = 120\n")
    (path / "test_a.py").write_text(TEST.replace("**CONFIG", ""))
    no_ci = {k: v for k, v in os.environ.items() if k != "CI"}  # module scope: before the autouse _no_ci
    proc = _run(path, "--repro", "--repro-regen", "--repro-worker=session", "-q", "-p", "no:cacheprovider", env=no_ci)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return path


@pytest.fixture
def project(template: Path, tmp_path: Path) -> Iterator[Path]:
    """A copy of the template project of its own; every daemon started in it is stopped afterwards."""
    path = tmp_path / "p"
    shutil.copytree(template, path)
    try:
        yield path
    finally:
        for place, state, _ in daemons(_folder(path)):
            stop(place, state)


def test_a_later_session_forks_from_the_warm_daemon_bitwise_as_fork_and_spawn(project: Path) -> None:
    first = _run(project, "--repro", DAEMON)
    assert first.returncode == 0, first.stdout + first.stderr
    pid = _pid(STARTED, first.stdout)
    assert _live(project) == [pid]
    second = _run(project, "--repro", DAEMON)
    assert second.returncode == 0, second.stdout + second.stderr
    assert _pid(WARM, second.stdout) == pid
    assert "(2 passed" in second.stdout or "2 passed" in second.stdout
    # The references were written by a worker of the session's own (fork): the daemon's runs matched them
    # bitwise above, and so do fresh interpreters' (spawn).
    other = _run(project, "--repro", "--repro-isolation=spawn")
    assert other.returncode == 0, other.stdout + other.stderr
    assert "worker daemon" not in other.stdout
    # Owner-only files: the folder 0700, the socket 0600.
    folder = _folder(project)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    sock = Place(folder, daemons(folder)[0][1]["key"]).socket
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    status = subprocess.run(
        [sys.executable, "-m", "pytest_repro.cli", "worker", "status"], cwd=project, capture_output=True, text=True
    )
    assert status.returncode == 0
    assert re.search(
        rf"worker daemon pid {pid}: up .*, 0 session\(s\) now, 0 run\(s\) in progress, 8 run\(s\) for 2",
        status.stdout,
    )
    assert "up to date" in status.stdout
    stopped = subprocess.run(
        [sys.executable, "-m", "pytest_repro.cli", "worker", "stop"], cwd=project, capture_output=True, text=True
    )
    assert stopped.stdout.strip() == f"stopped worker daemon pid {pid}"
    assert _wait_for(lambda: not is_daemon(pid))
    assert not sock.exists()


def test_a_daemon_killed_mid_session_is_replaced_and_said_once(project: Path) -> None:
    # The first run kills the daemon that forked it (once: a marker file remembers); results are unchanged,
    # so the template's references still hold.
    (project / "userjobs.py").write_text(
        "import os as _os, pathlib as _pathlib, signal as _signal\n"
        + USER_JOBS.replace(
            "def train(ctx):\n",
            "def train(ctx):\n"
            "    marker = _pathlib.Path(_os.environ['KILL_MARKER'])\n"
            "    if not marker.exists():\n"
            "        marker.write_text('x')\n"
            "        _os.kill(_os.getppid(), _signal.SIGKILL)\n",
        )
    )
    marker = project / "killed.txt"
    env = {**os.environ, "KILL_MARKER": str(marker)}
    first = _run(project, "--repro", DAEMON, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert marker.exists()
    dead = _pid(STARTED, first.stdout)
    assert first.stdout.count("went away mid-session") == 1, first.stdout
    assert f"the worker daemon pid {dead} went away mid-session" in first.stdout
    assert "2 passed" in first.stdout
    assert not is_daemon(dead)
    # The next session starts a new one over the dead one's files.
    again = _run(project, "--repro", DAEMON, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert _pid(STARTED, again.stdout) != dead


def test_a_package_change_retires_the_stale_daemon(project: Path) -> None:
    infos = [p for site in daemon_key._site_dirs() for p in sorted(site.iterdir()) if p.name.endswith(".dist-info")]
    if not infos or not os.access(infos[0], os.W_OK):
        pytest.skip("no writable *.dist-info folder to touch in site-packages")
    first = _run(project, "--repro", DAEMON)
    assert first.returncode == 0, first.stdout + first.stderr
    old = _pid(STARTED, first.stdout)
    # A `pip install` touches a *.dist-info folder in site-packages: do that to one (restored afterwards).
    info = infos[0]
    before = info.stat()
    try:
        os.utime(info, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        second = _run(project, "--repro", DAEMON)
    finally:
        os.utime(info, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"retired the worker daemon pid {old}: the installed packages changed" in second.stdout
    new = _pid(STARTED, second.stdout)
    assert new != old
    assert _wait_for(lambda: not is_daemon(old)), "the retired daemon did not end"


def test_a_changed_imported_file_retires_the_daemon_and_user_code_never_enters_it(project: Path) -> None:
    # A library outside site-packages (an editable install, say) that the daemon was asked to preload.
    lib = project / "lib"
    lib.mkdir()
    (lib / "thirdmod.py").write_text("VALUE = 1\n")
    env = {**os.environ, "PYTHONPATH": str(lib)}
    (project / "log.txt").write_text("")
    # The job names the user's own module in its preload list and records which processes import it.
    (project / "userjobs.py").write_text(
        USER_JOBS + "\nimport os as _os\nwith open('log.txt', 'a') as _f:\n    _f.write(f'{_os.getpid()} ')\n"
        "train.__repro_preload__ = ['userjobs', 'thirdmod']\n"
    )
    first = _run(project, "--repro", DAEMON, "-k", "3", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    old = _pid(STARTED, first.stdout)
    cache = project / ".pytest_cache" / "v" / "repro" / "preload"
    cache.write_text(json.dumps({"modules": ["thirdmod"]}))  # as if a run had taught it
    second = _run(project, "--repro", DAEMON, "-k", "3", env=env)
    assert second.returncode == 0 and _pid(WARM, second.stdout) == old  # it imported thirdmod when asked
    [log] = _folder(project).glob("*.log")
    assert "preloaded 1 of 1 requested module(s) on request" in log.read_text()
    assert str(old) not in (project / "log.txt").read_text().split()  # never imported the user's module
    (lib / "thirdmod.py").write_text("VALUE = 2  # edited\n")
    third = _run(project, "--repro", DAEMON, "-k", "3", env=env)
    assert third.returncode == 0, third.stdout + third.stderr
    changed = f"retired the worker daemon pid {old}: {lib / 'thirdmod.py'} changed since the daemon imported it"
    assert changed in third.stdout
    assert _pid(STARTED, third.stdout) != old
    assert _wait_for(lambda: not is_daemon(old))


def test_two_sessions_at_once_share_one_daemon(project: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:randomly", "--repro", DAEMON, "-k", k],
            cwd=project,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for k in ("3", "4")
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    started = [STARTED.search(o) for o in outs]
    warm = [WARM.search(o) for o in outs]
    assert sum(m is not None for m in started) == 1, outs  # exactly one of them started it
    pids = {int(m.group(1)) for m in [*started, *warm] if m is not None}
    assert len(pids) == 1 and _live(project) == list(pids)


def test_xdist_workers_share_the_daemon(project: Path) -> None:
    pytest.importorskip("xdist")
    proc = _run(project, "--repro", DAEMON, "-n", "2")  # both workers race to start it
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout
    [(_, _, status)] = daemons(_folder(project))  # one daemon
    assert status is not None
    assert status["served"] == 4 and status["sessions_served"] == 2  # both workers' runs (2 runs a test)


def test_another_venv_gets_its_own_daemon(project: Path, tmp_path: Path) -> None:
    import site
    import venv

    # A second venv that sees this one's packages through a .pth file: same packages, another interpreter.
    other = tmp_path / "venv2"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(other)
    python = other / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    lines = [f"import site; site.addsitedir({d!r})\n" for d in site.getsitepackages()]
    Path(purelib, "parent_env.pth").write_text("".join(lines))
    mine = _run(project, "--repro", DAEMON)
    theirs = subprocess.run(
        [str(python), "-m", "pytest", "-p", "no:randomly", "--repro", DAEMON],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert mine.returncode == 0 and theirs.returncode == 0, theirs.stdout + theirs.stderr
    a, b = _pid(STARTED, mine.stdout), _pid(STARTED, theirs.stdout)
    assert a != b and sorted(_live(project)) == sorted([a, b])
    assert "retired" not in theirs.stdout  # another venv's daemon is not out of date, just not ours
    status = subprocess.run(
        [sys.executable, "-m", "pytest_repro.cli", "worker", "status"], cwd=project, capture_output=True, text=True
    ).stdout
    assert "up to date" in status and f"for {os.path.realpath(python)}" in status


def test_an_idle_daemon_exits_and_removes_its_files(project: Path) -> None:
    # An idle time far shorter than its start-up imports: it must still serve the session that started it.
    (project / "pytest.ini").write_text("[pytest]\nrepro_timeout = 120\nrepro_worker_idle = 0.5\n")
    proc = _run(project, "--repro", DAEMON, "-k", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pid = _pid(STARTED, proc.stdout)
    assert "exits after 0.5 s without sessions" in proc.stdout
    assert "went away" not in proc.stdout and "could not be used" not in proc.stdout
    assert _wait_for(lambda: not is_daemon(pid), 20)
    assert not list(_folder(project).glob("*.sock")) and not list(_folder(project).glob("*.json"))


def test_a_killed_session_leaves_no_run_behind_in_the_daemon(project: Path) -> None:
    (project / "test_hang.py").write_text(
        "import pytest\nfrom userjobs import train\n\n\n@pytest.mark.reproducible\n"
        "def test_hang(repro):\n    repro.check(train, config={'hang_at': 1})\n"
    )
    _run(project, "--repro", DAEMON, "-k", "3")
    [pid] = _live(project)
    session = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:randomly", "--repro", DAEMON, "test_hang.py"],
        cwd=project,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def children() -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    assert _wait_for(lambda: bool(children()), 60), "the hanging run never started"
    session.send_signal(signal.SIGKILL)
    session.wait()
    assert _wait_for(lambda: not children(), 15), "the daemon kept the killed session's run"
    assert is_daemon(pid)  # and it serves on
    again = _run(project, "--repro", DAEMON, "-k", "4")
    assert again.returncode == 0 and _pid(WARM, again.stdout) == pid


def test_an_unsafe_folder_means_no_daemon_and_one_line(project: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _folder(project).parent.mkdir(parents=True, exist_ok=True)
    _folder(project).symlink_to(elsewhere)  # a symlink is not a folder only this user controls
    proc = _run(project, "--repro", DAEMON, "-k", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the worker daemon could not be used" in proc.stdout
    assert "not a folder only this user can open" in proc.stdout
    assert not list(elsewhere.iterdir())
    nocache = _run(project, "--repro", DAEMON, "-k", "3", "-p", "no:cacheprovider")
    assert nocache.returncode == 0, nocache.stdout + nocache.stderr
    assert "no worker daemon: it lives in pytest's cache, which is disabled" in nocache.stdout


def test_sources_notice_a_changed_or_removed_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_repro._exec.daemon_files import Sources

    (tmp_path / "srcmod_a.py").write_text("A = 1\n")
    (tmp_path / "srcmod_b.py").write_text("B = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import srcmod_a  # noqa: F401

    sources = Sources()
    sources.note()
    assert sources.changed() == ""
    import srcmod_b  # noqa: F401

    sources.note()  # files of modules imported since
    (tmp_path / "srcmod_b.py").write_text("B = 22\n")
    assert sources.changed() == str(tmp_path / "srcmod_b.py")
    (tmp_path / "srcmod_b.py").write_text("B = 1\n")
    os.utime(tmp_path / "srcmod_b.py", ns=(1, 1))
    assert sources.changed() == str(tmp_path / "srcmod_b.py")  # same size, other time: changed too
    for name in ("srcmod_a", "srcmod_b"):
        sys.modules.pop(name)


def test_private_folders_and_state_files_naming_another_process(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    with pytest.raises(DaemonUnavailable):
        daemon_mod._private_dir(Path("/proc/1/nope"))
    daemon_mod._private_dir(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    folder.chmod(0o777)
    daemon_mod._private_dir(folder)  # ours but open to others: closed again
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    # A state file naming a pid that is not a daemon (this test process) is never trusted.
    place = Place(folder, "k" * 16)
    place.state.write_text(json.dumps({"pid": os.getpid(), "key": "k" * 16}))
    assert not is_daemon(os.getpid())
    assert daemons(folder)[0][2] is None


@pytest.mark.parametrize(
    ("setting", "environ", "expected"),
    [
        ("auto", {}, True),
        ("auto", {"CI": "true"}, False),
        ("auto", {"CI": "false"}, True),
        ("auto", {"CI": "true", "PYTEST_REPRO_WORKER": "daemon"}, True),
        ("auto", {"PYTEST_REPRO_WORKER": "session"}, False),
        ("daemon", {"CI": "1", "PYTEST_REPRO_WORKER": "session"}, True),
        ("session", {}, False),
    ],
)
def test_when_the_daemon_is_used(setting: str, environ: dict[str, str], expected: bool) -> None:
    assert daemon_wanted(setting, environ) is expected


def test_worker_status_without_a_cache_and_stop_of_an_unknown_pid(tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "pytest_repro.cli", "worker"]
    none = subprocess.run([*cli, "status"], cwd=tmp_path, capture_output=True, text=True)
    assert none.returncode == 0 and "no worker daemon" in none.stdout
    (tmp_path / ".pytest_cache").mkdir()
    unknown = subprocess.run([*cli, "stop", "--pid", "1"], cwd=tmp_path, capture_output=True, text=True)
    assert unknown.returncode == 2 and "no worker daemon with pid 1" in unknown.stderr
