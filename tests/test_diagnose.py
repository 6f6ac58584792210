"""The step tracer of --repro-diagnose, without the plugin: tiny training loops traced twice, then compared."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from pytest_repro._exec.trace import TRACE_FILE, StepTracer  # noqa: E402
from pytest_repro._judge.diagnose import first_divergence  # noqa: E402


class Points:
    """A map-style dataset of dict samples; ``noisy`` adds an unseeded augmentation."""

    def __init__(self, noisy: bool) -> None:
        self.noisy = noisy
        self.x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        x = self.x[i]
        if self.noisy:
            g = torch.Generator()
            g.seed()  # nondeterministic seed: the bug under diagnosis
            x = x + 0.01 * torch.randn(4, generator=g)
        return {"features": x, "labels": x.sum(0, keepdim=True)}


def _net() -> Any:
    class Net(torch.nn.Module):  # an HF-style model: keyword inputs, an output with .loss
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

        def forward(self, features: Any, labels: Any = None) -> Any:
            logits = self.body(features)
            return SimpleNamespace(loss=torch.nn.functional.mse_loss(logits, labels), logits=logits)

    return Net()


def _noise() -> float:
    return (int.from_bytes(os.urandom(2), "little") + 1) * 1e-6


def _loader_run(folder: Path, noisy: bool) -> None:
    """Two epochs through DataLoader(num_workers=2) with a seeded loader generator."""
    torch.manual_seed(0)
    tracer = StepTracer().install()
    try:
        model = _net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(0)
        loader = torch.utils.data.DataLoader(Points(noisy), batch_size=16, shuffle=True, num_workers=2, generator=gen)
        for _ in range(2):
            for batch in loader:
                model(**batch).loss.backward()
                opt.step()
                opt.zero_grad()
    finally:
        tracer.uninstall()
    tracer.save(folder)


def _plain_run(folder: Path, loss_noise_at: int = -1, grad_noise_at: int = -1, unseeded_init: bool = False) -> None:
    """The plugin tests' job: a Linear layer, a loss computed outside the model, six SGD steps."""
    torch.manual_seed(0)
    tracer = StepTracer().install()
    try:
        model = torch.nn.Linear(4, 2)
        if unseeded_init:
            with torch.no_grad():
                model.weight[0, 0] += _noise()
        x = torch.randn(32, 4)
        y = torch.stack([x.sum(1), x[:, 0] - x[:, 1]], dim=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(6):
            loss = ((model(x) - y) ** 2).mean()
            if step == loss_noise_at:
                loss = loss * (1 + _noise())
            loss.backward()
            if step == grad_noise_at:
                model.weight.grad[0, 1] += _noise()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            model(x)
    finally:
        tracer.uninstall()
    tracer.save(folder)


def _twice(tmp_path: Path, run: Any, **kwargs: Any) -> str | None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(parents=True)
    b.mkdir()
    run(a, **kwargs)
    run(b, **kwargs)
    found = first_divergence(a, b)
    return None if found is None else found.describe()


def test_unseeded_augmentation_names_the_input_batch(tmp_path: Path) -> None:
    message = _twice(tmp_path, _loader_run, noisy=True)
    assert message == (
        "the input batch at step 0 differs (features, 64 of 64 elements differ; labels, 16 of 16 elements differ), "
        "parameters were identical: the data pipeline is nondeterministic (seed the augmentation with ctx.seed / "
        "ctx.rng, pass a seeded generator and worker_init_fn to the DataLoader)"
    )


def test_seeded_loader_with_workers_agrees(tmp_path: Path) -> None:
    assert _twice(tmp_path, _loader_run, noisy=False) is None


def test_noise_in_the_loss_names_the_loss(tmp_path: Path) -> None:
    message = _twice(tmp_path, _plain_run, loss_noise_at=3)
    assert message is not None
    assert message.startswith("the loss at step 3 differs (")
    assert message.endswith(
        "; inputs and parameters identical): the forward pass or the loss computation is nondeterministic"
    )


def test_noise_in_a_gradient_names_the_gradient(tmp_path: Path) -> None:
    message = _twice(tmp_path, _plain_run, grad_noise_at=3)
    assert message is not None
    assert message.startswith("first divergence at step 3, `weight` grad, 1 of 8 elements, max abs diff ")


def test_unseeded_init_names_the_parameter_not_the_loss(tmp_path: Path) -> None:
    # the loss at step 0 is recorded first, but the parameters it was computed with already differed
    message = _twice(tmp_path, _plain_run, unseeded_init=True)
    assert message is not None
    assert message.startswith("first divergence at step 0, `weight` value before the optimizer step, 1 of 8 elements")


class Jitter(torch.nn.Module):
    """A custom layer that adds unseeded noise from ``start`` on (issue 21's first case)."""

    def __init__(self, start: int) -> None:
        super().__init__()
        self.start, self.calls = start, 0

    def forward(self, x: Any) -> Any:
        self.calls += 1
        return x + _noise() if self.calls > self.start else x


def _sequential_run(folder: Path, start: int = 3) -> None:
    torch.manual_seed(0)
    tracer = StepTracer().install()
    try:
        model = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), Jitter(start), torch.nn.Linear(8, 1)
        )
        x, y = torch.randn(32, 4), torch.randn(32, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(6):
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    finally:
        tracer.uninstall()
    tracer.save(folder)


def test_unseeded_noise_in_one_module_names_that_module_not_a_gradient_downstream(tmp_path: Path) -> None:
    message = _twice(tmp_path, _sequential_run, start=3)
    assert message == (
        "module `3` output at step 3 differs while its inputs matched: this module computes nondeterministically "
        "or draws unseeded randomness (seed what it draws from ctx.seed, or find its nondeterministic op with "
        "torch.use_deterministic_algorithms(True))"
    )


class Unseeded(torch.nn.Module):
    """A custom layer that draws noise from an unseeded generator (a nondeterministic op, on purpose)."""

    def forward(self, x: Any) -> Any:
        g = torch.Generator()
        g.seed()
        return x + 1e-6 * torch.randn(x.shape, generator=g)


def _op_run(folder: Path, ops_step: int | None = None) -> None:
    torch.manual_seed(0)
    tracer = StepTracer(ops_step=ops_step).install()
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), Unseeded(), torch.nn.Linear(8, 1))
        x, y = torch.randn(32, 4), torch.randn(32, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(3):
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    finally:
        tracer.uninstall()
    tracer.save(folder)


def test_the_first_nondeterministic_op_is_named_with_its_module_and_line(tmp_path: Path) -> None:
    from pytest_repro._judge.diagnose import first_op

    assert _twice(tmp_path / "modules", _op_run) == (
        "module `2` output at step 0 differs while its inputs matched: this module computes nondeterministically "
        "or draws unseeded randomness (seed what it draws from ctx.seed, or find its nondeterministic op with "
        "torch.use_deterministic_algorithms(True))"
    )
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        _op_run(folder, ops_step=0)
    found = first_op(a, b)
    assert found is not None
    line = next(i for i, text in enumerate(Path(__file__).read_text().splitlines(), 1) if "1e-6 * torch.randn" in text)
    assert found.describe() == (
        f"the first op whose output differs while its inputs matched: aten.randn.generator in module `2` "
        f"(test_diagnose.py:{line}) at step 0; it draws random numbers: seed its generator from ctx.seed"
    )
    ops = [e for e in json.loads((a / TRACE_FILE).read_text()) if e["kind"] == "op"]
    assert ops and {e["step"] for e in ops} == {0}  # only the step asked for


class _NoisyBackward(torch.autograd.Function):
    """Identity forward; the backward adds unseeded noise from ``start`` on (a nondeterministic backward kernel)."""

    @staticmethod
    def forward(ctx: Any, x: Any, noisy: bool) -> Any:
        ctx.noisy = noisy
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Any) -> Any:
        return (grad + _noise() * 1e-3 if ctx.noisy else grad), None


