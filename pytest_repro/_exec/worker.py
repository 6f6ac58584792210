"""The warm fork worker's own loop: runs in the worker process, started as ``python -m pytest_repro._exec.worker``.

It imports the heavy libraries once (never touching CUDA) and forks one child per run, so every run starts
from the same clean, just-imported state without paying the imports again. What it imports grows while it
lives (import requests). It forks several children at a time when asked. Messages: see ``protocol``.

Two ways to serve: one session on stdin/stdout (ends with it), or, as the daemon (``--listen-fd``), every
session of the same user, interpreter and installed packages on a Unix socket the session created (owner-only;
peers of another uid are refused); the daemon ends after ``--idle`` seconds without sessions or runs, on a
``stop`` request (its runs killed), or once retired (no new sessions; it ends when its last one leaves).

Like pytest-xdist's remote side, this module imports nothing of the package but ``pytest_repro.context``
and, from ``_exec``, ``child``, ``preimport``, ``procs`` and ``protocol`` (the job process's side, which may add
``record`` and ``seeding``), and the stdlib: grep its imports to check. The pytest process never imports it.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

from .daemon_files import Files, close_inherited_fds
from .preimport import log, preload_logged
from .serve import Conn, Server


def worker_main(modules: list[str]) -> None:
    """Serve one session on stdin: import once, fork fresh children for runs (several at a time), reply on stdout."""
    proto_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints from imports must not corrupt the protocol
    server = Server(None, 0.0, "", None)
    conn = Conn(0, proto_fd)
    server.conns[0] = conn
    server.absorb(modules, preload_logged(modules, "at start"))
    conn.send(server.ready())
    server.loop()


def daemon_main(listen_fd: int, idle: float, key: str, files: Files, modules: list[str]) -> None:
    """Serve every session of this user and environment on the inherited listening socket until idle or stopped."""
    close_inherited_fds(keep=listen_fd)
    listener = socket.socket(fileno=listen_fd)
    listener.setblocking(False)
    server = Server(listener, idle, key, files)
    log(f"daemon started (key {key}, idle timeout {idle:g} s, {sys.executable})")
    # Sessions that connect now wait in the socket's backlog until the start-up imports are done.
    server.absorb(modules, preload_logged(modules, "at start"))
    server.last_active = time.monotonic()  # idle from now, not from before the imports
    server.loop()
    log(f"daemon exiting after {server.served} run(s) for {server.sessions} session(s)")


def main(argv: list[str]) -> int:
    """Entry point: ``python -m pytest_repro._exec.worker [--listen-fd N --idle S ...] [MODULE...]``."""
    parser = argparse.ArgumentParser(prog="pytest_repro._exec.worker")
    parser.add_argument("--listen-fd", type=int)
    parser.add_argument("--idle", type=float, default=1800.0)
    parser.add_argument("--key", default="")
    parser.add_argument("--socket", default="")
    parser.add_argument("--state", default="")
    parser.add_argument("--lock", default="")
    parser.add_argument("modules", nargs="*")
    args = parser.parse_args(argv)
    if args.listen_fd is None:
        worker_main(args.modules)
    else:
        daemon_main(args.listen_fd, args.idle, args.key, Files(args.socket, args.state, args.lock), args.modules)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
