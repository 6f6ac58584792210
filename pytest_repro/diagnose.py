"""Nondeterminism diagnostics: hash every parameter and gradient at each optimizer step, find the first divergence.

Installed only in runs started for ``--repro-diagnose``; otherwise nothing here is imported or hooked.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

TRACE_FILE = "diagnose.json"
TENSORS_FILE = "diagnose.safetensors"
TENSOR_BUDGET_BYTES = 64 * 2**20  # keep full tensors (for element-level figures) up to this size per run


class StepTracer:
    """Global torch hooks that record, before each optimizer step, a hash of every parameter and gradient."""

    def __init__(self, budget: int = TENSOR_BUDGET_BYTES) -> None:
        self.entries: list[dict[str, Any]] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.budget = budget
        self._used = 0
        self._steps: dict[int, int] = {}
        self._modules: list[weakref.ref[Any]] = []
        self._handles: list[Any] = []

    def install(self) -> StepTracer:
        """Register the global module-forward and optimizer-step hooks."""
        from torch.nn.modules.module import register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self._handles = [
            register_module_forward_pre_hook(self._on_forward),
            register_optimizer_step_pre_hook(self._on_step),
        ]
        return self

    def _on_forward(self, module: Any, args: Any) -> None:
        if len(self._modules) < 10_000 and not any(r() is module for r in self._modules[-64:]):
            self._modules.append(weakref.ref(module))

    def _names(self) -> dict[int, str]:
        """Map parameter ids to names, from the largest module seen running forward (the model)."""
        modules = [m for m in (r() for r in self._modules) if m is not None]
        if not modules:
            return {}
        root = max(modules, key=lambda m: sum(1 for _ in m.parameters()))
        return {id(p): name for name, p in root.named_parameters()}

    def _on_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        step = self._steps.get(id(optimizer), 0)
        self._steps[id(optimizer)] = step + 1
        names = self._names()
        for g, group in enumerate(optimizer.param_groups):
            for i, param in enumerate(group["params"]):
                name = names.get(id(param), f"param_groups[{g}][{i}]")
                self._record(step, name, "value", param.detach())
                if param.grad is not None:
                    self._record(step, name, "grad", param.grad.detach())

    def _record(self, step: int, name: str, kind: str, tensor: torch.Tensor) -> None:
        data = tensor.to("cpu").contiguous()
        digest = hashlib.sha256(data.view(-1).view(_bytes_dtype()).numpy().tobytes()).hexdigest()
        key = f"{step}/{name}/{kind}"
        self.entries.append({"step": step, "name": name, "kind": kind, "sha256": digest, "key": key})
        size = data.numel() * data.element_size()
        if self._used + size <= self.budget:
            self.tensors[key] = data.clone()
            self._used += size

    def save(self, folder: Path) -> None:
        """Write the trace (JSON) and the kept tensors (safetensors) into ``folder``."""
        from safetensors.torch import save_file

        for handle in self._handles:
            handle.remove()
        (folder / TRACE_FILE).write_text(json.dumps(self.entries), encoding="utf-8")
        save_file(self.tensors, str(folder / TENSORS_FILE))


def _bytes_dtype() -> Any:
    import torch

    return torch.uint8


@dataclass(frozen=True)
class FirstDivergence:
    """Where two traced runs first differ."""

    step: int
    name: str
    kind: str
    detail: str  # element-level figures when both tensors were kept

    def describe(self) -> str:
        """Return the diagnosis in one line."""
        what = "grad" if self.kind == "grad" else "value before the optimizer step"
        return f"first divergence at step {self.step}, `{self.name}` {what}{self.detail}"


def first_divergence(run_a: Path, run_b: Path) -> FirstDivergence | None:
    """Compare two traced runs entry by entry; return the first parameter or gradient that differs."""
    from safetensors.torch import load_file

    from .compare import compare_tensor
    from .tolerances import BITWISE

    trace_a = json.loads((run_a / TRACE_FILE).read_text(encoding="utf-8"))
    trace_b = json.loads((run_b / TRACE_FILE).read_text(encoding="utf-8"))
    for a, b in zip(trace_a, trace_b, strict=False):
        if (a["step"], a["name"], a["kind"]) != (b["step"], b["name"], b["kind"]):
            return FirstDivergence(a["step"], a["name"], a["kind"], " (the runs took different paths here)")
        if a["sha256"] == b["sha256"]:
            continue
        tensors_a, tensors_b = load_file(str(run_a / TENSORS_FILE)), load_file(str(run_b / TENSORS_FILE))
        detail = ""
        if a["key"] in tensors_a and b["key"] in tensors_b:
            d = compare_tensor("trace", a["name"], tensors_a[a["key"]], tensors_b[b["key"]], BITWISE)
            if d is not None and d.kind == "value":
                detail = f", {d.n_diff} of {d.numel} elements, max abs diff {d.max_abs:.3g}"
        return FirstDivergence(a["step"], a["name"], a["kind"], detail)
    if len(trace_a) != len(trace_b):
        return FirstDivergence(min(len(trace_a), len(trace_b)), "(trace length)", "value", " (one run took more steps)")
    return None
