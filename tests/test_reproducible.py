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