class BackwardJitter(torch.nn.Module):
    def __init__(self, start: int) -> None:
        super().__init__()
        self.start, self.calls = start, 0

    def forward(self, x: Any) -> Any:
        self.calls += 1
        return _NoisyBackward.apply(x, self.calls > self.start)


def _backward_run(folder: Path, ops_step: int | None = None) -> None:
    torch.manual_seed(0)
    tracer = StepTracer(ops_step=ops_step).install()
    try:
        model = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), BackwardJitter(2), torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)
        )
        x, y = torch.randn(32, 4), torch.randn(32, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(4):
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    finally:
        tracer.uninstall()
    tracer.save(folder)


def test_a_nondeterministic_backward_names_its_module_not_the_first_gradient(tmp_path: Path) -> None:
    from pytest_repro._judge.diagnose import first_op

    # The forward of every step matches; the backward of module `2` at step 2 does not.
    assert _twice(tmp_path / "modules", _backward_run) == (
        "every module's output and the loss at step 2 matched, but the gradient flowing back into module `1`'s "
        "output differs while the gradient at module `2`'s output matched: the nondeterministic backward lies "
        "between them: module `2`'s own backward, or code outside modules in the model (e.g. an attention or "
        "scatter kernel called as a function) (the op trace below names the op; "
        "torch.use_deterministic_algorithms(True) replaces or refuses it)"
    )
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        _backward_run(folder, ops_step=2)
    found = first_op(a, b)
    assert found is not None
    assert found.module == "2" and found.step == 2  # the backward's op, attributed to the module whose backward ran


def test_identical_runs_agree(tmp_path: Path) -> None:
    assert _twice(tmp_path, _plain_run) is None


def test_trace_holds_top_level_inputs_losses_then_parameters(tmp_path: Path) -> None:
    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())

        def forward(self, x: Any, extras: Any = None, flag: bool = False) -> Any:
            return {"loss": self.inner(x).sum() + extras["a"].sum(), "hidden": x}

    original_call, original_backward = torch.nn.Module.__call__, torch.autograd.backward
    tracer = StepTracer().install()
    model = Wrapper()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    t = torch.ones(2)
    out = model(torch.ones(3, 4), extras={"a": t, "b": [t, (t, "text")]}, flag=True)
    torch.nn.MSELoss()(out["hidden"], torch.zeros(3, 4))  # a parameterless top-level module: not the model
    (out["loss"] * 2).backward()
    opt.step()
    tracer.save(tmp_path)
    assert torch.nn.Module.__call__ is original_call
    assert torch.autograd.backward is original_backward
    trace = json.loads((tmp_path / TRACE_FILE).read_text(encoding="utf-8"))
    assert [(e["step"], e["kind"], e["name"]) for e in trace] == [
        (0, "input", "x"),
        (0, "input", "extras['a']"),
        (0, "input", "extras['b'][0]"),
        (0, "input", "extras['b'][1][0]"),
        (0, "module", "inner.0"),  # every module call, leaves first, named as in model.named_modules()
        (0, "module", "inner.1"),
        (0, "module", "inner"),
        (0, "module", "(model)"),
        (0, "loss", "loss"),
        (0, "module", "(MSELoss)"),  # not part of the model: named by its class
        (0, "loss", "backward"),
        (0, "grad_out", "(model)"),  # the gradient into each module's output, in backward order
        (0, "grad_out", "inner.1"),
        (0, "grad_out", "inner"),
        (0, "grad_out", "inner.0"),
        (0, "value", "inner.0.weight"),
        (0, "grad", "inner.0.weight"),
        (0, "value", "inner.0.bias"),
        (0, "grad", "inner.0.bias"),
    ]


def test_loss_backward_on_the_output_loss_is_recorded_once(tmp_path: Path) -> None:
    tracer = StepTracer().install()
    try:
        model = _net()
        x = torch.ones(2, 4)
        model(features=x, labels=x.sum(1, keepdim=True)).loss.backward()
    finally:
        tracer.uninstall()
    assert [(e["kind"], e["name"]) for e in tracer.entries] == [
        ("input", "features"),
        ("input", "labels"),
        ("module", "body.0"),
        ("module", "body.1"),
        ("module", "body.2"),
        ("module", "body"),
        ("module", "(model)"),
        ("loss", "loss"),
        ("grad_out", "body.2"),  # the gradient into each module's output, in backward order
        ("grad_out", "body"),  # (the same tensor as its last child's)
        ("grad_out", "body.1"),
        ("grad_out", "body.0"),
    ]


def test_the_span_of_a_backward_difference_names_the_common_parent() -> None:
    from pytest_repro._judge.diagnose import _common_parent

    assert _common_parent("layers.0.mlp.up_proj", "layers.0.mlp.act") == "module `layers.0.mlp`"
    assert _common_parent("body", "body.1") == "module `body`"
    assert _common_parent("1", "2") == "the model"
