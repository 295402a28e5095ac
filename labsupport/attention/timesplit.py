"""Chapter 00: where a model's forward pass spends its time — attention, weight matmuls, or the rest.

:func:`time_split` times one forward pass of a model and splits the wall time
into three parts, measured with forward hooks:

* ``"weight matmuls"``: every ``nn.Linear`` (query/key/value and output
  projections, the MLP, the output head);
* ``"attention"``: what the sequence mixers do besides their own linear layers
  (scores, softmax, weighted sum, and the reshapes around them);
* ``"the rest"``: everything else (embedding, layer norms, short convolutions,
  activations, residual adds, Python overhead).

The split of the fastest of ``repeats`` passes is returned, on the thread count
the caller set (the chapter uses one). Compare it with
:meth:`labsupport.harness.costs.TransformerShape.flops_split`, the same split in FLOPs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from labsupport.harness.validation import require_int, require_tensor

__all__ = ["SPLIT_PARTS", "time_split"]

SPLIT_PARTS = ("attention", "weight matmuls", "the rest")


def time_split(model: nn.Module, tokens: torch.Tensor, *, mixers: list[nn.Module] | None = None,
               repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Seconds of one forward pass ``model(tokens)``, split into :data:`SPLIT_PARTS` (plus ``"total"``).

    Args:
        model: any ``nn.Module``; its ``nn.Linear`` layers count as weight matmuls.
        tokens: the input of ``model``.
        mixers: the modules whose time (minus their own linear layers) counts as attention;
            by default every submodule named ``mixer`` (the sequence mixer of each of the
            course's ``Block``\\ s).
        repeats: timed passes; the split of the fastest is returned.
        warmup: untimed passes first.

    The hooks call ``time.perf_counter`` around each module: on one thread that
    adds well under a microsecond per call, negligible beside the matrix products.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    require_tensor("tokens", tokens)
    repeats = require_int("repeats", repeats, minimum=1)
    warmup = require_int("warmup", warmup, minimum=0)
    if mixers is None:
        mixers = [module for name, module in model.named_modules() if name.split(".")[-1] == "mixer"]
    if not mixers:
        raise ValueError("no sequence mixer found: pass mixers=[...] (the attention modules of the model)")
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    linears_in_mixers = {id(linear) for mixer in mixers for linear in mixer.modules() if isinstance(linear, nn.Linear)}

    spent: dict[str, float] = {}
    starts: dict[int, float] = {}

    def timer(key: str, module_id: int) -> tuple[Callable[..., None], Callable[..., None]]:
        def before(*_: object) -> None:
            starts[module_id] = time.perf_counter()

        def after(*_: object) -> None:
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - starts.pop(module_id)

        return before, after

    handles = []
    for linear in linears:
        key = "linear in mixer" if id(linear) in linears_in_mixers else "linear"
        before, after = timer(key, id(linear))
        handles += [linear.register_forward_pre_hook(before), linear.register_forward_hook(after)]
    for mixer in mixers:
        before, after = timer("mixer", id(mixer))
        handles += [mixer.register_forward_pre_hook(before), mixer.register_forward_hook(after)]

    best: dict[str, float] | None = None
    try:
        with torch.no_grad():
            for _ in range(warmup):
                model(tokens)
            for _ in range(repeats):
                spent.clear()
                start = time.perf_counter()
                model(tokens)
                total = time.perf_counter() - start
                linear_time = spent.get("linear", 0.0) + spent.get("linear in mixer", 0.0)
                attention = max(0.0, spent.get("mixer", 0.0) - spent.get("linear in mixer", 0.0))
                split = {"attention": attention, "weight matmuls": linear_time,
                         "the rest": max(0.0, total - attention - linear_time), "total": total}
                if best is None or total < best["total"]:
                    best = split
    finally:
        for handle in handles:
            handle.remove()
    assert best is not None
    return best
