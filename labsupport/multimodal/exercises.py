"""Chapter 09, exercises: the checkers for patches, a scan order and its inverse, one ToMe step, FastV's keep set.

Each checker runs the learner's function on seeded cases against the reference in this package and prints one
line (pass, not done yet) or a short explanation. Each is built to catch the tempting wrong answer:

* ``patches_of`` / ``image_of`` — a plain ``reshape`` (strips of rows, not square patches), or the pixels of a
  patch laid out ``(p, p, C)`` instead of ``(C, p, p)``: cases with ``p > 1``, several channels, a non-square
  image and a non-contiguous input;
* ``snake_scan`` — reversing the even rows instead of the odd ones, or swapping height and width;
* ``invert`` — returning the permutation itself (right only for an involution): cases with long cycles;
* ``merge_step`` — an unweighted mean (sizes ignored), a dot product instead of cosine similarity, or merging
  B into A: cases with unequal sizes and metrics of unequal norms;
* ``fastv_keep_set`` — scoring the attention a token *gives* (rows) instead of what it *receives* (columns),
  using the last query or one head only, or returning the kept tokens by rank instead of by position.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from labsupport.harness.checking import Case, CheckResult, check_function
from labsupport.multimodal import images as _images
from labsupport.multimodal import merging as _merging
from labsupport.multimodal import scans as _scans
from labsupport.multimodal import vit as _vit

__all__ = [
    "check_fastv_keep_set",
    "check_image_of",
    "check_invert",
    "check_merge_step",
    "check_patches_of",
    "check_snake_scan",
]

_HINTS = "Tiered hints are above the exercise."


def _reference_patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    return _images.patchify(images, patch)


def _reference_image(patches: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    return _images.unpatchify(patches, patch, height, width)


def _image_cases(gen: torch.Generator) -> list[tuple[str, torch.Tensor, int]]:
    return [
        ("B=2, C=1, 8×8, p=2", torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64), 2),
        ("B=1, C=3, 6×9 (not square), p=3", torch.randn(1, 3, 6, 9, generator=gen, dtype=torch.float64), 3),
        ("B=2, C=2, 4×4, p=1 (a pixel per token)", torch.randn(2, 2, 4, 4, generator=gen, dtype=torch.float64), 1),
        ("float32, B=3, C=1, 8×8, p=4", torch.randn(3, 1, 8, 8, generator=gen), 4),
        ("non-contiguous input (a transposed image), C=2, 4×6, p=2",
         torch.randn(1, 2, 6, 4, generator=gen, dtype=torch.float64).transpose(-1, -2), 2),
    ]


def check_patches_of(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(images (B, C, H, W), p) -> (B, (H/p)·(W/p), C·p·p)``, patches row-major, pixels ``(C, p, p)``."""
    gen = torch.Generator().manual_seed(901)
    cases = [Case(name, (x, p)) for name, x, p in _image_cases(gen)]
    return check_function(
        fn, _reference_patches, cases, exercise="patches_of", atol=0.0, rtol=0.0,
        hint="a reshape alone cuts the image into strips of rows, not p×p squares; split each axis in two and "
             "move the axes before flattening. " + _HINTS,
    )


