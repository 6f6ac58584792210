"""PyTorch Lightning and Accelerate jobs under the harness: the README's examples end to end, and what they rely on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TAGGED = re.compile(r"<!-- readme-test: (?P<name>[\w-]+) -->\n```python\n(?P<code>.*?)\n```", re.S)


def readme_example(name: str) -> str:
    """The README's tagged Python example ``name``, as a user copies it."""
    return {m["name"]: m["code"] + "\n" for m in TAGGED.finditer(README.read_text(encoding="utf-8"))}[name]


@pytest.fixture(scope="session")
def integration_modules(heavy_modules: None) -> None:
    """Import Lightning and Accelerate before pytester snapshots sys.modules (the example test files import them)."""
    pytest.importorskip("lightning.pytorch")
    pytest.importorskip("pytorch_lightning")
    pytest.importorskip("accelerate")


@pytest.fixture
def project(integration_modules: None, pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini("[pytest]\nrepro_timeout = 180\n")
    pytester.syspathinsert()
    return pytester


# Jobs that break one thing the Lightning example relies on; each must be caught.
LIGHTNING_FAULTS = """
import os

import lightning.pytorch as pl
import pytest

import pytest_repro.jobs.lightning as repro_lightning
from pytest_repro.jobs import lightning_callback, lightning_ckpt_path, record_from_lightning
from test_lightning_example import CONFIG, Regressor, loader, train_lightning


def forgets_rng_states(ctx):
    repro_lightning._restore_rng = lambda states: None  # the Lightning checkpoint alone: no RNG states
    return train_lightning(ctx)


def without_callback(ctx):
    module = Regressor(8, 0.05, 0.0)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module, loader(ctx, 64, train=True), ckpt_path=lightning_ckpt_path(ctx))
    return record_from_lightning(trainer, module)


def with_workers(ctx):
    import torch
    from torch.utils.data import DataLoader

    rows = loader(ctx, 64, train=True).dataset

    class Noisy(torch.utils.data.Dataset):  # noise drawn inside the DataLoader's worker processes
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            x, y = rows[i]
            return x + 0.01 * torch.randn(4), y

    module = Regressor(8, 0.05, 0.1)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", deterministic=True, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=[lightning_callback(ctx)])
    trainer.fit(module, DataLoader(Noisy(), batch_size=16, shuffle=True, num_workers=2))
    return record_from_lightning(trainer, module)


def with_pytorch_lightning(ctx):  # the older package name: its own LightningModule and Trainer classes
    import pytorch_lightning
    import torch

    class Tiny(pytorch_lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pytorch_lightning.Trainer(max_steps=4, accelerator="cpu", deterministic=True, logger=False,
                                        enable_progress_bar=False, enable_checkpointing=False,
                                        enable_model_summary=False, callbacks=[lightning_callback(ctx)])
    trainer.fit(Tiny(), loader(ctx, 64, train=True))
    return record_from_lightning(trainer)


def accumulating(ctx):
    import torch

    seen = []

    class Watched(Regressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            seen.append(loss.item())
            return loss

    trainer = pl.Trainer(max_steps=3, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[lightning_callback(ctx)])
    trainer.fit(Watched(8, 0.05, 0.0), loader(ctx, 64, train=True))
    result = record_from_lightning(trainer)
    means = [sum(seen[i:i + 2]) / 2 for i in range(0, 6, 2)]
    result["metrics"] = {f"mean_{i}": m for i, m in enumerate(means)}
    return result


def lightning_seed(ctx):
    seed = pl.seed_everything(None, verbose=False)  # what Lightning reads: PL_GLOBAL_SEED
    return {"losses": [0.0], "metrics": {"pl_seed": float(seed), "env": float(os.environ["PL_GLOBAL_SEED"])}}


@pytest.mark.reproducible
def test_rng(repro):
    repro.check_resume(forgets_rng_states, config=CONFIG, at=8)


@pytest.mark.reproducible
def test_mid_epoch(repro):
    repro.check_resume(train_lightning, config=CONFIG, at=6)


@pytest.mark.reproducible
def test_no_callback(repro):
    repro.check(without_callback, config=CONFIG)


@pytest.mark.reproducible
def test_workers(repro):
    repro.check(with_workers, config=CONFIG)


@pytest.mark.reproducible
def test_pytorch_lightning(repro):
    assert len(repro.check(with_pytorch_lightning, config=CONFIG).losses) == 4


@pytest.mark.reproducible
def test_accumulation(repro):
    result = repro.check(accumulating, config=CONFIG)
    assert result.losses == pytest.approx([result.metrics[f"mean_{i}"] for i in range(3)], rel=1e-6)


@pytest.mark.reproducible(seed=4242)
def test_seed(repro):
    result = repro.check(lightning_seed)
    assert result.metrics == {"pl_seed": 4242.0, "env": 4242.0}
"""


@pytest.mark.slow
def test_lightning_example_is_bitwise_reproducible_and_resumes_through_ckpt_path(project: pytest.Pytester) -> None:
    project.makepyfile(test_lightning_example=readme_example("lightning-example"))
    first = project.runpytest("--repro", "--repro-regen=missing")
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines(
        [
            "WRITTEN*test_lightning_example.py::test_lightning_trains_reproducibly (*",
            "PASSED*test_lightning_trains_reproducibly [[]resume@8]: stopped after step 8, resumed in a fresh process*",
        ]
    )
    again = project.runpytest("--repro", "-v")
    again.assert_outcomes(passed=1)
    again.stdout.fnmatch_lines(
        [
            "PASSED*test_lightning_trains_reproducibly (*",
            "*max abs diff vs reference*losses 0, weights 0, metrics 0*",
            "reproducibility: 2 passed*",
        ]
    )
    import json

    record = json.loads(next((project.path / "reference_outputs").rglob("record.json")).read_text())
    assert len(record["losses"]) == 16 and set(record["metrics"]) == {"val_loss"}


@pytest.mark.slow
def test_lightning_resume_faults_are_caught_and_the_harness_seed_reaches_lightning(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_lightning_example=readme_example("lightning-example"), test_lightning_faults=LIGHTNING_FAULTS
    )
    result = project.runpytest("--repro", "--repro-regen", "test_lightning_faults.py")
    result.assert_outcomes(passed=4, failed=3)
    out = result.stdout.str()
    # no RNG states restored: the dropout masks of the first resumed step (0-based step 8) already differ
    assert "test_lightning_faults.py::test_rng: resume mismatch: stopping after step 8" in out
    assert "first step after the resume that differs: step 8 (" in out
    # mid-epoch: Lightning restarts the epoch's data (its dataloader is not stateful)
    assert "test_lightning_faults.py::test_mid_epoch: resume mismatch: stopping after step 6" in out
    assert "first step after the resume that differs: step 6 (" in out
    assert "Fix: stop at an epoch boundary (at= a multiple of the steps per epoch)" in out
    assert "checkpoint.save was not given" not in out and "written by pytest_repro.checkpoint.save" not in out
    assert "pass callbacks=[lightning_callback(ctx)] to Trainer(...)" in out
    # DataLoader workers seeded by torch from the harness-seeded generator: bitwise run to run
    result.stdout.fnmatch_lines(["WRITTEN*test_lightning_faults.py::test_workers (*"])
    result.stdout.fnmatch_lines(["WRITTEN*test_lightning_faults.py::test_pytorch_lightning (*"])
    result.stdout.fnmatch_lines(["WRITTEN*test_lightning_faults.py::test_seed (*"])


LIGHTNING_DDP = """
import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pytest_repro.jobs import lightning_callback, record_from_lightning
from test_lightning_example import CONFIG, Regressor


def train_ddp(ctx):
    data = torch.Generator().manual_seed(1234)
    x = torch.randn(64, 4, generator=data)
    rows = TensorDataset(x, x.sum(dim=1, keepdim=True))
    trainer = pl.Trainer(max_steps=4, strategy="ddp", devices=ctx.world_size, accelerator="cpu", deterministic=True,
                         enable_progress_bar=False, enable_model_summary=False, logger=False,
                         enable_checkpointing=False, callbacks=[lightning_callback(ctx)])
    module = Regressor(CONFIG["hidden"], CONFIG["lr"], CONFIG["dropout"])
    trainer.fit(module, DataLoader(rows, batch_size=16, shuffle=True))  # Lightning injects a DistributedSampler
    result = record_from_lightning(trainer, module)
    result["metrics"] = {"world_size": float(trainer.world_size), "rank": float(trainer.global_rank),
                         "sampler_seed": float(trainer.train_dataloader.sampler.seed)}
    return result


@pytest.mark.reproducible(seed=99)
def test_ddp(repro):
    result = repro.check(train_ddp, nproc=2)
    assert result.metrics == {"world_size": 2.0, "rank": 0.0, "sampler_seed": 99.0}
    assert result.ranks[1].metrics == {"world_size": 2.0, "rank": 1.0, "sampler_seed": 99.0}
"""


@pytest.mark.slow
def test_lightning_ddp_joins_the_harness_process_group_and_its_sampler_follows_the_test_seed(
    project: pytest.Pytester,
) -> None:
    project.makepyfile(test_lightning_example=readme_example("lightning-example"), test_lightning_ddp=LIGHTNING_DDP)
    result = project.runpytest("--repro", "--repro-regen", "test_lightning_ddp.py")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["WRITTEN*test_lightning_ddp.py::test_ddp (*", "reproducibility: 1 written*"])
    assert "final weights differ" not in result.stdout.str()


