"""Turning a finished ``transformers.Trainer`` into a run record, and a Trainer-based LoRA job."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..context import JobContext

# Trainer logs wall-clock figures next to real metrics; they differ on every run, so never compare them.
TIMING_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_flos")


def record_from_trainer(trainer: Any, adapter_only: bool = True, from_step: int = 0) -> dict[str, Any]:
    """Return losses (per logged step after ``from_step``), weights and eval metrics of a finished Trainer."""
    history = list(trainer.state.log_history)
    # a resumed Trainer's history starts with the steps of the run it resumed: keep this run's own steps
    losses = [float(h["loss"]) for h in history if "loss" in h and int(h.get("step", from_step + 1)) > from_step]
    if not losses:
        raise ValueError(
            "the Trainer logged no training loss: set TrainingArguments(logging_steps=1, "
            "logging_strategy='steps') so that every step's loss is in trainer.state.log_history"
        )
    metrics: dict[str, float] = {}
    for h in history:
        for key, value in h.items():
            if key.startswith("eval_") and not key.endswith(TIMING_SUFFIXES):
                metrics[key] = float(value)  # later evaluations overwrite earlier ones
    model = trainer.model
    if adapter_only:
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    else:
        weights = {n: t.detach().clone() for n, t in model.state_dict().items()}
    return {"losses": losses, "weights": weights, "metrics": metrics}


def run(ctx: JobContext) -> dict[str, Any]:
    """The built-in LoRA job, trained by ``transformers.Trainer`` instead of a plain loop."""
    from transformers import Trainer, TrainingArguments

    from .lora import prepare, probe_logits

    p = prepare(ctx)
    t = p.cfg.train

    class Rows:
        def __init__(self, data: dict[str, Any]) -> None:
            self.data = data

        def __len__(self) -> int:
            return int(self.data["input_ids"].shape[0])

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {k: v[i] for k, v in self.data.items()}

    # Resume checks (repro.check_resume): stop after ctx.stop_at steps with a Trainer checkpoint in
    # ctx.checkpoint_dir, or resume from one; the Trainer restores optimizer, scheduler, RNG and data position.
    output_dir = ctx.checkpoint_dir if ctx.stop_at is not None and ctx.checkpoint_dir else ctx.workdir / "trainer"
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=t.steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        lr_scheduler_type="constant",
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=ctx.seed,
        data_seed=ctx.seed,
        use_cpu=ctx.device == "cpu",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    callbacks = [_stop_at(ctx.stop_at)] if ctx.stop_at is not None else []
    trainer = Trainer(
        model=p.model, args=args, train_dataset=Rows(p.train), eval_dataset=Rows(p.eval), callbacks=callbacks
    )
    start = 0
    if ctx.resume_from is not None:
        checkpoints = sorted(ctx.resume_from.glob("checkpoint-*"), key=lambda c: int(c.name.rsplit("-", 1)[1]))
        if not checkpoints:
            raise FileNotFoundError(f"no Trainer checkpoint-* folder in {ctx.resume_from}")
        start = int(checkpoints[-1].name.rsplit("-", 1)[1])
        trainer.train(resume_from_checkpoint=str(checkpoints[-1]))
    else:
        trainer.train()
    trainer.evaluate()
    result = record_from_trainer(trainer, from_step=start)
    result["metrics"]["perplexity"] = math.exp(result["metrics"]["eval_loss"])
    result["outputs"] = {"probe_logits": probe_logits(p.model, p.probe, ctx.device)}
    result["meta"] = {"split_sha256": p.split_sha256}
    return result


def _stop_at(step: int) -> Any:
    """A TrainerCallback that saves a checkpoint after ``step`` steps and stops training there."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.global_step >= step:
                control.should_save = True
                control.should_training_stop = True
            return control

    return StopAt()
