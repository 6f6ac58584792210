"""CUDA checks: run only where a GPU is present, skipped (visibly) elsewhere."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"),
]

TEST = """
import pytest
from pytest_repro.jobs import lora_finetune

@pytest.mark.reproducible(runs=3)
def test_lora_cuda(repro):
    assert repro.device == "cuda"
    result = repro.check(lora_finetune, config="{config}")
    assert result.meta["device"] == "cuda"
"""


def test_lora_on_cuda_is_bitwise_reproducible_across_processes(heavy_modules: None, pytester: pytest.Pytester) -> None:
    from pathlib import Path

    config = Path(__file__).resolve().parent.parent / "fixtures" / "tiny_lora.yaml"
    pytester.makepyfile(test_cuda=TEST.format(config=config))
    # 3 runs in fresh processes must agree bitwise; then a second session must match the reference.
    pytester.runpytest("--repro", "--repro-regen", "--repro-device=cuda").assert_outcomes(passed=1)
    pytester.runpytest("--repro", "--repro-device=cuda", "--repro-isolation=spawn").assert_outcomes(passed=1)