ACCELERATE_EQUIVALENCE = """
import pytest
from test_accelerate_example import CONFIG, train_accelerate


@pytest.mark.reproducible(runs=1)
def test_two_ranks_train_like_one_process_with_the_global_batch(repro):
    one = repro.check(train_accelerate, config={**CONFIG, "batch_size": 64}, name="one")
    two = repro.check(train_accelerate, config=CONFIG, nproc=2, name="two")
    assert len(one.losses) == len(two.losses) == 8
    assert two.losses == pytest.approx(one.losses, rel=1e-5)
    for key, tensor in one.weights.items():
        assert (two.weights[key] - tensor).abs().max() < 1e-5, key
"""


@pytest.mark.slow
def test_accelerate_example_runs_on_one_and_on_two_ranks(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_accelerate_example=readme_example("accelerate-example"), test_accelerate_ranks=ACCELERATE_EQUIVALENCE
    )
    first = project.runpytest("--repro", "--repro-regen=missing")
    first.assert_outcomes(passed=3)
    first.stdout.fnmatch_lines(["reproducibility: 4 written*"])
    again = project.runpytest("--repro", "test_accelerate_example.py")
    again.assert_outcomes(passed=2)
    again.stdout.fnmatch_lines(["reproducibility: 2 passed*"])


def test_seed_everything_sets_pl_global_seed_and_restores_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_repro.seeding import seed_everything

    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    with seed_everything(123, transformers=False):
        assert os.environ["PL_GLOBAL_SEED"] == "123"
    assert os.environ["PL_GLOBAL_SEED"] == "7"


def test_plugin_and_jobs_import_no_lightning_nor_accelerate() -> None:
    code = (
        "import sys, pytest_repro.plugin, pytest_repro.jobs, pytest_repro\n"
        "names = ('lightning', 'pytorch_lightning', 'accelerate', 'torch')\n"
        "print([m for m in names if m in sys.modules])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
