"""Chapter 02 — KV cache and grouped attention: everything that shrinks the cache a decode step reads.

==================  ==========================================================================================
module              holds
==================  ==========================================================================================
``reference``       ``repeat_kv``, ``grouped_attention``, ``grouped_decode_step`` (MHA/GQA/MQA as one function),
                    ``rotary`` (RoPE), ``latent_attention_core`` and ``absorb_mla_weights`` (absorbed MLA)
``quantization``    KIVI-style cache: ``quantize_asymmetric``, ``dequantize``, ``quantize_dequantize``,
                    ``fake_quantize``, ``QuantSpec``, ``QuantizedKVCache``, ``quantized_cache_attention``
``mixers``          ``GroupedQueryAttention`` / ``grouped_mixer``, ``mean_pool_kv_heads``,
                    ``LatentAttention`` / ``latent_mixer`` with its ``LatentCache`` (``TinyLM`` mixers)
``exercises``       ``check_grouped_decode_step``, ``check_absorb_mla_weights``, ``check_quantize_dequantize``
``exercises_core``  the core exercises' checkers: ``check_mean_pool_kv`` (MHA -> GQA conversion),
                    ``check_absorbed_mla_decode_step`` (refuses the naive form, by the harness's work guards)
``_solutions``      private: the core exercises' reference solutions (never in the ``ga`` namespace)
==================  ==========================================================================================

The per-token cache sizes (``cache_elements_per_token``, ``mla_elements_per_token``,
``equivalent_kv_groups``, ``quantized_bytes_per_element``) live in :mod:`labsupport.harness.costs`.

Shapes: attention tensors are ``(B, H, L, D)``; model activations ``(B, L, d_model)``. In the
notebook: ``from labsupport import grouped as ga``.
"""

from labsupport.grouped.exercises import check_absorb_mla_weights, check_grouped_decode_step, check_quantize_dequantize
from labsupport.grouped.exercises_core import check_absorbed_mla_decode_step, check_mean_pool_kv
from labsupport.grouped.mixers import (
    GroupedQueryAttention,
    LatentAttention,
    LatentCache,
    grouped_mixer,
    latent_mixer,
    mean_pool_kv_heads,
)
from labsupport.grouped.quantization import (
    QuantizedKVCache,
    QuantSpec,
    dequantize,
    fake_quantize,
    quantize_asymmetric,
    quantize_dequantize,
    quantized_cache_attention,
)
from labsupport.grouped.reference import (
    absorb_mla_weights,
    grouped_attention,
    grouped_decode_step,
    latent_attention_core,
    repeat_kv,
    rotary,
)

__all__ = [
    "GroupedQueryAttention",
    "LatentAttention",
    "LatentCache",
    "QuantSpec",
    "QuantizedKVCache",
    "absorb_mla_weights",
    "check_absorbed_mla_decode_step",
    "check_mean_pool_kv",
    "check_absorb_mla_weights",
    "check_grouped_decode_step",
    "check_quantize_dequantize",
    "dequantize",
    "fake_quantize",
    "grouped_attention",
    "grouped_decode_step",
    "grouped_mixer",
    "latent_attention_core",
    "latent_mixer",
    "mean_pool_kv_heads",
    "quantize_asymmetric",
    "quantize_dequantize",
    "quantized_cache_attention",
    "repeat_kv",
    "rotary",
]
