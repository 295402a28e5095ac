"""A tiny image classifier on the ``lm`` bench's blocks, and its training loop.

:class:`PatchClassifier` is patchify → :class:`~labsupport.multimodal.images.PatchEmbedding` → ``n_layers``
of ``lm``'s pre-norm :class:`~labsupport.lm.model.Block` (any sequence mixer from a factory, an MLP) → final
norm → mean over patches → a linear head. With ``lm.layers.attention_mixer(causal=False)`` it is a tiny ViT;
with :func:`~labsupport.multimodal.scans.scan_mixer` a Vim/VMamba-style recurrent encoder.

:func:`train_classifier` trains any ``images -> logits`` model with AdamW, linear warm-up then cosine decay,
gradient clipping and a seeded batch stream, as ``lm.training.train`` does for token models.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from labsupport.harness.settings import seed_everything
from labsupport.harness.validation import require_int, require_positive_int, require_tensor
from labsupport.lm.contracts import MixerFactory
from labsupport.lm.layers import MLP
from labsupport.lm.model import Block
from labsupport.multimodal.images import PatchEmbedding, patchify

__all__ = ["ClassifierHistory", "PatchClassifier", "accuracy", "init_encoder", "seeded", "train_classifier"]

#: Standard deviation of every linear weight and position embedding at initialisation. Tokens of one or four
#: pixels carry little signal; with N(0, 0.02) (``TinyLM``'s choice) or PyTorch's defaults these encoders sat on
#: the loss plateau ln(10) for hundreds of steps, with 0.1 they leave it within a few dozen.
INIT_STD = 0.1


def init_encoder(model: nn.Module, std: float = INIT_STD) -> nn.Module:
    """Linear weights and position embeddings ~ N(0, std²), biases 0; then each module's own ``init_weights()``."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, PatchEmbedding):
                module.rows.normal_(std=std)
                module.cols.normal_(std=std)
        for module in model.modules():
            if module is not model and callable(getattr(module, "init_weights", None)):
                module.init_weights()
    return model


def square_patch_embedding(image_size: int, patch: int, channels: int, d_model: int) -> tuple[PatchEmbedding, int, int]:
    """The patch embedding of square ``image_size`` images in ``patch × patch`` patches: ``(embed, patch, grid)``.

    Checks that both sizes are positive integers and that the patch divides the image.
    """
    image_size, patch = require_positive_int("image_size", image_size), require_positive_int("patch", patch)
    if image_size % patch:
        raise ValueError(f"image_size={image_size} is not divisible by patch={patch}")
    grid = image_size // patch
    return PatchEmbedding(channels * patch * patch, d_model, grid, grid), patch, grid


class PatchClassifier(nn.Module):
    """``images (B, C, H, W) -> logits (B, n_classes)`` through ``lm`` blocks over patch tokens."""

    def __init__(self, *, image_size: int, patch: int, channels: int, d_model: int, n_layers: int,
                 n_classes: int, mixer: MixerFactory, mlp_expansion: int = 2) -> None:
        super().__init__()
        self.embed, self.patch, self.grid = square_patch_embedding(image_size, patch, channels, d_model)
        self.blocks = nn.ModuleList(
            Block(d_model, mixer(d_model, i), MLP(d_model, mlp_expansion))
            for i in range(require_positive_int("n_layers", n_layers))
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, require_positive_int("n_classes", n_classes))
        init_encoder(self)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Token features after the last block, ``(B, N, d_model)``."""
        x = self.embed(patchify(images, self.patch))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean(dim=1))


Inputs = torch.Tensor | tuple[torch.Tensor, ...]


def _as_tuple(inputs: Inputs, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    parts = inputs if isinstance(inputs, tuple) else (inputs,)
    for i, part in enumerate(parts):
        require_tensor(f"inputs[{i}]", part)
        if len(part) != len(labels):
            raise ValueError(f"inputs[{i}] has {len(part)} rows but there are {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("need at least one example")
    return parts


@torch.no_grad()
def accuracy(model: nn.Module, inputs: Inputs, labels: torch.Tensor, *, chunk: int = 512) -> float:
    """Fraction of examples whose top logit is the label (evaluation mode, in chunks).

    ``inputs`` is the model's one input tensor, or a tuple of them (``model(*inputs)``), row ``i`` for label ``i``.
    """
    labels = require_tensor("labels", labels, ndim=1)
    parts = _as_tuple(inputs, labels)
    was_training = model.training
    model.eval()
    correct = sum(int((model(*(p[s:s + chunk] for p in parts)).argmax(-1) == labels[s:s + chunk]).sum())
                  for s in range(0, len(labels), chunk))
    model.train(was_training)
    return correct / len(labels)


@dataclass
class ClassifierHistory:
    """Losses of a run (one per step) and its wall time in seconds."""

    label: str
    loss: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train_classifier(model: nn.Module, inputs: Inputs, labels: torch.Tensor, *, steps: int,
                     batch: int = 64, lr: float = 3e-3, weight_decay: float = 0.05, warmup_fraction: float = 0.1,
                     grad_clip: float = 1.0, seed: int = 0, label: str = "model",
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                     ) -> ClassifierHistory:
    """Train ``model`` on random minibatches of ``(inputs, labels)`` for ``steps`` AdamW steps.

    ``inputs``: one tensor or a tuple of tensors (the model is called as ``model(*inputs)``).

    Deterministic for a given ``seed`` (minibatches come from a generator seeded with it; seed the model's
    initialisation yourself, before building it).
    """
    import time

    steps, batch = require_positive_int("steps", steps), require_positive_int("batch", batch)
    seed = require_int("seed", seed, minimum=0)
    labels = require_tensor("labels", labels, ndim=1)
    parts = _as_tuple(inputs, labels)
    gen = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    warmup = max(1, int(warmup_fraction * steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, schedule)
    history = ClassifierHistory(label)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        index = torch.randint(0, len(labels), (batch,), generator=gen)
        loss = loss_fn(model(*(p[index] for p in parts)), labels[index])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimiser.step()
        scheduler.step()
        history.loss.append(float(loss.detach()))
    history.seconds = time.perf_counter() - start
    model.eval()
    return history


def seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` after ``seed_everything(seed)``: the same initial weights for every reader."""
    seed_everything(require_int("seed", seed, minimum=0))
    return build()
