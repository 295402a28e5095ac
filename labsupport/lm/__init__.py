"""The model bench every chapter plugs its mechanism into.

==================  ================================================================================
module              holds
==================  ================================================================================
``contracts``       what a sequence mixer, a channel mixer and a trainer hook must do (Protocols)
``layers``          ``SoftmaxAttention`` and its ``KVCache``, ``MLP``, ``ShortConv``, ``attention_mixer``
``model``           ``TinyLM`` and the ``Block`` that prefills and decodes itself
``tasks``           MQAR, selective copying, needle in a haystack, the character corpus
``objectives``      next-token loss, the masked-token (diffusion) objective
``training``        ``train`` (pluggable objective, auxiliary losses, metrics), ``evaluate_recall``,
                    ``evaluate_perplexity``
``probe``           ``probe`` / ``probe_seeds``: mixer + task + budget → recall or perplexity
==================  ================================================================================

``lm`` imports only the harness.
"""
