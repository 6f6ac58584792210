"""Shared helpers for the plugin's own tests."""

from __future__ import annotations

import contextlib
import importlib
import os
import tempfile
import textwrap
from collections.abc import Iterator

import pytest

# The plugin's own tests run hundreds of pytest sessions in throwaway projects: none of them may leave a
# worker daemon behind (each would hold the imports for half an hour). Daemon tests ask for one explicitly.
os.environ.setdefault("PYTEST_REPRO_WORKER", "session")

# A small torch-only job whose behaviour is steered by its config: enough to exercise every path
# of the harness without the cost of transformers/peft.
USER_JOBS = textwrap.dedent(
    """
    import os
    import time

    import torch


    def train(ctx):
        cfg = ctx.config
        steps = cfg.get("steps", 6)
        model = torch.nn.Linear(4, 2)
        x = torch.randn(32, 4)
        y = torch.stack([x.sum(1), x[:, 0] - x[:, 1]], dim=1)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.get("lr", 0.05))
        losses = []
        for step in range(steps):
            if cfg.get("raise_at") == step:
                raise ValueError(f"boom at step {step}")
            if cfg.get("hang_at") == step:
                time.sleep(3600)
            loss = ((model(x) - y) ** 2).mean()
            if cfg.get("unseeded_at") == step:
                noise = int.from_bytes(os.urandom(2), "little") + 1
                loss = loss * (1 + noise * 1e-4)
            if cfg.get("nan_at") == step:
                loss = loss * float("nan")
            loss.backward()
            if cfg.get("grad_noise_at") == step:
                noise = int.from_bytes(os.urandom(2), "little") + 1
                model.weight.grad[0, 1] += noise * 1e-6
            if cfg.get("nondeterministic_op_at") == step:
                # put_ without accumulate has no deterministic implementation: torch raises in deterministic mode
                torch.zeros(4).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        with torch.no_grad():
            pred = model(x)
        accuracy = float(((pred - y).abs() < 1.0).float().mean()) + cfg.get("accuracy_shift", 0.0)
        return {
            "losses": losses,
            "weights": dict(model.state_dict()),
            "metrics": {"accuracy": accuracy},
            "outputs": {"pred": pred},
        }


    def noisy(ctx):
        # Results depend on the seed: a score and a loss trace with seeded noise.
        cfg = ctx.config
        noise = ctx.rng.normal(0.0, 0.01, size=7)
        score = 1.0 + cfg.get("shift", 0.0) + noise[0]
        if cfg.get("jitter"):  # a per-seed change of the score, drawn after the values above
            score += cfg["jitter"] * ctx.rng.normal()
        shift_from = cfg.get("loss_shift_from", 99)
        losses = [
            2.0 - 0.1 * step + noise[step + 1] + (cfg.get("loss_shift", 0.0) if step >= shift_from else 0.0)
            for step in range(6)
        ]
        return {"losses": losses, "metrics": {"score": float(score)}}
    """
)


@pytest.fixture(scope="session", autouse=True)
def _temp_in_basetemp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Everything the suite and the sessions it starts put in the temp dir lands in pytest's basetemp.

    Scratch of the sessions the suite kills on purpose (test_concurrency) is then bounded by pytest's
    tmp_path retention instead of piling up in /tmp run after run.
    """
    folder = tmp_path_factory.mktemp("tmp", numbered=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(folder))
        mp.setattr(tempfile, "tempdir", str(folder))
        yield


@pytest.fixture(autouse=True)
def _no_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run in CI too; regeneration tests must not be refused because CI is set."""
    monkeypatch.delenv("CI", raising=False)


@pytest.fixture(scope="session")
def heavy_modules() -> None:
    """Import torch & co. before any pytester fixture snapshots sys.modules.

    pytester unloads every module first imported while it was active; unloading torch breaks the
    next import of it and crashes the interpreter. Session scope makes this run before pytester.
    """
    # The harness too: its warm workers live in pytest_repro._exec.pool and are shared across inline runs.
    for name in ("torch", "numpy", "safetensors.torch", "deepdiff", "yaml", "pytest_repro.fixture"):
        pytest.importorskip(name)
    for optional in ("matplotlib.pyplot", "scipy.stats", "jsonschema"):
        with contextlib.suppress(ImportError):
            importlib.import_module(optional)


@pytest.fixture
def userjobs(heavy_modules: None, pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester project with the user job module and a pytest config."""
    pytester.makepyfile(userjobs=USER_JOBS)
    pytester.makeini("[pytest]\nrepro_timeout = 60\n")
    pytester.syspathinsert()
    return pytester
