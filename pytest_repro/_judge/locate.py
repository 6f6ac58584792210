"""Where a difference from the reference starts: this run's module digests against the reference's (no I/O).

A reference keeps the digests of its first steps (``digests.json``, written at regen by a traced run 1):
every module call's output, arguments and own parameters/buffers, leaves before their parents, and every
parameter at initialisation. The first module whose output differs while its arguments matched is where
a change of the code or of that module's parameters starts, by the rule of PyTorch's DebugMode and
Megatron's determinism debugging: the first operation whose output differs while its inputs matched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DIGEST_CHARS = 16  # a reference keeps this much of each sha256: enough to tell two tensors apart


def compact(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a reference keeps of a digest trace: module calls and initial parameters, short digests."""
    keep: list[dict[str, Any]] = []
    for e in entries:
        if e.get("kind") not in ("module", "value"):
            continue
        short: dict[str, str] = {k: (e[k] or "")[:DIGEST_CHARS] for k in ("sha256", "args", "own") if k in e}
        keep.append({"step": e["step"], "name": e["name"], "kind": e["kind"], **short})
    return keep


def _valid(entries: Any) -> bool:
    fields = {"step": int, "name": str, "kind": str, "sha256": str}
    return isinstance(entries, list) and all(
        isinstance(e, dict) and all(isinstance(e.get(k), t) for k, t in fields.items()) for e in entries
    )


def where_it_starts(stored: Any, traced: Sequence[dict[str, Any]]) -> str:
    """One line: the first module of this run whose output differs from the reference's digests, and why."""
    if not _valid(stored):
        return "the reference's digests.json is not a list of module digests: where the difference starts is unknown"
    mine = compact(traced)
    steps = sorted({e["step"] for e in stored if e["kind"] == "module"})
    if not steps or not mine:
        return "no module calls were recorded (the job runs no torch.nn.Module): where it starts is unknown"
    modules_a = [e for e in stored if e["kind"] == "module"]
    modules_b = [e for e in mine if e["kind"] == "module" and e["step"] <= steps[-1]]
    for a, b in zip(modules_a, modules_b, strict=False):
        if (a["step"], a["name"]) != (b["step"], b["name"]):
            return (
                f"the model's module calls differ from the reference's at step {a['step']} (`{a['name']}` recorded, "
                f"`{b['name']}` now): the model's structure or control flow changed"
            )
        if a["sha256"] == b["sha256"]:
            continue
        if a.get("args") != b.get("args"):  # the first output that differs was fed differently
            parent = a["name"].rpartition(".")[0] or "(model)"
            feeds = (
                "the model's inputs (the data, its order or preprocessing)"
                if a["name"] == "(model)"
                else (
                    "the model's inputs (the data, its order or preprocessing) or code between modules, in the "
                    f"forward of `{parent}`"
                )
            )
            return (
                f"module `{a['name']}` is the first whose output differs from the reference's (step {a['step']}), and "
                f"its arguments already differ: the change is in what feeds it: {feeds}"
            )
        if a["step"] > 0:  # every step-0 module matched (it would have been found first): the update differs
            return (
                "every module's output matched the reference's at step 0: the first update differs (the gradients, "
                f"the optimizer or the learning rate changed); the first module to differ is `{a['name']}` at step "
                f"{a['step']}"
            )
        if a.get("own") != b.get("own"):
            state = "its own parameters or buffers differ from the reference's: they changed"
        else:
            state = "its own parameters match: its code (or an op it calls) changed"
        return (
            f"module `{a['name']}` output at step {a['step']} differs from the reference's while its input matched: "
            f"{state}"
        )
    if len(modules_a) != len(modules_b):
        return f"the model made {len(modules_b)} module calls in steps 0-{steps[-1]}, the reference {len(modules_a)}"
    return (
        f"every module's output matched the reference's in steps 0-{steps[-1]}: the difference starts later (in the "
        "backward pass, the optimizer, or a later step)"
    )
