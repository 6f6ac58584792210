"""Resume equivalence: check_resume end to end, and the checkpoint helper's bitwise round trip."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from pytest_repro import checkpoint  # noqa: E402

JOBS = """
import torch
from pytest_repro import checkpoint, seed_everything

STEPS = 8


def train(ctx):
    cfg = ctx.config
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    data = torch.Generator().manual_seed(ctx.seed)
    start = 0
    if ctx.resume_from is not None:
        parts = {"model": model}
        if not cfg.get("forget_optimizer"):
            parts.update(optimizer=opt, scheduler=sched)
        restored = checkpoint.load(ctx.resume_from, **parts)
        start = restored["step"]
        data.set_state(restored["extra"]["data"])
        if cfg.get("reseed_after_restore"):
            seed_everything(ctx.seed)  # a classic bug: the restored RNG states are thrown away
    end = ctx.stop_at if ctx.stop_at is not None else STEPS
    losses = []
    model.train()
    for _ in range(start, end):
        x = torch.randn(16, 4, generator=data)
        loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(loss.item())
    if ctx.stop_at is not None:
        parts = {"model": model}
        if not cfg.get("forget_optimizer"):
            parts.update(optimizer=opt, scheduler=sched)
        checkpoint.save(ctx.checkpoint_dir, step=end, extra={"data": data.get_state()}, **parts)
    return {"losses": losses, "weights": dict(model.state_dict())}
"""

TEST = """
import pytest
from resumejobs import train

@pytest.mark.reproducible
def test_resume(repro):
    repro.check_resume(train, config={config}, at={at})
"""


@pytest.fixture
def resumejobs(heavy_modules: None, pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(resumejobs=JOBS)
    pytester.makeini("[pytest]\nrepro_timeout = 60\nrepro_config_audit = off\n")
    pytester.syspathinsert()
    return pytester


def write(p: pytest.Pytester, config: str = "{}", at: str = "3") -> None:
    p.makepyfile(test_r=TEST.format(config=config, at=at))


@pytest.mark.slow
def test_resume_passes_when_every_state_is_restored(resumejobs: pytest.Pytester) -> None:
    write(resumejobs)
    result = resumejobs.runpytest("--repro", "--repro-regen")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["WRITTEN*test_r.py::test_resume*", "PASSED*test_r.py::test_resume [[]resume@3]: stopped after step 3*"]
    )
    resumejobs.runpytest("--repro").assert_outcomes(passed=1)


@pytest.mark.slow
def test_records_check_resume_returns_hold_no_open_files(resumejobs: pytest.Pytester) -> None:
    import os

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd (Linux) to count open files")
    resumejobs.makepyfile(
        test_keep="""
        import os, pytest
        from resumejobs import train

        KEPT = []

        @pytest.mark.reproducible
        @pytest.mark.parametrize("i", range(4))
        def test_keep(repro, i):
            KEPT.append(repro.check_resume(train, config={}, at=3))
            if i == 0:
                KEPT.append(len(os.listdir("/proc/self/fd")))
            if i == 3:
                assert len(os.listdir("/proc/self/fd")) <= KEPT[1]
                assert all(len(r.weights) == 4 for r in KEPT if not isinstance(r, int))
        """
    )
    result = resumejobs.runpytest_subprocess("--repro", "--repro-regen")
    result.assert_outcomes(passed=4)


@pytest.mark.slow
def test_resume_that_forgets_the_optimizer_names_the_first_step_and_what_was_not_saved(
    resumejobs: pytest.Pytester,
) -> None:
    write(resumejobs, config='{"forget_optimizer": True}')
    result = resumejobs.runpytest("--repro", "--repro-regen")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "resume mismatch: stopping after step 3 and resuming in a fresh process" in out
    # step 3 is computed with the restored model before the first update: the lost optimizer state shows at 4
    assert "first step after the resume that differs: step 4 (uninterrupted " in out
    assert "checkpoint.save was not given: optimizer, scheduler, scaler" in out
    # the probe names what the checkpoint did not bring back, and what it did
    assert (
        "At the resume boundary (step 3, before its first update), resumed vs uninterrupted: parameters, "
        "torch RNG, NumPy RNG and Python RNG match; optimizer state and learning rate differ; the input batch at "
        "step 3 matches: the checkpoint does not restore the optimizer state (save and load optimizer.state_dict())."
    ) in out
    assert "A checkpoint must restore the optimizer state, the LR scheduler, the RNG states" in out
    result.stdout.fnmatch_lines(["DIFFERS*test_r.py::test_resume [[]resume@3]: resume mismatch at step 4*"])
    # the uninterrupted check passed, but the test failed: its reference was not written
    assert not [p for p in (resumejobs.path / "reference_outputs").rglob("*")]


NANOGPT = """
import pytest
import torch