def check_image_of(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(patches (B, N, C·p·p), p, H, W) -> images (B, C, H, W)``, the inverse of ``patches_of``."""
    gen = torch.Generator().manual_seed(902)
    cases = []
    for name, x, p in _image_cases(gen):
        h, w = x.shape[-2:]
        cases.append(Case(name, (_images.patchify(x.contiguous(), p), p, h, w)))
    return check_function(
        fn, _reference_image, cases, exercise="image_of", atol=0.0, rtol=0.0,
        hint="undo the steps of patches_of in reverse order: the axes must go back where they came from. "
             + _HINTS,
    )


def _reference_snake(height: int, width: int) -> torch.Tensor:
    return _scans.scan_permutations("snake", height, width)[0]


def check_snake_scan(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(H, W) -> (H·W,)`` int64: the snake order (row 0 left to right, row 1 right to left, ...)."""
    cases = [Case(f"H={h}, W={w}", (h, w)) for h, w in ((3, 4), (4, 3), (2, 2), (1, 5), (5, 1), (6, 6))]
    return check_function(
        fn, _reference_snake, cases, exercise="snake_scan",
        hint="the first row runs left to right; which rows run backwards? Check H ≠ W too. " + _HINTS,
    )


def _reference_invert(perm: torch.Tensor) -> torch.Tensor:
    return _scans.inverse_permutation(perm)


def check_invert(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(perm (N,) int64) -> inv (N,)`` with ``inv[perm[k]] = k``."""
    gen = torch.Generator().manual_seed(903)
    cycle = torch.roll(torch.arange(7), 1)                    # 6, 0, 1, ..., 5: one 7-cycle
    cases = [
        Case("a 7-cycle (its own inverse? no)", (cycle,)),
        Case("the column order of a 3×4 grid", (_scans.scan_permutations("column", 3, 4)[0],)),
        Case("a random permutation of 20", (torch.randperm(20, generator=gen),)),
        Case("N=1", (torch.zeros(1, dtype=torch.int64),)),
        Case("the reversed cross-scan column order of a 4×5 grid", (_scans.scan_permutations("cross", 4, 5)[3],)),
    ]
    return check_function(
        fn, _reference_invert, cases, exercise="invert",
        hint="a permutation that is its own inverse (a swap, a reversal) hides the mistake; the checker uses "
             "long cycles. What must inv[perm[k]] be? " + _HINTS,
    )


def _reference_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    out, new_size = _merging.tome_merge(x[None], size[None], metric[None], r)
    return out[0], new_size[0]


def check_merge_step(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(x (N, C), size (N,), metric (N, C'), r) -> (x (N−r, C), size (N−r,))``: one ToMe step."""
    gen = torch.Generator().manual_seed(904)

    def case(name: str, n: int, c: int, r: int, sizes: bool, spread: bool = False, dtype=torch.float64) -> Case:
        x = torch.randn(n, c, generator=gen, dtype=dtype)
        size = torch.randint(1, 6, (n,), generator=gen).to(dtype) if sizes else torch.ones(n, dtype=dtype)
        metric = torch.randn(n, 4, generator=gen, dtype=dtype)
        if spread:
            metric = metric * torch.logspace(-1, 1, n, dtype=dtype)[:, None]  # norms from 0.1 to 10
        return Case(name, (x, size, metric, r))

    cases = [
        case("N=8, all sizes 1, r=2", 8, 3, 2, False),
        case("N=11 (odd), unequal sizes, r=3", 11, 5, 3, True),
        case("N=10, unequal sizes, metric norms from 0.1 to 10, r=4", 10, 2, 4, True, spread=True),
        case("N=6, r=0 (nothing merges)", 6, 2, 0, True),
        case("N=12, r=6 (every A token merges)", 12, 3, 6, True),
        case("float32, N=9, unequal sizes, r=2", 9, 4, 2, True, dtype=torch.float32),
    ]
    return check_function(
        fn, _reference_merge, cases, exercise="merge_step", atol=1e-6, rtol=1e-5, output_names=("x", "size"),
        hint="A is the even positions, B the odd ones; similarity is cosine (normalise first); a merged token is "
             "weighted by its members' sizes; survivors keep their order. " + _HINTS,
    )


def _reference_keep(attn: torch.Tensor, image_start: int, image_end: int, keep: int) -> torch.Tensor:
    return _vit.fastv_keep(attn[None], image_start, image_end, keep)[0]


def check_fastv_keep_set(fn: Callable[..., Any]) -> CheckResult:
    """Check ``fn(attn (H, L, L), image_start, image_end, keep) -> (keep,)`` int64 positions, ascending."""
    gen = torch.Generator().manual_seed(905)

    def causal_attention(heads: int, length: int, dtype=torch.float64) -> torch.Tensor:
        scores = 2 * torch.randn(heads, length, length, generator=gen, dtype=dtype)
        mask = torch.ones(length, length, dtype=torch.bool).tril()
        return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)

    cases = [
        Case("H=2, L=10, image tokens 0..7, keep 4", (causal_attention(2, 10), 0, 8, 4)),
        Case("H=4, L=14, a system token first: image tokens 1..12, keep 5", (causal_attention(4, 14), 1, 13, 5)),
        Case("H=3, L=9, image tokens 2..7, keep 6 (all of them)", (causal_attention(3, 9), 2, 8, 6)),
        Case("H=2, L=12, image tokens 0..9, keep 0", (causal_attention(2, 12), 0, 10, 0)),
        Case("float32, H=4, L=20, image tokens 0..15, keep 3", (causal_attention(4, 20, torch.float32), 0, 16, 3)),
    ]
    return check_function(
        fn, _reference_keep, cases, exercise="fastv_keep_set",
        hint="a token's score is the attention it receives (a column of the map), averaged over heads and "
             "over every query; return positions in the sequence, in increasing order. " + _HINTS,
    )
