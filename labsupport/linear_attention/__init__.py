"""Chapter 03: linear attention and the memory-update view.

Every mechanism of the chapter keeps a fixed-size matrix memory ``S`` of shape
``(D_k, D_v)`` per head, and differs only in how it *forgets* and how it
*writes*; :data:`MECHANISMS` is the one registry of them.

==================  ==========================================================================================
module              holds
==================  ==========================================================================================
``reference``       the readable math: feature maps, decays, linear attention with decay (parallel, recurrent,
                    chunkwise), the delta rule (recurrent, parallel, UT transform, chunkwise), TTT-linear,
                    ``memory_recurrence`` (the one loop behind them all), the one-token kernels
``fast``            ``linear_attention_chunkwise_fast``: the chunkwise form arranged for a CPU
``triton_delta``    ``delta_rule_chunkwise_triton``: the chunkwise (gated) delta rule forward in two Triton kernels
                    (chunk preparation for all chunks at once, then one state pass); imported only on demand
``mechanisms``      THE registry: one ``MechanismSpec`` row per mechanism (forget/write text, feature map,
                    gates, sequence form, step form), ``MECHANISMS``, ``get_mechanism``
``mixers``          ``LinearAttentionMixer`` (reads a registry row), ``linear_mixer`` (a ``TinyLM`` factory)
``widget``          ``memory_decay_data``, ``memory_decay_figure``, ``widget_parameters_used``: the "memory
                    decay" explorer
``exercises``       the warm-ups' library steps ``recurrent_step``, ``chunkwise_step``, ``delta_rule_step``, and
                    the checkers ``check_*`` of exercises 1–4 (exercise 4's refuses a loop over the tokens)
``exercises_core``  the core exercise's checker ``check_gated_delta_chunk_step`` (one chunk of gated DeltaNet
                    through the UT transform; refuses a loop over the tokens)
``_solutions``      private: the core exercises' reference solutions (never in the ``la`` namespace)
==================  ==========================================================================================

The notebook imports the package as ``la``: ``from labsupport import linear_attention as la``.
Byte and FLOP formulas (``recurrent_state_bytes``, ``chunkwise_flops``) live in
:mod:`labsupport.harness.costs`.
"""

from labsupport.linear_attention.exercises import (
    check_chunkwise_decay_step,
    check_chunkwise_step,
    check_delta_rule_step,
    check_recurrent_step,
    chunkwise_step,
    delta_rule_step,
    recurrent_step,
)
from labsupport.linear_attention.exercises_core import check_gated_delta_chunk_step
from labsupport.linear_attention.fast import linear_attention_chunkwise_fast
from labsupport.linear_attention.mechanisms import (
    MECHANISMS,
    FormOptions,
    MechanismSpec,
    MemoryInputs,
    get_mechanism,
    widget_mechanisms,
)
from labsupport.linear_attention.mixers import LinearAttentionMixer, linear_mixer
from labsupport.linear_attention.reference import (
    delta_rule_chunkwise,
    delta_rule_parallel,
    delta_rule_recurrent,
    elu_feature_map,
    linear_attention_chunkwise,
    linear_attention_parallel,
    linear_attention_recurrent,
    memory_recurrence,
    retnet_log_decay,
    ttt_inner_loss,
    ttt_linear,
    ttt_linear_minibatch,
    ut_transform,
)
from labsupport.linear_attention.widget import (
    MemoryDecayData,
    memory_decay_data,
    memory_decay_figure,
    widget_parameters_used,
)

__all__ = [
    "MECHANISMS",
    "FormOptions",
    "LinearAttentionMixer",
    "MechanismSpec",
    "MemoryDecayData",
    "MemoryInputs",
    "check_chunkwise_decay_step",
    "check_chunkwise_step",
    "check_delta_rule_step",
    "check_gated_delta_chunk_step",
    "check_recurrent_step",
    "chunkwise_step",
    "delta_rule_chunkwise",
    "delta_rule_parallel",
    "delta_rule_recurrent",
    "delta_rule_step",
    "elu_feature_map",
    "get_mechanism",
    "linear_attention_chunkwise",
    "linear_attention_chunkwise_fast",
    "linear_attention_parallel",
    "linear_attention_recurrent",
    "linear_mixer",
    "memory_decay_data",
    "memory_decay_figure",
    "memory_recurrence",
    "recurrent_step",
    "retnet_log_decay",
    "ttt_inner_loss",
    "ttt_linear",
    "ttt_linear_minibatch",
    "ut_transform",
    "widget_mechanisms",
    "widget_parameters_used",
]
