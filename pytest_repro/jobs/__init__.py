"""Built-in jobs. Each is a light top-level function; the heavy work is imported inside the job's process."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..context import JobContext

PACKAGED = "package:"  # a data path naming a file shipped with pytest-repro (pytest_repro/jobs/data/)


def packaged_file(value: str) -> Path:
    """Return the shipped data file a ``package:NAME`` config value names; FileNotFoundError if none."""
    name = value[len(PACKAGED) :] if value.startswith(PACKAGED) else value
    folder = Path(__file__).parent / "data"
    path = folder / name
    if not name or "/" in name or "\\" in name or not path.is_file():
        shipped = ", ".join(sorted(f"{PACKAGED}{p.name}" for p in folder.glob("*") if p.is_file()))
        raise FileNotFoundError(f"{value!r}: pytest-repro ships no such data file (it ships: {shipped})")
    return path


__all__ = [
    "lightning_callback",
    "lightning_ckpt_path",
    "lora_finetune",
    "lora_finetune_trainer",
    "record_from_lightning",
    "record_from_trainer",
]


def lora_finetune(ctx: JobContext) -> dict[str, Any]:
    """Fine-tune a tiny Llama-style model with LoRA (plain loop); config: see pytest_repro.jobs.lora.LoraJobConfig."""
    from .lora import run

    return run(ctx)


def lora_finetune_trainer(ctx: JobContext) -> dict[str, Any]:
    """The same LoRA fine-tune, trained by transformers.Trainer; same config as lora_finetune."""
    from .trainer import run

    return run(ctx)


def record_from_trainer(trainer: Any, adapter_only: bool = True) -> dict[str, Any]:
    """Return losses (per logged step), weights and eval metrics of a finished Trainer as a job result."""
    from .trainer import record_from_trainer as build

    return build(trainer, adapter_only=adapter_only)


def record_from_lightning(trainer: Any, module: Any = None, trainable_only: bool = False) -> dict[str, Any]:
    """Return losses (per optimizer step), weights and logged metrics of a finished Lightning Trainer."""
    from .lightning import record_from_lightning as build

    return build(trainer, module, trainable_only=trainable_only)


def lightning_callback(ctx: JobContext) -> Any:
    """Return the Lightning callback a job trains with: per-step losses, and the checkpoint of a resume check."""
    from .lightning import make_callback

    return make_callback(ctx)


def lightning_ckpt_path(ctx: JobContext) -> str | None:
    """Return ``Trainer.fit``'s ``ckpt_path=``: the stopped run's checkpoint in a resumed run, else None."""
    from .lightning import checkpoint_path

    return checkpoint_path(ctx)


def _validate_lora(config: dict[str, Any]) -> None:
    from .lora import parse_config

    parse_config(config)


# Checked in the pytest process before any run starts (the job checks again in its own process).
lora_finetune.__repro_validate__ = _validate_lora  # type: ignore[attr-defined]
lora_finetune_trainer.__repro_validate__ = _validate_lora  # type: ignore[attr-defined]


def _lora_schema() -> type:
    from .lora import LoraJobConfig

    return LoraJobConfig


# The config schema, for recording the effective config with provenance (default/user/derived).
lora_finetune.__repro_schema__ = _lora_schema  # type: ignore[attr-defined]
lora_finetune_trainer.__repro_schema__ = _lora_schema  # type: ignore[attr-defined]

# Modules the warm worker imports once before forking runs of these jobs.
_LORA_PRELOAD = (
    "peft",
    "tokenizers",
    "transformers.trainer_utils",  # set_seed
    "transformers.models.llama.modeling_llama",
    "pytest_repro.jobs.lora",
)
lora_finetune.__repro_preload__ = _LORA_PRELOAD  # type: ignore[attr-defined]
lora_finetune_trainer.__repro_preload__ = (*_LORA_PRELOAD, "transformers.trainer")  # type: ignore[attr-defined]
