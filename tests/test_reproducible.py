"""This repository's own reproducibility tests: the built-in LoRA jobs against committed references."""

import pytest

from pytest_repro.jobs import lora_finetune, lora_finetune_trainer


@pytest.mark.reproducible
def test_lora_is_reproducible(repro):
    result = repro.check(lora_finetune, config="fixtures/tiny_lora.yaml")
    assert len(result.losses) == 32
    assert result.losses[-1] < result.losses[0]
    assert set(result.metrics) == {"eval_loss", "perplexity"}


@pytest.mark.reproducible
def test_lora_trainer_is_reproducible(repro):
    result = repro.check(lora_finetune_trainer, config="fixtures/tiny_lora.yaml")
    assert len(result.losses) == 32
    assert all(name.endswith((".lora_A.default.weight", ".lora_B.default.weight")) for name in result.weights)


@pytest.mark.reproducible
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_lora_half_precision_is_reproducible(repro, dtype):
    import yaml

    with open("fixtures/tiny_lora.yaml") as fh:
        config = yaml.safe_load(fh)
    config["dtype"] = dtype
    config.pop("data")  # the defaults: the same data, shipped with the package
    result = repro.check(lora_finetune, config=config)
    assert result.meta["dtype"] == dtype  # the base model's dtype
    # peft keeps LoRA adapters in float32 over a half-precision base (autocast_adapter_dtype=True)
    assert all(str(t.dtype) == "torch.float32" for t in result.weights.values())


@pytest.mark.reproducible
def test_lora_resumes_from_a_checkpoint(repro):
    # the uninterrupted run against its reference, then stop after 12 steps + resume in a fresh process
    result = repro.check_resume(lora_finetune, config="fixtures/tiny_lora.yaml", at=12)
    assert len(result.losses) == 32


@pytest.mark.reproducible
def test_lora_trainer_resumes_from_checkpoint(repro):
    # transformers.Trainer's own checkpoints: resume_from_checkpoint restores optimizer, scheduler, RNG, data position
    repro.check_resume(lora_finetune_trainer, config="fixtures/tiny_lora.yaml", at=12)
