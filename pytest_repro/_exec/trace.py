"""The step tracer of ``--repro-diagnose``, in the job process: hashes each step's tensors as the job runs.

It hashes, in execution order, the model's inputs, the losses, the parameters and their gradients.
Installed by the child only in runs started for ``--repro-diagnose``; otherwise nothing here is imported
or hooked. It writes the trace (JSON) and the tensors it kept (safetensors) into the run's folder;
comparing two traces is the judge's (``_judge.diagnose``). Imports only the standard library at module
level (torch and safetensors when used).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

TRACE_FILE = "diagnose.json"
TENSORS_FILE = "diagnose.safetensors"
DIGESTS_FILE = "digests.json"  # a run's module digests of its first steps (also the file beside a reference)
TENSOR_BUDGET_BYTES = 64 * 2**20  # keep full tensors (for element-level figures) up to this size per run
MAX_INPUT_TENSORS = 64  # per forward call of the model
MAX_INPUT_DEPTH = 4  # nesting of lists/tuples/dicts searched for input tensors
MAX_MODULE_ENTRIES = 2_000_000  # module-call digests per run (a trace line each)
MAX_DIGEST_ENTRIES = 4_000  # a reference's digests.json: under the 1 MiB a reference's small files may have
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class StepTracer:
    """Global torch hooks that hash, in execution order, model inputs, losses, parameters and gradients."""

    def __init__(
        self,
        budget: int = TENSOR_BUDGET_BYTES,
        resumed_at: int | None = None,
        digest_steps: int | None = None,
        ops_step: int | None = None,
    ) -> None:
        self.entries: list[dict[str, Any]] = []
        self.ops_step = ops_step  # also record every aten op of this step (``_exec/ops.py``)
        self.module_stack: list[str] = []  # names of the module calls under way (innermost last)
        self._ops_mode: Any = None
        # Digests only (a reference's record of where it starts): module calls of the first ``digest_steps``
        # steps and the parameters at initialisation; no inputs, losses, gradients or kept tensors.
        self.digest_steps = digest_steps
        # A resume probe: also hash the training state (optimizer, LR, RNGs) before each update; a resumed run
        # counts its steps from ``resumed_at``.
        self.probe = resumed_at is not None
        self._offset = resumed_at or 0
        self.tensors: dict[str, torch.Tensor] = {}
        self.budget = budget
        self._used = 0
        self._steps: dict[int, int] = {}
        self._modules: list[weakref.ref[Any]] = []
        self._handles: list[Any] = []
        self._restore: list[tuple[Any, str, Any]] = []
        self._thread = 0
        self._depth = 0  # nesting of module calls in the traced thread: 0 means a top-level call
        self._calls = 0
        self._in_backward = False
        self._forward_names: dict[type, tuple[str, ...]] = {}
        self._last_loss: weakref.ref[Any] | None = None
        self._module_names: dict[int, str] = {}
        self.backward_module = ""  # the module whose backward runs now (its output's gradient was just computed)
        self._last_grad: str | None = None

    def install(self) -> StepTracer:
        """Wrap ``Module.__call__`` and ``torch.autograd.backward`` and register the optimizer-step hook."""
        import torch
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        module_call = torch.nn.Module.__call__
        backward = torch.autograd.backward
        compiling = torch.compiler.is_compiling
        get_ident = threading.get_ident
        self._thread = get_ident()

        def traced_call(module: Any, *args: Any, **kwargs: Any) -> Any:
            if compiling() or get_ident() != self._thread:  # dynamo traces the original call, never this
                return module_call(module, *args, **kwargs)
            top = self._depth == 0 and next(module.parameters(), None) is not None
            if top:
                self.backward_module = ""  # a new forward: ops outside modules belong to no module's backward
                self._on_model_inputs(module, args, kwargs)
            recording = self.digest_steps is None or (
                self._step() < self.digest_steps and len(self.entries) < MAX_DIGEST_ENTRIES
            )
            if recording:  # what it computes from: its arguments and its own parameters and buffers
                own = (*module.parameters(recurse=False), *module.buffers(recurse=False))
                inputs = (_digest(args, kwargs), _digest((own,), {}))
            self._depth += 1
            if self.ops_step is not None:
                self.module_stack.append(self._name_of(module))
            try:
                output = module_call(module, *args, **kwargs)
            finally:
                self._depth -= 1
                if self.ops_step is not None:
                    self.module_stack.pop()
            if recording:
                self._on_module(module, inputs, output)
                if self.digest_steps is None:
                    self._watch_gradient(module, output)
            if top and self.digest_steps is None:
                self._on_model_output(output)
            return output

        def traced_backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
            if self._in_backward or get_ident() != self._thread or compiling() or self.digest_steps is not None:
                return backward(tensors, *args, **kwargs)
            self._in_backward = True  # a backward inside backward (reentrant checkpointing) is not a loss
            self.backward_module, self._last_grad = "", None
            try:
                self._on_backward(tensors)
                return backward(tensors, *args, **kwargs)
            finally:
                self._in_backward = False

        self._restore = [(torch.nn.Module, "__call__", module_call), (torch.autograd, "backward", backward)]
        torch.nn.Module.__call__ = traced_call  # type: ignore[method-assign]
        torch.autograd.backward = traced_backward
        self._handles = [register_optimizer_step_pre_hook(self._on_step)]
        if self.ops_step is not None:
            from .ops import op_mode

            self._ops_mode = op_mode(self, self.ops_step)
            self._ops_mode.__enter__()
        return self

    def uninstall(self) -> None:
        """Remove the hooks and wrappers (idempotent)."""
        if self._ops_mode is not None:
            self._ops_mode.__exit__(None, None, None)
            self._ops_mode = None
        for owner, attr, original in reversed(self._restore):
            setattr(owner, attr, original)
        for handle in self._handles:
            handle.remove()
        self._restore, self._handles = [], []

    def current_step(self) -> int:
        """The step the job is in (optimizer updates so far)."""
        return self._step()

    def _name_of(self, module: Any) -> str:
        """The module's name in the model (``named_modules()``), or its class for one outside it."""
        name = self._module_names.get(id(module))
        if name is None:  # not part of the model seen so far (re-read it: the job may have built it since)
            self._module_names = {id(m): n or "(model)" for root in self._roots() for n, m in root.named_modules()}
            name = self._module_names.setdefault(id(module), f"({type(module).__name__})")
        return name

    def _step(self) -> int:
        """The current step: how many steps the first optimizer seen has taken (a resumed run: since the resume)."""
        return self._offset + next(iter(self._steps.values()), 0)

    def _on_model_inputs(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if len(self._modules) < 10_000 and not any(r() is module for r in self._modules):
            self._modules.append(weakref.ref(module))
        if self.digest_steps is not None:  # digests only: the model is known (for names), its inputs not recorded
            return
        self._calls += 1
        names = self._positional_names(type(module))
        found: list[tuple[str, Any]] = []
        for i, value in enumerate(args):
            _find_tensors(names[i] if i < len(names) else f"args[{i}]", value, found, 0)
        for key, value in kwargs.items():
            _find_tensors(key, value, found, 0)
        step = self._step()
        for label, tensor in found:
            self._record(step, label, "input", tensor.detach(), call=self._calls, optional=True)

    def _positional_names(self, cls: type) -> tuple[str, ...]:
        names = self._forward_names.get(cls)
        if names is None:
            try:
                params = list(inspect.signature(cls.forward).parameters.values())[1:]  # type: ignore[attr-defined]
                names = tuple(p.name for p in params if p.kind in _POSITIONAL)
            except (TypeError, ValueError, AttributeError):
                names = ()
            self._forward_names[cls] = names
        return names

    def _on_module(self, module: Any, inputs: tuple[str | None, str | None], output: Any) -> None:
        """One module call: digests of its arguments, its own state and its output (completion order: leaves first)."""
        if inputs == (None, None) or len(self.entries) >= MAX_MODULE_ENTRIES:
            return
        plain = vars(output) if hasattr(output, "__dict__") and not hasattr(output, "shape") else None
        out = _digest((output if plain is None else plain,), {})  # an output object's tensors, too
        if out is None:
            return
        name = self._name_of(module)
        key = f"{len(self.entries)}/{self._step()}/{name}/module"
        args, own = inputs
        entry = {"step": self._step(), "name": name, "kind": "module", "sha256": out, "key": key}
        self.entries.append({**entry, "in": f"{args}:{own}", "args": args, "own": own})

    def _watch_gradient(self, module: Any, output: Any) -> None:
        """Hash the gradient that flows back into the module's output tensors (backward order: last module first)."""
        import torch

        found: list[tuple[str, Any]] = []
        _find_tensors("output", output, found, 0)
        outputs = [t for _, t in found if isinstance(t, torch.Tensor) and t.requires_grad and t.grad_fn is not None]
        if not outputs or len(self.entries) >= MAX_MODULE_ENTRIES:
            return
        name, step = self._name_of(module), self._step()

        def hook(grad: Any) -> None:
            digest = _digest((grad,), {})
            if digest is not None and len(self.entries) < MAX_MODULE_ENTRIES:
                key = f"{len(self.entries)}/{step}/{name}/grad_out"
                self.entries.append({"step": step, "name": name, "kind": "grad_out", "sha256": digest, "key": key})
            if digest != self._last_grad:  # a parent sharing its last child's output: the child's backward runs next
                self.backward_module, self._last_grad = name, digest

        for tensor in outputs[:MAX_INPUT_TENSORS]:
            try:
                tensor.register_hook(hook)  # type: ignore[no-untyped-call]
            except RuntimeError:  # e.g. a tensor that will not get a gradient after all
                continue

    def _roots(self) -> list[Any]:
        return [m for m in (r() for r in self._modules) if m is not None]

    def _on_model_output(self, output: Any) -> None:
        import torch

        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            self._record(self._step(), "loss", "loss", loss.detach(), optional=True)
            self._last_loss = weakref.ref(loss)

    def _on_backward(self, tensors: Any) -> None:
        import torch

        many = not isinstance(tensors, torch.Tensor)
        items = list(tensors) if many and isinstance(tensors, (list, tuple)) else [tensors]
        last = self._last_loss() if self._last_loss is not None else None
        for i, tensor in enumerate(items):
            if isinstance(tensor, torch.Tensor) and tensor is not last:  # the model's output.loss is recorded
                name = f"backward[{i}]" if many else "backward"
                self._record(self._step(), name, "loss", tensor.detach(), optional=True)

    def _names(self) -> dict[int, str]:
        """Map parameter ids to names, from the largest top-level module seen running forward (the model)."""
        modules = [m for m in (r() for r in self._modules) if m is not None]
        if not modules:
            return {}
        root = max(modules, key=lambda m: sum(1 for _ in m.parameters()))
        return {id(p): name for name, p in root.named_parameters()}

    def _on_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.backward_module = ""
        step = self._offset + self._steps.get(id(optimizer), 0)
        self._steps[id(optimizer)] = self._steps.get(id(optimizer), 0) + 1
        if self.digest_steps is not None:  # the parameters at initialisation, by digest
            if step == 0:
                names = self._names()
                for g, group in enumerate(optimizer.param_groups):
                    for i, param in enumerate(group["params"]):
                        name = names.get(id(param), f"param_groups[{g}][{i}]")
                        self._record(step, name, "value", param.detach(), optional=True)
            return
        if self.probe:
            for name, digest in training_state(optimizer).items():
                key = f"{len(self.entries)}/{step}/{name}/state"
                self.entries.append({"step": step, "name": name, "kind": "state", "sha256": digest, "key": key})
        names = self._names()
        for g, group in enumerate(optimizer.param_groups):
            for i, param in enumerate(group["params"]):
                name = names.get(id(param), f"param_groups[{g}][{i}]")
                self._record(step, name, "value", param.detach())
                if param.grad is not None:
                    self._record(step, name, "grad", param.grad.detach())

    def _record(
        self, step: int, name: str, kind: str, tensor: torch.Tensor, call: int = 0, optional: bool = False
    ) -> None:
        try:
            data = tensor.to("cpu").contiguous()
            digest = hashlib.sha256(_raw(data)).hexdigest()
        except Exception:  # an exotic input (sparse, nested, meta...) is left out rather than breaking the job
            if not optional:
                raise
            return
        key = f"{len(self.entries)}/{step}/{name}/{kind}"
        entry: dict[str, Any] = {"step": step, "name": name, "kind": kind, "sha256": digest, "key": key}
        if call:
            entry["call"] = call
        self.entries.append(entry)
        size = data.numel() * data.element_size()
        if self.digest_steps is None and self._used + size <= self.budget:
            self.tensors[key] = data.clone()
            self._used += size

    def save(self, folder: Path) -> None:
        """Remove the hooks, then write the trace (JSON) and the kept tensors (safetensors) into ``folder``."""
        from safetensors.torch import save_file

        self.uninstall()
        if self.digest_steps is not None:
            (folder / DIGESTS_FILE).write_text(json.dumps(self.entries), encoding="utf-8")
            return
        (folder / TRACE_FILE).write_text(json.dumps(self.entries), encoding="utf-8")
        save_file(self.tensors, str(folder / TENSORS_FILE))


def _find_tensors(label: str, value: Any, found: list[tuple[str, Any]], depth: int) -> None:
    """Collect (label, tensor) pairs from a model input, searching nested lists, tuples and mappings."""
    import torch

    if len(found) >= MAX_INPUT_TENSORS:
        return
    if isinstance(value, torch.Tensor):
        found.append((label, value))
    elif depth < MAX_INPUT_DEPTH and isinstance(value, Mapping):
        for key, item in value.items():
            _find_tensors(f"{label}[{key!r}]", item, found, depth + 1)
    elif depth < MAX_INPUT_DEPTH and isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _find_tensors(f"{label}[{i}]", item, found, depth + 1)


def training_state(optimizer: Any) -> dict[str, str]:
    """Digests of what a resume must restore besides the parameters: optimizer state, LR, every RNG."""
    import random
    import sys

    import torch

    def sha(*parts: Any) -> str:
        digest = hashlib.sha256()
        for part in parts:
            if isinstance(part, torch.Tensor):
                digest.update(_raw(part.detach().to("cpu").contiguous()))
            else:
                digest.update(repr(part).encode())
        return digest.hexdigest()

    state = optimizer.state_dict()
    flat = [
        (i, k, v)
        for i, per in sorted(state["state"].items(), key=lambda kv: str(kv[0]))
        for k, v in sorted(per.items())
    ]
    out = {
        "optimizer state": sha(*(x for entry in flat for x in entry)),
        "learning rate": sha([g.get("lr") for g in optimizer.param_groups]),
        "torch RNG": sha(torch.get_rng_state()),
        "Python RNG": sha(random.getstate()),
    }
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, gauss, cached = np.random.get_state()
        out["NumPy RNG"] = sha(kind, keys.tobytes(), pos, gauss, cached)
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        out["CUDA RNG"] = sha(*torch.cuda.get_rng_state_all())
    return out


def _digest(args: Any, kwargs: Mapping[str, Any]) -> str | None:
    """One sha256 over every tensor in a call's arguments (or an output), in order; None when there is none."""
    found: list[tuple[str, Any]] = []
    for i, value in enumerate(args):
        _find_tensors(f"args[{i}]", value, found, 0)
    for key, value in kwargs.items():
        _find_tensors(key, value, found, 0)
    if not found:
        return None
    digest = hashlib.sha256()
    try:
        for label, tensor in found:
            data = tensor.detach().to("cpu").contiguous()
            digest.update(f"{label}:{data.dtype}:{tuple(data.shape)}".encode())
            digest.update(_raw(data))
    except Exception:  # an exotic tensor (sparse, nested, meta...) is left out rather than breaking the job
        return None
    return digest.hexdigest()


def _raw(data: Any) -> Any:
    """A contiguous CPU tensor's bytes, as a buffer hashlib reads (no copy)."""
    import torch

    return data.reshape(-1).view(torch.uint8).numpy().data
