"""Jobs on several ranks: repro.check(job, nproc=2) with torch.distributed (gloo) set up by the harness."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.slow

DDP_JOBS = """
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def train_ddp(ctx):
    cfg = ctx.config
    assert dist.is_initialized() and dist.get_world_size() == ctx.world_size
    torch.manual_seed(ctx.seed)  # the same initial weights on every rank
    data = TensorDataset(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), torch.randn(64, 1))
    sampler = DistributedSampler(data, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=ctx.seed)
    loader = DataLoader(data, batch_size=8, sampler=sampler)
    model = DDP(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    step = 0
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for x, y in loader:
            if ctx.rank == 1 and cfg.get("raise_at") == step:
                raise RuntimeError(f"rank 1 exploded at step {step}")
            if ctx.rank == 1:
                x = x + cfg.get("rank1_shift", 0.0)
                if cfg.get("rank1_noise"):
                    x = x + int.from_bytes(os.urandom(2), "little") * 1e-6
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            step += 1
    return {"losses": losses, "weights": dict(model.module.state_dict()), "metrics": {"rank": float(ctx.rank)}}
"""

TEST = """
import pytest
from ddpjobs import train_ddp

@pytest.mark.reproducible
def test_ddp(repro):
    result = repro.check(train_ddp, config={config}, nproc=2)
    assert set(result.ranks) == {{1}} and result.metrics["rank"] == 0.0
"""


@pytest.fixture
def ddp(heavy_modules: None, pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(ddpjobs=DDP_JOBS)
    pytester.makeini("[pytest]\nrepro_timeout = 60\nrepro_config_audit = off\n")
    pytester.syspathinsert()
    return pytester


def write(p: pytest.Pytester, config: str = "{}") -> None:
    p.makepyfile(test_d=TEST.format(config=config))


def test_two_rank_ddp_job_passes_against_its_reference_and_stores_every_rank(ddp: pytest.Pytester) -> None:
    write(ddp)
    ddp.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    folders = sorted(p.name for p in ddp.path.glob("reference_outputs/test_d/test_ddp/*/*") if p.is_dir())
    assert folders == ["rank1"], folders
    result = ddp.runpytest("--repro", "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["PASSED*test_d.py::test_ddp*"])
    assert "replicas should stay identical" not in result.stdout.str()


def test_a_change_on_rank_1_only_is_named(ddp: pytest.Pytester) -> None:
    write(ddp)
    ddp.runpytest("--repro", "--repro-regen").assert_outcomes(passed=1)
    write(ddp, '{"rank1_shift": 0.5}')
    result = ddp.runpytest("--repro")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "rank 1: losses: first divergent step 0: reference" in out, out
    assert "DIFFERS" in out and "on rank 1" not in out.split("rank 1: losses")[0].split("What differs")[-1]
    # DDP averages gradients: rank 0's weights move too, and its losses from step 1 on
    assert "rank 0: losses: first divergent step 1" in out


def test_nondeterminism_on_rank_1_only_is_named_run_to_run(ddp: pytest.Pytester) -> None:
    write(ddp, '{"rank1_noise": True}')
    result = ddp.runpytest("--repro", "--repro-regen")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "is not reproducible run-to-run: runs 1 and 2 diverge at step 0 on rank 1" in out, out
    assert "rank 1: losses: first divergent step 0: run 1" in out


def test_a_rank_that_raises_fails_promptly_with_its_traceback(ddp: pytest.Pytester) -> None:
    write(ddp, '{"raise_at": 2}')
    started = time.monotonic()
    result = ddp.runpytest("--repro", "--repro-regen")
    elapsed = time.monotonic() - started
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "rank 1 failed; the other ranks were stopped." in out and "RuntimeError: rank 1 exploded at step 2" in out
    assert elapsed < 20, f"took {elapsed:.1f} s: a rank blocked in a collective must not hang the run"


def test_bad_nproc_is_an_error(ddp: pytest.Pytester) -> None:
    ddp.makepyfile(
        test_d="""
        import pytest
        from ddpjobs import train_ddp

        @pytest.mark.reproducible
        def test_ddp(repro):
            repro.check(train_ddp, nproc=0)
        """
    )
    result = ddp.runpytest("--repro")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*repro.check(nproc=...) takes a number of ranks >= 1, got 0*"])
