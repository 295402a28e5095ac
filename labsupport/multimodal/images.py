"""Images as token sequences: the shipped digits, a generated 2-D task, patches and 2-D positions.

* :func:`load_digits` — the 8×8 UCI handwritten digits shipped in ``data/digits.safetensors`` (sha256-checked),
  as float images in ``[0, 1]`` and int64 labels, split into train and test once and for all.
* :func:`segment_task` — a generated task that needs 2-D context: a sparse random image holds a horizontal
  segment, a vertical segment, or neither (class 0 / 1 / 2). A 1-D scan keeps one axis's neighbours adjacent
  and pushes the other axis's ``width`` steps apart.
* :func:`patchify` / :func:`unpatchify` — ``(B, C, H, W) <-> (B, N, C·p·p)``, patches in row-major order, each
  patch's pixels channel-first then row-major (``C, p, p`` flattened).
* :func:`patch_grid` — the ``(row, column)`` of every patch; :class:`PatchEmbedding` adds learned row and column
  embeddings to a linear patch projection (a factorised 2-D position).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn

from labsupport.harness.data import data_dir, read_manifest, sha256_file
from labsupport.harness.validation import require_int, require_positive_int, require_tensor

__all__ = [
    "DIGITS_FILE",
    "Digits",
    "PatchEmbedding",
    "load_digits",
    "patch_grid",
    "patchify",
    "segment_task",
    "unpatchify",
]

DIGITS_FILE = "digits.safetensors"


@dataclass(frozen=True)
class Digits:
    """The digits, split: images ``(N, 1, 8, 8)`` float32 in ``[0, 1]``, labels ``(N,)`` int64."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    licence: str


