"""Nondeterminism diagnostics: align two runs' step traces and find where they first diverge.

The traces are written in the job process by ``_exec.trace.StepTracer`` (runs started for ``--repro-diagnose``);
this module only reads and compares them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._exec.ops import MAX_OP_ENTRIES as MAX_OPS
from .._exec.trace import TENSORS_FILE, TRACE_FILE

DATA_FIX = "seed the augmentation with ctx.seed / ctx.rng, pass a seeded generator and worker_init_fn to the DataLoader"


@dataclass(frozen=True)
class FirstDivergence:
    """Where two traced runs first differ."""

    step: int
    name: str
    kind: str  # "input", "module" (a module's output), "loss", "backward", "value" (before the step) or "grad"
    detail: str  # value/grad: element-level figures when both tensors were kept; input/loss: what differs
    context: str = ""  # input/loss: what was identical
    same_path: bool = True  # False when the runs recorded different entries here

    def describe(self) -> str:
        """Return the diagnosis in one line."""
        if self.kind == "input" and self.same_path:
            return (
                f"the input batch at step {self.step} differs ({self.detail}){self.context}: "
                f"the data pipeline is nondeterministic ({DATA_FIX})"
            )
        if self.kind == "module" and self.same_path:
            return (
                f"module `{self.name}` output at step {self.step} differs while its inputs matched: this module "
                "computes nondeterministically or draws unseeded randomness (seed what it draws from ctx.seed, or "
                "find its nondeterministic op with torch.use_deterministic_algorithms(True))"
            )
        if self.kind == "backward" and self.same_path:
            if not self.context:
                where = "the backward of the loss computation (or of code after the last module) is nondeterministic"
            else:
                parent = _common_parent(self.name, self.context)
                where = (
                    f"the nondeterministic backward lies between them: module `{self.context}`'s own backward, or "
                    f"code outside modules in {parent} (e.g. an attention or scatter kernel called as a function)"
                )
            matched = f"the gradient at module `{self.context}`'s output" if self.context else "the loss"
            return (
                f"every module's output and the loss at step {self.step} matched, but the gradient flowing back into "
                f"module `{self.name}`'s output differs while {matched} matched: {where} (the op trace below names "
                "the op; torch.use_deterministic_algorithms(True) replaces or refuses it)"
            )
        if self.kind == "loss" and self.same_path:
            where = "the forward pass" if self.name == "loss" else "the forward pass or the loss computation"
            parts = "; ".join(p for p in (self.detail, self.context) if p)
            return f"the loss at step {self.step} differs{f' ({parts})' if parts else ''}: {where} is nondeterministic"
        what = {"grad": "grad", "input": "model input", "loss": "loss"}.get(
            self.kind, "value before the optimizer step"
        )
        return f"first divergence at step {self.step}, `{self.name}` {what}{self.detail}"


def _common_parent(a: str, b: str) -> str:
    """'module `x.y`' for the innermost module holding both dotted names, or 'the model'."""
    common = []
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        common.append(x)
    return f"module `{'.'.join(common)}`" if common else "the model"


class _Tensors:
    """The kept tensors of both runs, loaded on first use."""

    def __init__(self, run_a: Path, run_b: Path) -> None:
        self._runs = (run_a, run_b)
        self._loaded: tuple[dict[str, Any], dict[str, Any]] | None = None

    def pair(self, a: dict[str, Any], b: dict[str, Any]) -> tuple[Any, Any] | None:
        """Both runs' tensors of an entry, or None when either was not kept."""
        from safetensors.torch import load_file

        if self._loaded is None:
            self._loaded = (load_file(str(self._runs[0] / TENSORS_FILE)), load_file(str(self._runs[1] / TENSORS_FILE)))
        ta, tb = self._loaded[0].get(a["key"]), self._loaded[1].get(b["key"])
        return None if ta is None or tb is None else (ta, tb)

    def difference(self, a: dict[str, Any], b: dict[str, Any]) -> Any:
        """The bitwise Difference between both runs' tensors of an entry, or None when not kept."""
        from .tensor_compare import compare_tensor
        from .tolerances import BITWISE

        pair = self.pair(a, b)
        return None if pair is None else compare_tensor("trace", a["name"], pair[0], pair[1], BITWISE)


