"""PyTorch Lightning inside a job: a callback for per-step losses and resume checks, and the run record.

Imported only by jobs that use Lightning (``lightning.pytorch`` or the older ``pytorch_lightning``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..context import JobContext

CHECKPOINT_NAME = "last.ckpt"  # the file the callback writes into ctx.checkpoint_dir at ctx.stop_at
STATE_KEY = "pytest_repro"  # our entry in a Lightning checkpoint: the RNG states Lightning does not save
PACKAGES = ("lightning.pytorch", "pytorch_lightning")


def lightning_package() -> Any:
    """Return the Lightning package the job uses: the one already imported, else the first installed."""
    for name in PACKAGES:
        if name in sys.modules:
            return sys.modules[name]
    for name in PACKAGES:
        try:
            return __import__(name, fromlist=["Callback"])
        except ImportError:
            continue
    raise ImportError(
        "pytest_repro.jobs.lightning needs PyTorch Lightning, which is not installed; "
        "pip install 'pytest-repro[lightning]'"
    )


def checkpoint_path(ctx: JobContext) -> str | None:
    """Return the ``ckpt_path=`` for ``Trainer.fit``: the stopped run's checkpoint when resuming, else None."""
    if ctx.resume_from is None:
        return None
    path = Path(ctx.resume_from) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no {CHECKPOINT_NAME} in {ctx.resume_from}: the stopped run must train with "
            "callbacks=[lightning_callback(ctx)] so that it checkpoints at ctx.stop_at"
        )
    return str(path)


def _rng_states() -> dict[str, Any]:
    """The global RNG states in types ``torch.load(weights_only=True)`` accepts (Lightning's default)."""
    import numpy as np
    import torch

    from ..checkpoint import rng_states

    states = rng_states()
    name, keys, pos, has_gauss, cached = states["numpy"]
    states["numpy"] = (str(name), torch.from_numpy(np.asarray(keys).astype(np.int64)), int(pos), int(has_gauss), cached)
    if "cuda" in states:
        states["cuda"] = list(states["cuda"])
    return states


def _restore_rng(states: dict[str, Any]) -> None:
    from ..checkpoint import set_rng_states

    name, keys, pos, has_gauss, cached = states["numpy"]
    set_rng_states({**states, "numpy": (name, keys.numpy(), pos, has_gauss, cached)})


def make_callback(ctx: JobContext) -> Any:
    """Return a Lightning callback that records per-step losses and checkpoints at ``ctx.stop_at`` (RNG included)."""
    pl = lightning_package()
    stop_at, folder, resuming = ctx.stop_at, ctx.checkpoint_dir, ctx.resume_from is not None

    class ReproCallback(pl.Callback):  # type: ignore[misc, name-defined]
        """Per-step losses for record_from_lightning; the checkpoint a resume check needs."""

        _pytest_repro = True

        def __init__(self) -> None:
            super().__init__()
            self.losses: list[float] = []  # one per optimizer step run in this process
            self._pending: list[float] = []
            self._step = 0

        def on_train_start(self, trainer: Any, module: Any) -> None:
            self._step = trainer.global_step  # a resumed run starts at the stopped run's step

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if loss is None:
                raise ValueError(
                    f"training_step returned no loss at batch {batch_idx} (got {type(outputs).__name__}); "
                    "return the loss tensor, or a dict with 'loss', so that the run records it"
                )
            self._pending.append(float(loss))
            if trainer.global_step == self._step:  # accumulating gradients: no optimizer step yet
                return
            self._step = trainer.global_step
            # Lightning hands each batch's loss divided by accumulate_grad_batches: their sum is the step's loss.
            self.losses.append(sum(self._pending))
            self._pending = []
            if stop_at is not None and trainer.global_step == stop_at:
                # Saved here, as ModelCheckpoint does: a save after fit() returns makes Lightning resume one batch late.
                trainer.save_checkpoint(str(Path(str(folder)) / CHECKPOINT_NAME))

        def on_save_checkpoint(self, trainer: Any, module: Any, checkpoint: dict[str, Any]) -> None:
            checkpoint[STATE_KEY] = {"rng": _rng_states()}

        def on_load_checkpoint(self, trainer: Any, module: Any, checkpoint: dict[str, Any]) -> None:
            if not resuming:  # a checkpoint the job loads for its own reasons (e.g. pretrained weights)
                return
            if STATE_KEY not in checkpoint:
                raise ValueError(
                    "the Lightning checkpoint holds no RNG states from pytest-repro: the stopped run must train with "
                    "callbacks=[lightning_callback(ctx)]"
                )
            _restore_rng(checkpoint[STATE_KEY]["rng"])

    return ReproCallback()


def record_from_lightning(trainer: Any, module: Any = None, trainable_only: bool = False) -> dict[str, Any]:
    """Return losses (per optimizer step), weights and logged metrics of a finished Lightning Trainer."""
    import torch

    found = [cb for cb in trainer.callbacks if getattr(cb, "_pytest_repro", False)]
    if not found:
        raise ValueError(
            "record_from_lightning: the Trainer has no pytest-repro callback, so its per-step losses were not "
            "recorded; pass callbacks=[lightning_callback(ctx)] to Trainer(...)"
        )
    losses = list(found[0].losses)
    if not losses:
        raise ValueError(
            "record_from_lightning: the Trainer ran no optimizer step in this process (max_steps, "
            "limit_train_batches or an empty train dataloader?)"
        )
    module = trainer.lightning_module if module is None else module
    if trainable_only:
        weights = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    else:
        weights = {n: t.detach().clone() for n, t in module.state_dict().items()}
    metrics: dict[str, float] = {}
    for key, value in trainer.callback_metrics.items():  # what the module logged with self.log(...)
        scalar = isinstance(value, torch.Tensor) and value.numel() == 1
        if scalar or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            metrics[key] = float(value)
    return {"losses": losses, "weights": weights, "metrics": metrics}