def load_digits(*, test_fraction: float = 0.2, split_seed: int = 0) -> Digits:
    """Load ``data/digits.safetensors`` after checking its sha256 against ``data/MANIFEST.sha256``.

    The split is a seeded permutation of the 1,797 images (the same for every reader with the same seed).
    """
    from safetensors import safe_open

    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
    split_seed = require_int("split_seed", split_seed, minimum=0)
    folder = data_dir()
    path = folder / DIGITS_FILE
    expected = read_manifest(folder).get(DIGITS_FILE)
    if expected is None or not path.is_file():
        raise FileNotFoundError(f"{DIGITS_FILE} is missing from {folder} or its manifest")
    if sha256_file(path) != expected:
        raise ValueError(f"{path}: sha256 differs from data/MANIFEST.sha256 (a damaged or changed file)")
    with safe_open(str(path), framework="pt") as f:
        images = f.get_tensor("images").float().div(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
        labels = f.get_tensor("labels").long()
        licence = json.loads((f.metadata() or {}).get("provenance", "{}")).get("licence", "")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    n_test = round(len(labels) * float(test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Digits(images[train], labels[train], images[test], labels[test], licence)


def segment_task(n: int, size: int = 8, *, density: float = 0.12, length: int = 3,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(n, 1, size, size)`` and labels: 0 = a horizontal segment, 1 = vertical, 2 = neither.

    Background: each pixel is on with probability ``density``, then every accidental straight run of
    ``length`` on-pixels (either axis) is broken, so the planted segment is the only one. Classes are balanced
    (``i % 3``). Deterministic in ``seed``.
    """
    n, size, length = require_positive_int("n", n), require_positive_int("size", size), \
        require_positive_int("length", length)
    if length < 2 or length > size:
        raise ValueError(f"length must lie in 2..size={size}, got {length}")
    if not 0.0 <= float(density) < 0.5:
        raise ValueError(f"density must lie in [0, 0.5), got {density!r}")
    gen = torch.Generator().manual_seed(require_int("seed", seed, minimum=0))
    images = (torch.rand(n, size, size, generator=gen) < density).float()
    for _ in range(size * size):  # break accidental runs until none is left
        runs = _runs(images, length)
        if not runs.any():
            break
        images = images * (1 - runs)
    labels = torch.arange(n) % 3
    starts = torch.randint(0, size - length + 1, (n,), generator=gen)
    lines = torch.randint(0, size, (n,), generator=gen)
    offsets = torch.arange(length)
    for i in range(n):
        along = starts[i] + offsets
        line = int(lines[i])
        beside = [j for j in (line - 1, line + 1) if 0 <= j < size]
        if labels[i] == 0:
            images[i, beside, along[:, None]] = 0.0   # no vertical run may pass through the segment
            images[i, line, along] = 1.0
        elif labels[i] == 1:
            images[i, along[:, None], beside] = 0.0   # no horizontal run may pass through it
            images[i, along, line] = 1.0
    # a planted segment may join background pixels into a longer run along its own axis: harmless.
    return images.unsqueeze(1), labels


def _runs(images: torch.Tensor, length: int) -> torch.Tensor:
    """The pixel that starts every run of ``length`` on-pixels along rows or columns (a mask, float)."""
    n, h, w = images.shape
    start = torch.zeros_like(images)
    horizontal = torch.ones(n, h, w - length + 1)
    vertical = torch.ones(n, h - length + 1, w)
    for k in range(length):
        horizontal = horizontal * images[:, :, k: w - length + 1 + k]
        vertical = vertical * images[:, k: h - length + 1 + k, :]
    start[:, :, : w - length + 1] += horizontal
    start[:, : h - length + 1, :] += vertical
    return (start > 0).float()


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B, N, C·p·p)`` with ``N = (H/p)·(W/p)``; patches row-major, pixels ``(C, p, p)``."""
    images = require_tensor("images", images, ndim=4)
    patch = require_positive_int("patch", patch)
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}×{w} is not divisible by patch size {patch}")
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh, patch, gw, patch)      # split each axis into (grid, within-patch)
    x = x.permute(0, 2, 4, 1, 3, 5)                       # (B, gh, gw, C, p, p)
    return x.reshape(b, gh * gw, c * patch * patch)


def unpatchify(patches: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`patchify`: ``(B, N, C·p·p) -> (B, C, H, W)``."""
    patches = require_tensor("patches", patches, ndim=3)
    patch = require_positive_int("patch", patch)
    height, width = require_positive_int("height", height), require_positive_int("width", width)
    if height % patch or width % patch:
        raise ValueError(f"image size {height}×{width} is not divisible by patch size {patch}")
    b, n, dim = patches.shape
    gh, gw = height // patch, width // patch
    if n != gh * gw or dim % (patch * patch):
        raise ValueError(f"{n} patches of {dim} values do not tile a {height}×{width} image with patch {patch}")
    c = dim // (patch * patch)
    x = patches.reshape(b, gh, gw, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def patch_grid(grid_height: int, grid_width: int) -> torch.Tensor:
    """``(N, 2)`` int64: the (row, column) of each patch in row-major order."""
    gh, gw = require_positive_int("grid_height", grid_height), require_positive_int("grid_width", grid_width)
    rows = torch.arange(gh).repeat_interleave(gw)
    cols = torch.arange(gw).repeat(gh)
    return torch.stack([rows, cols], dim=1)


class PatchEmbedding(nn.Module):
    """Patches ``(B, N, patch_dim)`` -> tokens ``(B, N, d_model)``: a linear map plus row and column embeddings."""

    def __init__(self, patch_dim: int, d_model: int, grid_height: int, grid_width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(require_positive_int("patch_dim", patch_dim), require_positive_int("d_model", d_model))
        self.rows = nn.Parameter(torch.randn(require_positive_int("grid_height", grid_height), d_model))
        self.cols = nn.Parameter(torch.randn(require_positive_int("grid_width", grid_width), d_model))
        self.register_buffer("grid", patch_grid(grid_height, grid_width), persistent=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        patches = require_tensor("patches", patches, ndim=3)
        if patches.shape[1] != len(self.grid):
            raise ValueError(f"expected {len(self.grid)} patches, got {patches.shape[1]}")
        return self.proj(patches) + self.rows[self.grid[:, 0]] + self.cols[self.grid[:, 1]]
