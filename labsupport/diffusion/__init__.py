"""Chapter 08: masked diffusion language models — denoise many tokens at once.

* :mod:`~labsupport.diffusion.process` — the masking schedule, the forward process, the ``1/t``-weighted loss,
  the SUBS denoiser, the device-aware objective, a Monte-Carlo ELBO.
* :mod:`~labsupport.diffusion.exact` — a vocabulary and length small enough to enumerate: exact NLL and ELBO.
* :mod:`~labsupport.diffusion.sampling` — transfer schedule, low-confidence / random remasking, block
  (semi-autoregressive) decoding, Fast-dLLM's confidence threshold, infilling, the autoregressive baseline.
* :mod:`~labsupport.diffusion.cache` — keys and values outside the current block, reused within it: the
  approximate cache of a bidirectional denoiser, and BD3-LM's exact cache under block-causal attention.
* :mod:`~labsupport.diffusion.guidance` — LLaDA's classifier-free guidance (the prompt masked for the
  unconditional pass).
* :mod:`~labsupport.diffusion.revision` — ReMDM-style remasking of committed tokens.
* :mod:`~labsupport.diffusion.speculative` — speculative decoding of the AR model with an n-gram draft (exact
  acceptance rule, KV cache extended several positions at a time).
* :mod:`~labsupport.diffusion.checkpoints` — the shipped denoiser and AR models (the AR model at 3,000 steps and
  stopped early at 1,250), loaded after a sha256 check.
* :mod:`~labsupport.diffusion.evaluation` — span likelihoods (exact AR, bound for the denoiser), infilling
  accuracy, judge NLL and entropy of samples.
* :mod:`~labsupport.diffusion.widget` — the denoising explorer's data and figure.
* :mod:`~labsupport.diffusion.exercises` — the chapter's checkers.
"""

from labsupport.diffusion.cache import BlockKVCache, ExactBlockCache, block_causal_logits
from labsupport.diffusion.checkpoints import (
    AR_CHECKPOINT,
    AR_EARLY_CHECKPOINT,
    DIFFUSION_CHECKPOINT,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from labsupport.diffusion.exact import (
    ToyRecord,
    all_sequences,
    elbo_by_mask_sets,
    masked_log_probs,
    order_bounds,
    toy_distribution,
    train_toy,
)
from labsupport.diffusion.process import (
    SCHEDULES,
    DiffusionObjective,
    MaskedDenoiser,
    elbo_per_sequence,
    loss_weight,
    mask_probability,
    mask_tokens,
    masked_diffusion_loss,
    subs_logits,
)
from labsupport.diffusion.guidance import guided_logits
from labsupport.diffusion.revision import REVISION, remask_tokens, revision_sample
from labsupport.diffusion.sampling import (
    ATTENTION,
    CACHES,
    REMASKING,
    SampleTrace,
    ar_generate,
    commit_tokens,
    diffusion_sample,
    infill_canvas,
    threshold_sample,
    transfer_schedule,
)
from labsupport.diffusion.speculative import (
    CausalCache,
    NGramDrafter,
    SpeculativeTrace,
    round_output_distribution,
    speculative_generate,
    verify_draft,
)

__all__ = [
    "AR_CHECKPOINT",
    "AR_EARLY_CHECKPOINT",
    "ATTENTION",
    "CACHES",
    "REVISION",
    "CausalCache",
    "ExactBlockCache",
    "NGramDrafter",
    "SpeculativeTrace",
    "block_causal_logits",
    "guided_logits",
    "remask_tokens",
    "revision_sample",
    "round_output_distribution",
    "speculative_generate",
    "verify_draft",
    "DIFFUSION_CHECKPOINT",
    "REMASKING",
    "SCHEDULES",
    "BlockKVCache",
    "DiffusionObjective",
    "MaskedDenoiser",
    "SampleTrace",
    "ToyRecord",
    "all_sequences",
    "ar_generate",
    "build_model",
    "commit_tokens",
    "diffusion_sample",
    "elbo_by_mask_sets",
    "elbo_per_sequence",
    "infill_canvas",
    "load_checkpoint",
    "loss_weight",
    "mask_probability",
    "mask_tokens",
    "masked_diffusion_loss",
    "masked_log_probs",
    "order_bounds",
    "save_checkpoint",
    "subs_logits",
    "threshold_sample",
    "toy_distribution",
    "train_toy",
    "transfer_schedule",
]