def first_divergence(run_a: Path, run_b: Path) -> FirstDivergence | None:
    """Compare two traced runs entry by entry; return the first input, loss, parameter or gradient that differs."""
    trace_a, trace_b = (_without_ops(run) for run in (run_a, run_b))
    tensors = _Tensors(run_a, run_b)
    modules = True  # module outputs decide until the first that differs (leaves complete before their parents)
    last_matched = last_digest = ""  # the module whose output's gradient matched last: its backward comes next
    for i, (a, b) in enumerate(zip(trace_a, trace_b, strict=False)):
        if (a["step"], a["name"], a["kind"]) != (b["step"], b["name"], b["kind"]):
            return FirstDivergence(
                a["step"], a["name"], a["kind"], " (the runs took different paths here)", same_path=False
            )
        if a["kind"] == "grad_out":
            if a["sha256"] == b["sha256"]:
                if a["sha256"] != last_digest:  # the same gradient again is a parent sharing its last child's output
                    last_matched, last_digest = a["name"], a["sha256"]
                continue
            if modules:  # the forward matched: the backward of what consumed this output made the difference
                return FirstDivergence(a["step"], a["name"], "backward", "", context=last_matched)
            continue
        if a["kind"] == "loss" or a["step"] != b.get("step"):
            last_matched = last_digest = ""  # a new backward starts from the loss (not at a recomputed module)
        if a["sha256"] == b["sha256"]:
            continue
        if a["kind"] == "module":
            if modules and a.get("in") == b.get("in"):  # its output differs while its inputs and state matched
                return FirstDivergence(a["step"], a["name"], "module", "")
            modules = False  # it passes on a difference of its inputs or parameters: that is found below
            continue
        if a["kind"] == "input":
            return _input_divergence(trace_a, trace_b, i, tensors)
        if a["kind"] == "loss":
            return _loss_divergence(trace_a, trace_b, i, tensors)
        return _tensor_divergence(a, b, tensors)
    if len(trace_a) != len(trace_b):
        return FirstDivergence(min(len(trace_a), len(trace_b)), "(trace length)", "value", " (one run took more steps)")
    return None


def _tensor_divergence(a: dict[str, Any], b: dict[str, Any], tensors: _Tensors) -> FirstDivergence:
    d = tensors.difference(a, b)
    detail = f", {d.n_diff} of {d.numel} elements, max abs diff {d.max_abs:.3g}" if d and d.kind == "value" else ""
    return FirstDivergence(a["step"], a["name"], a["kind"], detail)


def _params_at(trace_a: list[Any], trace_b: list[Any], i: int) -> tuple[bool, int | None]:
    """Whether the parameters used at entry i's step were traced, and the index of the first that differs."""
    step, traced = trace_a[i]["step"], False
    for j in range(i + 1, min(len(trace_a), len(trace_b))):
        a, b = trace_a[j], trace_b[j]
        if (a["kind"] in ("input", "loss") and a["step"] != step) or (a["name"], a["kind"]) != (b["name"], b["kind"]):
            break
        if a["kind"] == "value" and a["step"] == step:
            traced = True
            if a["sha256"] != b["sha256"]:
                return True, j
    return traced, None


def _input_divergence(trace_a: list[Any], trace_b: list[Any], i: int, tensors: _Tensors) -> FirstDivergence:
    call, found = trace_a[i].get("call"), []
    for a, b in zip(trace_a[i:], trace_b[i:], strict=False):
        if a["kind"] != "input" or a.get("call") != call or a["name"] != b["name"]:
            break
        if a["sha256"] != b["sha256"]:
            found.append(_input_figures(a, b, tensors))
    shown = "; ".join(found[:4]) + (f"; and {len(found) - 4} more" if len(found) > 4 else "")
    traced, j = _params_at(trace_a, trace_b, i)
    if j is not None:
        context = f", parameters differed too (first `{trace_a[j]['name']}`)"
    else:
        context = ", parameters were identical" if traced else ""
    return FirstDivergence(trace_a[i]["step"], trace_a[i]["name"], "input", shown, context)


def _input_figures(a: dict[str, Any], b: dict[str, Any], tensors: _Tensors) -> str:
    pair = tensors.pair(a, b)
    if pair is None:
        return str(a["name"])
    ta, tb = pair
    if ta.shape != tb.shape:
        return f"{a['name']}, shape {tuple(ta.shape)} vs {tuple(tb.shape)}"
    if ta.dtype != tb.dtype:
        return f"{a['name']}, dtype {ta.dtype} vs {tb.dtype}"
    d = tensors.difference(a, b)
    return f"{a['name']}, {d.n_diff} of {d.numel} elements differ" if d is not None else str(a["name"])


