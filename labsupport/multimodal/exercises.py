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
  using the last query or one head only, or returning the kept tokens by rank instead of by position;
* ``route_tokens`` (Mixture-of-Depths) — an update not weighted by the router (the router then gets no
  gradient), the weight applied to the whole output ``x + f`` instead of the update, the skipped tokens zeroed,
  the kept count rounded down, the chosen tokens in rank order, or the update run on every token and the chosen
  rows picked afterwards (all the compute, and the chosen tokens attend to the skipped ones).

Every checker takes ``reveal=True`` to print the full recipe; without it a failure says what this answer did
(where a known mistake matches), points at the notebook's tiered hints, and says how to ask for the recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from labsupport.harness.checking import Case, CheckResult, check_function
from labsupport.harness.diagnosis import known_mistakes
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
    "check_route_tokens",
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


def _strip_patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    b, c, h, w = images.shape
    return images.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def _channels_last_patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def _strip_image(patches: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    b, _, dim = patches.shape
    return patches.reshape(b, dim // (patch * patch), height, width)


_PATCH_MISTAKES = known_mistakes({
    "your tokens are strips of whole rows (a plain reshape), not p×p squares": _strip_patches,
    "your patches hold the right pixels laid out (p, p, C), not (C, p, p): channel first": _channels_last_patches,
})

_IMAGE_MISTAKES = known_mistakes({
    "your image is the patches reshaped straight back (strips of rows): the axes must be permuted back":
        _strip_image,
})


def check_patches_of(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
    """Check ``fn(images (B, C, H, W), p) -> (B, (H/p)·(W/p), C·p·p)``, patches row-major, pixels ``(C, p, p)``."""
    gen = torch.Generator().manual_seed(901)
    cases = [Case(name, (x, p)) for name, x, p in _image_cases(gen)]
    return check_function(
        fn, _reference_patches, cases, exercise="patches_of", atol=0.0, rtol=0.0,
        diagnose=_PATCH_MISTAKES, reveal=reveal,
        recipe="images.reshape(B, C, H//p, p, W//p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (H//p)·(W//p), C·p·p).",
        hint="a reshape alone cuts the image into strips of rows, not p×p squares; split each axis in two and "
             "move the axes before flattening. " + _HINTS,
    )


def check_image_of(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
    """Check ``fn(patches (B, N, C·p·p), p, H, W) -> images (B, C, H, W)``, the inverse of ``patches_of``."""
    gen = torch.Generator().manual_seed(902)
    cases = []
    for name, x, p in _image_cases(gen):
        h, w = x.shape[-2:]
        cases.append(Case(name, (_images.patchify(x.contiguous(), p), p, h, w)))
    return check_function(
        fn, _reference_image, cases, exercise="image_of", atol=0.0, rtol=0.0, diagnose=_IMAGE_MISTAKES,
        reveal=reveal,
        recipe="C = dim // (p·p); patches.reshape(B, H//p, W//p, C, p, p).permute(0, 3, 1, 4, 2, 5)"
               ".reshape(B, C, H, W).",
        hint="undo the steps of patches_of in reverse order: the axes must go back where they came from. "
             + _HINTS,
    )


def _reference_snake(height: int, width: int) -> torch.Tensor:
    return _scans.scan_permutations("snake", height, width)[0]


def _even_rows_reversed(height: int, width: int) -> torch.Tensor:
    grid = torch.arange(height * width).view(height, width).clone()
    grid[0::2] = grid[0::2].flip(-1)
    return grid.reshape(-1)


def _snake_swapped(height: int, width: int) -> torch.Tensor:
    grid = torch.arange(height * width).view(width, height).clone()
    grid[1::2] = grid[1::2].flip(-1)
    return grid.reshape(-1)


_SNAKE_MISTAKES = known_mistakes({
    "your snake reverses rows 0, 2, 4, …: row 0 must run left to right": _even_rows_reversed,
    "your snake lays the grid out W × H: height and width are swapped": _snake_swapped,
})


def check_snake_scan(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
    """Check ``fn(H, W) -> (H·W,)`` int64: the snake order (row 0 left to right, row 1 right to left, ...)."""
    cases = [Case(f"H={h}, W={w}", (h, w)) for h, w in ((3, 4), (4, 3), (2, 2), (1, 5), (5, 1), (6, 6))]
    return check_function(
        fn, _reference_snake, cases, exercise="snake_scan", diagnose=_SNAKE_MISTAKES, reveal=reveal,
        recipe="grid = torch.arange(H·W).view(H, W).clone(); grid[1::2] = grid[1::2].flip(-1); grid.reshape(-1).",
        hint="the first row runs left to right; which rows run backwards? Check H ≠ W too. " + _HINTS,
    )


def _reference_invert(perm: torch.Tensor) -> torch.Tensor:
    return _scans.inverse_permutation(perm)


_INVERT_MISTAKES = known_mistakes({
    "your answer is the permutation itself: that is its own inverse only for a swap or a reversal":
        lambda perm: perm.clone(),
})


def check_invert(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
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
        fn, _reference_invert, cases, exercise="invert", diagnose=_INVERT_MISTAKES, reveal=reveal,
        recipe="inv = torch.empty_like(perm); inv[perm] = torch.arange(len(perm)) (or torch.argsort(perm)).",
        hint="a permutation that is its own inverse (a swap, a reversal) hides the mistake; the checker uses "
             "long cycles. What must inv[perm[k]] be? " + _HINTS,
    )


def _reference_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    out, new_size = _merging.tome_merge(x[None], size[None], metric[None], r)
    return out[0], new_size[0]


def _merge_with(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, *, cosine: bool = True,
                weighted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One merge step with the usual slips switched on: a dot product, or sizes ignored in the mean."""
    unit = metric / metric.norm(dim=-1, keepdim=True) if cosine else metric
    best, partner = (unit[0::2] @ unit[1::2].T).max(dim=-1)
    order = best.argsort(descending=True)[:r]
    src, dst = 2 * order, 2 * partner[order] + 1
    weight = size if weighted else torch.ones_like(size)
    total = (x * weight[:, None]).index_add(0, dst, (x * weight[:, None])[src])
    count, new_size = weight.index_add(0, dst, weight[src]), size.index_add(0, dst, size[src])
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[src] = False
    return total[keep] / count[keep][:, None], new_size[keep]


_MERGE_MISTAKES = known_mistakes({
    "your merged tokens are plain means: each member must count as many times as its size":
        lambda x, size, metric, r: _merge_with(x, size, metric, r, weighted=False),
    "your matches rank by the dot product, not cosine similarity: normalise the metric first":
        lambda x, size, metric, r: _merge_with(x, size, metric, r, cosine=False),
}, output=0)


def check_merge_step(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
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
        diagnose=_MERGE_MISTAKES, reveal=reveal,
        recipe="unit = metric / metric.norm(dim=-1, keepdim=True); best, partner = (unit[0::2] @ unit[1::2].T).max(-1); "
               "order = best.argsort(descending=True)[:r]; src = 2·order, dst = 2·partner[order] + 1; "
               "total = (size·x).index_add(0, dst, (size·x)[src]), new_size = size.index_add(0, dst, size[src]); "
               "drop src; return total / new_size, new_size.",
        hint="A is the even positions, B the odd ones; similarity is cosine (normalise first); a merged token is "
             "weighted by its members' sizes; survivors keep their order. " + _HINTS,
    )


def _reference_keep(attn: torch.Tensor, image_start: int, image_end: int, keep: int) -> torch.Tensor:
    return _vit.fastv_keep(attn[None], image_start, image_end, keep)[0]


def _keep_from(scores: torch.Tensor, image_start: int, image_end: int, keep: int) -> torch.Tensor:
    return scores[image_start:image_end].topk(keep).indices.sort().values + image_start


_KEEP_MISTAKES = known_mistakes({
    "your scores are the attention each token gives (rows), not what it receives (columns)":
        lambda attn, s, e, keep: _keep_from(attn.mean(0).mean(-1), s, e, keep),
    "your scores come from the last query only: average what every query gives each image token":
        lambda attn, s, e, keep: _keep_from(attn.mean(0)[-1], s, e, keep),
    "your kept set is right but ordered by score: return positions in increasing order":
        lambda attn, s, e, keep: attn.mean(0).mean(0)[s:e].topk(keep).indices + s,
    "your positions count from the first image token: add image_start to get sequence positions":
        lambda attn, s, e, keep: _keep_from(attn.mean(0).mean(0), s, e, keep) - s,
})


def check_fastv_keep_set(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
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
        fn, _reference_keep, cases, exercise="fastv_keep_set", diagnose=_KEEP_MISTAKES, reveal=reveal,
        recipe="received = attn.mean(0).mean(0)[image_start:image_end]; "
               "received.topk(keep).indices.sort().values + image_start.",
        hint="a token's score is the attention it receives (a column of the map), averaged over heads and "
             "over every query; return positions in the sequence, in increasing order. " + _HINTS,
    )


# --------------------------------------------------------------------------- Mixture-of-Depths: routing tokens


class _MixingUpdate:
    """A stand-in residual update ``(k, D) -> (k, D)`` that mixes the tokens it is given, in their order.

    ``tanh(t W)`` plus the running mean of ``t``: so an answer that runs the update on every token (and picks
    rows afterwards), or hands the chosen tokens over in rank order, gets different numbers.
    """

    def __init__(self, dim: int, seed: int, dtype: torch.dtype = torch.float64) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.weight = (torch.randn(dim, dim, generator=gen, dtype=torch.float64) / dim ** 0.5).to(dtype)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[-1] != self.weight.shape[0]:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"update takes the chosen tokens as one (k, D) tensor with D = {self.weight.shape[0]}, "
                             f"got {shape}")
        steps = torch.arange(1, len(tokens) + 1, dtype=tokens.dtype)[:, None]
        return torch.tanh(tokens @ self.weight.to(tokens.dtype)) + tokens.cumsum(0) / steps

    def __repr__(self) -> str:
        return f"update((k, {self.weight.shape[0]})) -> (k, {self.weight.shape[0]})"


def _reference_route(x: torch.Tensor, scores: torch.Tensor, capacity: float,
                     update: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    from labsupport.multimodal import routing as _routing

    out, chosen = _routing.mod_route(x[None], scores[None], capacity, lambda t: update(t[0])[None])
    return out[0], chosen[0]


def _route_with(x: torch.Tensor, scores: torch.Tensor, capacity: float, update: Callable[..., torch.Tensor], *,
                gate: str = "update", skipped: str = "kept", count: str = "round", order: str = "position",
                run_on: str = "chosen") -> tuple[torch.Tensor, torch.Tensor]:
    """Mixture-of-Depths routing of one image with the usual slips switched on (the defaults are right)."""
    n = len(x)
    k = max(1, round(capacity * n) if count == "round" else int(capacity * n))
    chosen = scores.topk(k).indices
    if order == "position":
        chosen = chosen.sort().values
    picked = x[chosen]
    change = update(picked) if run_on == "chosen" else update(x)[chosen]
    weight = torch.sigmoid(scores[chosen])[:, None]
    new = {"update": picked + weight * change, "none": picked + change, "whole": weight * (picked + change)}[gate]
    out = (x.clone() if skipped == "kept" else torch.zeros_like(x)).index_copy(0, chosen, new)
    return out, chosen


_ROUTE_MISTAKES = known_mistakes({
    "your chosen tokens get x + update with no router weight: the top-k choice alone has no gradient, so the "
    "router would never learn": lambda x, s, c, u: _route_with(x, s, c, u, gate="none"),
    "your router weight multiplies x + update: only the update is weighted, the residual x passes as it is":
        lambda x, s, c, u: _route_with(x, s, c, u, gate="whole"),
    "your skipped tokens come out as zeros: they skip the block through the residual stream, unchanged":
        lambda x, s, c, u: _route_with(x, s, c, u, skipped="zero"),
    "your kept count is rounded down: k = round(capacity · N), at least 1":
        lambda x, s, c, u: _route_with(x, s, c, u, count="floor"),
    "your chosen tokens are in score order: keep them in their original order (sort the indices)":
        lambda x, s, c, u: _route_with(x, s, c, u, order="rank"),
    "your update ran on all N tokens and you kept the chosen rows: the chosen tokens must see only each other, "
    "and the skipped ones must cost nothing": lambda x, s, c, u: _route_with(x, s, c, u, run_on="all"),
})


def check_route_tokens(fn: Callable[..., Any], reveal: bool = False) -> CheckResult:
    """Check ``fn(x (N, D), scores (N,), capacity, update) -> (out (N, D), chosen (k,) int64 ascending)``.

    Mixture-of-Depths for one image: the top ``k = max(1, round(capacity·N))`` tokens by score go through
    ``update`` together; ``out_i = x_i + sigmoid(score_i)·update_i`` for them, ``x_i`` for the rest. Gradients
    with respect to ``x`` and ``scores`` are compared too (the router must receive one).
    """
    gen = torch.Generator().manual_seed(906)

    def case(name: str, n: int, d: int, capacity: float, seed: int, dtype: torch.dtype = torch.float64) -> Case:
        x = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
        scores = (2 * torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype)
        return Case(name, (x, scores, capacity, _MixingUpdate(d, seed, dtype)), grad_argnums=(0, 1),
                    notes={"update": "mixes the tokens it is given, in their order"})

    cases = [
        case("N=8, D=3, capacity 0.5", 8, 3, 0.5, 1),
        case("N=12, D=4, capacity 0.3 (3.6 tokens: round to 4)", 12, 4, 0.3, 2),
        case("N=6, D=2, capacity 1 (every token)", 6, 2, 1.0, 3),
        case("N=5, D=3, capacity 0.01 (at least one token)", 5, 3, 0.01, 4),
        case("float32, N=16, D=4, capacity 0.25", 16, 4, 0.25, 5, torch.float32),
    ]
    return check_function(
        fn, _reference_route, cases, exercise="route_tokens", atol=1e-6, rtol=1e-5, output_names=("out", "chosen"),
        diagnose=_ROUTE_MISTAKES, reveal=reveal,
        hint="only the chosen tokens go through update, together and in their original order; the router's "
             "weight must sit on the update's path (it is what trains the router); the rest pass unchanged. "
             + _HINTS,
        recipe="k = max(1, round(capacity · N)); chosen = scores.topk(k).indices.sort().values; picked = x[chosen]; "
               "new = picked + torch.sigmoid(scores[chosen])[:, None] · update(picked); "
               "out = x.index_copy(0, chosen, new); return (out, chosen).",
    )
