"""The job process's op tracer of ``--repro-diagnose``: every aten op of one step, hashed, with its module and line.

Installed only in the second pair of diagnosis runs, for the step where the first pair diverged: a
``TorchDispatchMode`` runs each op as usual, then records digests of its tensor inputs and of its output,
the module it ran in (``StepTracer``'s module stack) and the job's source line. The first op whose output
differs while its inputs matched is the nondeterministic one (``_judge.diagnose.first_op``).
"""

from __future__ import annotations

import sys
import sysconfig
from typing import Any

MAX_OP_ENTRIES = 200_000  # per run: one step of a large model fits; beyond it the trace is cut, and says so
# Library code between the job and the op (the job's own code may live in site-packages, or be a built-in job).
_LIBRARIES = (
    "/torch/",
    "/pytest_repro/_",
    "/transformers/",
    "/peft/",
    "/accelerate/",
    "/lightning/",
    "/pytorch_lightning/",
    "/lightning_fabric/",
)
_STDLIB = sysconfig.get_paths()["stdlib"].replace("\\", "/")


def _where() -> str:
    """The job's own source line that led to this op: the innermost frame outside torch, the plugin and libraries."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if not any(part in path for part in _LIBRARIES) and not path.startswith(("<", _STDLIB)):
            return f"{path.rsplit('/', 1)[-1]}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return "?"


def op_mode(tracer: Any, step: int) -> Any:
    """A dispatch mode that appends an "op" entry to ``tracer.entries`` for each op of ``step``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from .trace import _digest

    recorded = [0]

    class Ops(TorchDispatchMode):  # type: ignore[misc,no-untyped-call]
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            inputs = _digest(args, kwargs) if tracer.current_step() == step else None
            out = func(*args, **kwargs)
            if tracer.current_step() != step:
                return out
            if recorded[0] >= MAX_OP_ENTRIES:
                if recorded[0] == MAX_OP_ENTRIES:  # the trace is cut here: first_op says so
                    tracer.entries.append({"step": step, "kind": "op", "name": "(cut)", "sha256": "", "in": ""})
                    recorded[0] += 1
                return out
            recorded[0] += 1
            entry = {
                "step": step,
                "kind": "op",
                "name": str(func),
                "module": tracer.module_stack[-1] if tracer.module_stack else tracer.backward_module,
                "where": _where(),
                "sha256": _digest((out,), {}) or "",
                "in": inputs or "",
                "key": f"{len(tracer.entries)}/{step}/{func}/op",
            }
            tracer.entries.append(entry)
            return out

    return Ops()  # type: ignore[no-untyped-call]