def _loss_divergence(trace_a: list[Any], trace_b: list[Any], i: int, tensors: _Tensors) -> FirstDivergence:
    a, b = trace_a[i], trace_b[i]
    traced, j = _params_at(trace_a, trace_b, i)
    if j is not None:  # the parameters this loss was computed with already differed
        return _tensor_divergence(trace_a[j], trace_b[j], tensors)
    detail = ""
    pair = tensors.pair(a, b)
    if pair is not None and pair[0].shape == pair[1].shape:
        if pair[0].numel() == 1:
            detail = f"{float(pair[0].reshape(())):.9g} vs {float(pair[1].reshape(())):.9g}"
        elif (d := tensors.difference(a, b)) is not None and d.kind == "value":
            detail = f"{d.n_diff} of {d.numel} elements differ, max abs diff {d.max_abs:.3g}"
    inputs = False
    for e in reversed(trace_a[:i]):
        if e["step"] != a["step"] and e["kind"] in ("input", "loss"):
            break
        inputs = inputs or (e["kind"] == "input" and e["step"] == a["step"])
    context = {
        (True, True): "inputs and parameters identical",
        (True, False): "inputs identical",
        (False, True): "parameters identical",
    }.get((inputs, traced), "")
    return FirstDivergence(a["step"], a["name"], "loss", detail, context)


def _without_ops(run: Path) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads((run / TRACE_FILE).read_text(encoding="utf-8"))
    return [e for e in entries if e["kind"] != "op"]


# Ops whose CUDA implementation is nondeterministic by default and that deterministic mode replaces with a
# deterministic one (torch.use_deterministic_algorithms docs); others it refuses, naming them.
DETERMINISTIC_ALTERNATIVE = (
    "scatter_add",
    "scatter_reduce",
    "index_add",
    "index_put",
    "put_",
    "index_copy",
    "cumsum",
    "embedding_dense_backward",
    "_unsafe_index_put",
)


@dataclass(frozen=True)
class FirstOp:
    """The first aten op whose output differs while its inputs matched."""

    name: str
    module: str
    where: str
    step: int

    def describe(self) -> str:
        """One clause for the diagnosis."""
        inside = f" in module `{self.module}`" if self.module else ""
        if self.name == "(cut)":
            return f"the op trace was cut at {MAX_OPS} ops of step {self.step} before any op differed"
        hint = ""
        if any(part in self.name for part in DETERMINISTIC_ALTERNATIVE):
            hint = (
                "; torch has a deterministic implementation of it: repro_deterministic = true "
                "(torch.use_deterministic_algorithms(True)) uses it, or raises naming the op"
            )
        elif "generator" in self.name or any(r in self.name for r in ("rand", "bernoulli", "normal", "multinomial")):
            hint = "; it draws random numbers: seed its generator from ctx.seed"
        else:
            hint = (
                "; with repro_deterministic = true torch uses a deterministic implementation of an op where it has "
                "one and raises naming the op where it has none"
            )
        return (
            f"the first op whose output differs while its inputs matched: {self.name}{inside} ({self.where}) at step "
            f"{self.step}{hint}"
        )


def first_op(run_a: Path, run_b: Path) -> FirstOp | None:
    """The first op entry of two op-traced runs whose output differs while its inputs matched (None: none)."""
    ops = []
    for run in (run_a, run_b):
        entries = json.loads((run / TRACE_FILE).read_text(encoding="utf-8"))
        ops.append([e for e in entries if e["kind"] == "op"])
    for a, b in zip(ops[0], ops[1], strict=False):
        if a["name"] == "(cut)" or b["name"] == "(cut)":
            return FirstOp("(cut)", "", "", a["step"])
        if a["name"] != b["name"]:
            return None  # the runs took different paths: no op-level answer
        if "empty" in a["name"]:  # allocations: their contents are whatever memory held, never compared
            continue
        if a["sha256"] != b["sha256"] and a["in"] == b["in"]:
            return FirstOp(a["name"], a.get("module", ""), a.get("where", "?"), a["step"])
    return None
