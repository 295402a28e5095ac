"""The roofline's prediction against a measurement: a tiny model's prefill and decode step on this machine.

:func:`tiny_shape` describes a :class:`~labsupport.lm.model.TinyLM` of softmax attention as a
:class:`~labsupport.harness.costs.TransformerShape` (fp32, an ungated MLP of width ``4·d``), so the same FLOP and
byte counts that size a 7B model on an H100 predict the tiny one on this CPU. :func:`predicted_vs_measured` times
the model's ``prefill`` and ``decode_step`` with :func:`labsupport.harness.measuring.time_callable` (fastest of
several calls, one torch thread) beside the machine's peaks measured in the same call, and returns one row per
measurement: predicted seconds, measured seconds, and their ratio.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from labsupport.harness.costs import TransformerShape, roofline_seconds
from labsupport.harness.hardware import MachineProfile, profile_machine
from labsupport.harness.measuring import time_callable
from labsupport.harness.settings import torch_threads
from labsupport.harness.validation import require_positive_int
from labsupport.lm.model import TinyLM

__all__ = ["Prediction", "predicted_vs_measured", "tiny_model", "tiny_shape"]


def tiny_shape(d_model: int, n_layers: int, vocab: int, n_heads: int = 4) -> TransformerShape:
    """The :class:`TransformerShape` of ``TinyLM(vocab, d_model, n_layers, sequence_mixer="attention")``, fp32."""
    d_model, n_layers = require_positive_int("d_model", d_model), require_positive_int("n_layers", n_layers)
    vocab, n_heads = require_positive_int("vocab", vocab), require_positive_int("n_heads", n_heads)
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} must be a multiple of n_heads={n_heads}")
    return TransformerShape(n_layers, d_model, n_heads, n_heads, d_model // n_heads, 4 * d_model, vocab,
                            bytes_per_element=4, gated_mlp=False)


def tiny_model(d_model: int, n_layers: int, vocab: int, max_len: int) -> TinyLM:
    """A seeded softmax-attention ``TinyLM`` in eval mode (its weights do not matter for timing)."""
    torch.manual_seed(0)
    return TinyLM(vocab, d_model=d_model, n_layers=n_layers, max_len=max_len, sequence_mixer="attention").eval()


@dataclass(frozen=True)
class Prediction:
    """One measurement against the roofline: ``phase`` (``"prefill"`` or ``"decode"``), ``length`` (prompt length,
    or the context a decode step attends to), FLOPs, bytes, predicted and measured seconds."""

    phase: str
    length: int
    flops: float
    bytes_moved: float
    predicted_s: float
    measured_s: float

    @property
    def ratio(self) -> float:
        """Measured over predicted: 1 when the roofline is right, above 1 when the machine does worse."""
        return self.measured_s / self.predicted_s


def predicted_vs_measured(*, d_model: int = 128, n_layers: int = 4, vocab: int = 256,
                          prefill_lengths: Sequence[int] = (128, 512, 2048),
                          decode_contexts: Sequence[int] = (128, 512, 2048),
                          repeats: int = 3, machine: MachineProfile | None = None,
                          ) -> tuple[MachineProfile, list[Prediction]]:
    """Time a tiny model's prefill and decode on one thread and set each beside the roofline's prediction.

    The peaks are measured in the same call (``machine`` to pass ones measured just before). Returns the
    machine profile used and one :class:`Prediction` per length.
    """
    repeats = require_positive_int("repeats", repeats)
    lengths = [require_positive_int("prefill length", n) for n in prefill_lengths]
    contexts = [require_positive_int("decode context", n) for n in decode_contexts]
    shape = tiny_shape(d_model, n_layers, vocab)
    model = tiny_model(d_model, n_layers, vocab, max(lengths + contexts) + 1)
    rows = []
    with torch_threads(1), torch.no_grad():
        peaks = machine or profile_machine(record_as=None)
        rate, bandwidth = peaks.gflops * 1e9, peaks.bandwidth_gbs * 1e9
        gen = torch.Generator().manual_seed(0)
        for length in lengths:
            prompt = torch.randint(0, vocab, (1, length), generator=gen)
            seconds = time_callable(lambda: model.prefill(prompt), repeats=repeats)
            flops, moved = shape.prefill(length)
            rows.append(Prediction("prefill", length, flops, moved, roofline_seconds(
                flops, moved, flops_per_s=rate, bytes_per_s=bandwidth), seconds))
        for context in contexts:
            prompt = torch.randint(0, vocab, (1, context), generator=gen)
            _, states = model.prefill(prompt)
            token = prompt[:, -1]
            seconds = time_callable(lambda: model.decode_step(token, states, context), repeats=repeats * 3)
            flops, moved = shape.decode_step(context)
            rows.append(Prediction("decode", context, flops, moved, roofline_seconds(
                flops, moved, flops_per_s=rate, bytes_per_s=bandwidth), seconds))
    return peaks, rows