def train(ctx):
    # karpathy/nanoGPT's way: batches drawn from torch's global RNG, a checkpoint of model, optimizer and
    # iter_num written with torch.save, and no RNG state
    torch.manual_seed(ctx.seed)
    model = torch.nn.Sequential(torch.nn.Embedding(32, 16), torch.nn.Flatten(), torch.nn.Linear(16 * 8, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.randint(0, 32, (256, 9), generator=torch.Generator().manual_seed(0))
    iter_num = 0
    if ctx.resume_from is not None:
        ckpt = torch.load(ctx.resume_from / "ckpt.pt")
        model.load_state_dict(ckpt["model"])
        if "optimizer" in ckpt:
            opt.load_state_dict(ckpt["optimizer"])
        iter_num = ckpt["iter_num"]
    end = ctx.stop_at if ctx.stop_at is not None else 8
    losses = []
    while iter_num < end:
        ix = torch.randint(len(data), (16,))  # the global RNG: not in the checkpoint
        x, y = data[ix, :8], data[ix, 8]
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        iter_num += 1
    if ctx.stop_at is not None:
        saved = {"model": model.state_dict(), "iter_num": iter_num}
        if not ctx.config.get("forget_optimizer"):
            saved["optimizer"] = opt.state_dict()
        torch.save(saved, ctx.checkpoint_dir / "ckpt.pt")
    return {"losses": losses, "weights": dict(model.state_dict())}


@pytest.mark.reproducible
def test_nanogpt(repro):
    repro.check_resume(train, config=CONFIG, at=4)
"""


@pytest.mark.slow
def test_a_nanogpt_style_resume_that_forgets_the_rng_names_the_rng_and_the_batch(resumejobs: pytest.Pytester) -> None:
    resumejobs.makepyfile(test_nano=NANOGPT.replace("CONFIG", "{}"))
    result = resumejobs.runpytest("--repro", "--repro-regen")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*resume mismatch: stopping after step 4 and resuming in a fresh process does not give the uninterrupted "
            "run: first step after the resume that differs: step 4 *",
            "At the resume boundary (step 4, before its first update), resumed vs uninterrupted: parameters, "
            "optimizer state, learning rate, NumPy RNG and Python RNG match; torch RNG differs; the input batch at "
            "step 4 differs (input): the checkpoint does not restore the torch RNG state, so the batch drawn at "
            "step 4 differs (save and restore the RNG states, as pytest_repro.checkpoint.save does).",
        ]
    )


@pytest.mark.slow
def test_a_nanogpt_style_resume_that_forgets_the_optimizer_names_the_optimizer(resumejobs: pytest.Pytester) -> None:
    resumejobs.makepyfile(test_nano=NANOGPT.replace("CONFIG", '{"forget_optimizer": True}'))
    result = resumejobs.runpytest("--repro", "--repro-regen")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "At the resume boundary (step 4, *; optimizer state and torch RNG differ; *: the checkpoint does not "
            "restore the optimizer state (save and load optimizer.state_dict()); the checkpoint does not restore the "
            "torch RNG state, so the batch drawn at step 4 differs*"
        ]
    )


@pytest.mark.slow
def test_reseeding_after_the_restore_is_caught(resumejobs: pytest.Pytester) -> None:
    write(resumejobs, config='{"reseed_after_restore": True}', at="4")
    result = resumejobs.runpytest("--repro", "--repro-regen")
    result.assert_outcomes(failed=1)
    assert "first step after the resume that differs: step 4" in result.stdout.str()


@pytest.mark.slow
def test_bad_at_is_an_error(resumejobs: pytest.Pytester) -> None:
    write(resumejobs, at="99")
    result = resumejobs.runpytest("--repro", "--repro-regen")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*check_resume(at=...) needs a step between 1 and 7 (the job ran 8), got 99*"])


def test_checkpoint_round_trip_is_bitwise(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    scaler = torch.amp.GradScaler("cpu")
    x = torch.randn(5, 4)
    for _ in range(3):
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    gen = torch.Generator().manual_seed(5)
    checkpoint.save(
        tmp_path, step=3, model=model, optimizer=opt, scheduler=sched, scaler=scaler, extra={"g": gen.get_state()}
    )
    assert not list(tmp_path.glob("*.pkl")) and sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.json",
        "tensors.safetensors",
    ]
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    model2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.01)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 2, 0.5)
    scaler2 = torch.amp.GradScaler("cpu")
    random.random(), np.random.rand(), torch.rand(3)  # move every RNG on
    info = checkpoint.load(tmp_path, model=model2, optimizer=opt2, scheduler=sched2, scaler=scaler2)
    assert info["step"] == 3
    assert (random.random(), float(np.random.rand())) == expected[:2] and torch.equal(torch.rand(3), expected[2])
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name, value in s1["state"][k].items():
            assert torch.equal(value, s2["state"][k][name]), name
    assert sched.state_dict() == sched2.state_dict() and scaler.state_dict() == scaler2.state_dict()
    assert torch.equal(info["extra"]["g"], gen.get_state())
    assert checkpoint.given(tmp_path) == ["model", "optimizer", "scheduler", "scaler"]


def test_checkpoint_keeps_tied_weights_and_refuses_what_it_cannot_store(tmp_path: Path) -> None:
    emb = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    checkpoint.save(tmp_path / "a", step=1, model=model)
    other = torch.nn.ModuleDict({"emb": torch.nn.Embedding(5, 3), "head": torch.nn.Linear(3, 5, bias=False)})
    checkpoint.load(tmp_path / "a", model=other)
    assert torch.equal(other["emb"].weight, emb.weight) and torch.equal(other["head"].weight, emb.weight)
    with pytest.raises(checkpoint.CheckpointError, match="cannot store a object in a checkpoint"):
        checkpoint.save(tmp_path / "b", step=1, extra={"x": object()})
    with pytest.raises(checkpoint.CheckpointError, match="holds no optimizer state; pass optimizer="):
        checkpoint.load(tmp_path / "a", optimizer=torch.optim.SGD(other.parameters(), lr=0.1))
