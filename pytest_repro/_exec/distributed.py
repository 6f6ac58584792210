"""Jobs on several ranks: one forked process per rank, torch.distributed set up around the job.

Runs inside the job's process (the run's launcher): it forks N rank processes from its fresh,
just-imported state, and the first rank that fails takes the others down at once, so a rank blocked
in a collective never hangs the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..context import RunSpec

ERROR_FILE = "error.json"
LOG_FILE = "output.log"


def free_port() -> int:
    """A free TCP port on the loopback interface for the rendezvous (env:// init)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rank_dir(workdir: Path, rank: int) -> Path:
    """Where rank ``rank`` of a run writes its record and output (rank 0: the run's own folder)."""
    return workdir if rank == 0 else workdir / f"rank{rank}"


def launch(spec: RunSpec, run_rank: Callable[[RunSpec, int], int]) -> int:
    """Run ``run_rank`` in one forked process per rank; return 0 when every rank succeeded."""
    workdir = Path(spec.workdir)
    port = free_port()
    pids: dict[int, int] = {}
    for rank in range(spec.nproc):
        folder = rank_dir(workdir, rank)
        folder.mkdir(parents=True, exist_ok=True)
        pid = os.fork()
        if pid == 0:  # a rank
            code = 1
            try:
                os.environ.update(
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port),
                    RANK=str(rank),
                    LOCAL_RANK=str(rank),
                    WORLD_SIZE=str(spec.nproc),
                )
                code = run_rank(replace(spec, workdir=str(folder), manifest=spec.manifest and rank == 0), rank)
            finally:
                os._exit(code)
        pids[pid] = rank
    failure: tuple[int, int] | None = None
    while pids:
        pid, status = os.wait()
        rank = pids.pop(pid)
        if status != 0 and failure is None:
            failure = (rank, status)
            for other in pids:  # blocked in a collective with the failed rank: stop them now
                with contextlib.suppress(ProcessLookupError):
                    os.kill(other, signal.SIGKILL)
    if failure is None:
        return 0
    _report(workdir, *failure)
    return 1


def _report(workdir: Path, rank: int, status: int) -> None:
    """Write the run's error report: which rank failed, its traceback and the end of its output."""
    folder = rank_dir(workdir, rank)
    try:
        error = json.loads((folder / ERROR_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        how = (
            f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
            if os.WIFSIGNALED(status)
            else f"exited with code {os.WEXITSTATUS(status)}"
        )
        error = {"stage": "job", "type": "RankFailed", "message": how, "traceback": f"the process {how}"}
    try:
        tail = (folder / LOG_FILE).read_text(encoding="utf-8", errors="replace")[-3000:]
    except OSError:
        tail = ""
    output = f"\n--- output of rank {rank} (last lines) ---\n{tail}" if tail.strip() and rank != 0 else ""
    error["traceback"] = f"rank {rank} failed; the other ranks were stopped.\nrank {rank}: {error['traceback']}{output}"
    error["rank"] = rank
    (workdir / ERROR_FILE).write_text(json.dumps(error), encoding="utf-8")


@contextlib.contextmanager
def process_group(spec: RunSpec, rank: int) -> Iterator[dict[str, Any]]:
    """Initialise torch.distributed for this rank (gloo on CPU, nccl on CUDA) and destroy it afterwards."""
    import datetime

    import torch
    import torch.distributed as dist

    cuda = spec.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(rank)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(
        backend, init_method="env://", rank=rank, world_size=spec.nproc, timeout=datetime.timedelta(seconds=120)
    )
    yield {"backend": backend, "world_size": spec.nproc, "device": f"cuda:{rank}" if cuda else spec.device}
    # Only after a job that returned: destroying the group waits on the peers, which may be blocked in a
    # collective with a rank that raised; that rank just exits (its error report first) and the
    # launcher kills the others.
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
