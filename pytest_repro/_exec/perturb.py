"""The job process's side of a noise-floor run: perturb what another environment would change, nothing else.

Two parts, both installed around the job without its help:

- **rounding**: a global module forward hook moves every floating-point output of every module by one
  ulp up or down (a sign pattern drawn from a private generator), the size of a different kernel's
  rounding; gradients flow through unchanged.
- **random streams**: a ``TorchDispatchMode`` lets every dropout draw (``bernoulli``, ``native_dropout``)
  run as usual, so the default generators advance exactly as in an unperturbed run (initialisation and
  data order drawn later stay the same), then replaces the drawn mask by one from a private generator:
  another device's generator gives other masks for the same seed. Draws with an explicit ``generator=``
  are the job's own streams (a sampler, say) and are left alone.

Imports torch only when a perturbed run starts; depends on nothing else in the package.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

PERTURBATION_KEY = "perturbation"  # the run record's meta entry: what was perturbed, how often


class _Counts:
    def __init__(self) -> None:
        self.rounding = 0
        self.streams = 0

    def as_dict(self) -> dict[str, int]:
        return {"rounding": self.rounding, "streams": self.streams}


def _generators(seed: int) -> Any:
    import torch

    made: dict[str, torch.Generator] = {}

    def generator(device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in made:
            made[key] = torch.Generator(device=device).manual_seed(seed)
        return made[key]

    return generator


def _stream_mode(seed: int, counts: _Counts) -> Any:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    private = _generators(seed)
    # every overload takes generator=: the same draw again from the private stream replaces the result
    bernoulli = {aten.bernoulli_.float, aten.bernoulli_.Tensor, aten.bernoulli.default, aten.bernoulli.p}

    class Streams(TorchDispatchMode):  # type: ignore[no-untyped-call,misc]
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            out = func(*args, **kwargs)  # the default generator advances as in an unperturbed run
            if kwargs.get("generator") is not None:
                return out
            if func in bernoulli:
                counts.streams += 1
                return func(*args, **{**kwargs, "generator": private(out.device)})
            if func is aten.native_dropout.default:
                inp, p, train = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("train")
                if not train or not 0 < p < 1:
                    return out
                counts.streams += 1
                mask = torch.empty_like(inp, dtype=torch.bool).bernoulli_(1 - p, generator=private(inp.device))
                return inp * mask * (1.0 / (1.0 - p)), mask
            return out

    return Streams()  # type: ignore[no-untyped-call]


def _rounding_hook(seed: int, counts: _Counts) -> Any:
    import torch

    private = _generators(seed + 1)

    def nudge(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
            return t
        counts.rounding += 1
        base = t.detach()
        up = torch.randint(0, 2, base.shape, generator=private(base.device), device=base.device).bool()
        # never out of a range a correct job relies on: an exact 0 only moves up (a ReLU's zeros stay >= 0),
        # an exact +-1 only toward 0 (a saturated probability or a cosine stays within [-1, 1])
        up = (up | (base == 0) | (base == -1)) & (base != 1)
        toward = torch.where(up, torch.full_like(base, float("inf")), torch.full_like(base, float("-inf")))
        step = torch.nextafter(base, toward) - base  # one ulp; the gradient of t is unchanged
        keep = torch.isfinite(base) & torch.isfinite(step)  # an infinity would become NaN
        return t + torch.where(keep, step, torch.zeros_like(step))

    def hook(module: Any, inputs: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return nudge(output)
        if isinstance(output, tuple) and not hasattr(output, "_fields"):
            return tuple(nudge(o) for o in output)
        return None  # dicts, model outputs: their parts were nudged by the modules that made them

    return hook


@contextlib.contextmanager
def perturbed(seed: int, parts: tuple[str, ...] = ("rounding", "streams")) -> Iterator[dict[str, int]]:
    """Run the body with the named perturbations installed; yields the counts of what was perturbed."""
    from torch.nn.modules.module import register_module_forward_hook

    counts = _Counts()
    result: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        if "rounding" in parts:
            handle = register_module_forward_hook(_rounding_hook(seed, counts))
            stack.callback(handle.remove)
        if "streams" in parts:
            stack.enter_context(_stream_mode(seed, counts))
        try:
            yield result
        finally:
            result.update(counts.as_dict())
