"""Chapter 01, exercise 4: the online-softmax tile loop, written by the learner as a Triton kernel.

The learner completes a ``@triton.jit`` kernel whose skeleton the chapter gives
(program ids, the query block's load, the final stores); the part left to write
is the loop over key blocks with the online-softmax update. The kernel's
contract (non-causal attention, tensors contiguous ``(B·H, N, D)``)::

    kernel[grid](q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, n_q, n_k, scale,
                 BLOCK_M=..., BLOCK_N=..., D=...)

one program per ``BLOCK_M`` query rows of one (batch·head), writing ``o``
(float32, the attention output) and ``lse`` (float32, the row logsumexp).

* :func:`launch_attention_kernel` — launch such a kernel on ``(B, H, L, D)`` tensors, return ``(out, lse)``.
* :func:`check_triton_attention_kernel` — the checker. It runs the kernel in
  Triton's interpreter on the CPU (a compiled kernel too: an interpreted copy of
  its source) and watches every ``tl.load``, rejecting a kernel that loads more
  than one tile of keys at once: dense attention, which reads all keys in one
  go, gives the right numbers but is exactly what the exercise is about
  avoiding. A compiled kernel is then also run on the GPU, with fp32
  ``tl.dot`` in IEEE precision (not TF32), and its numbers are compared.

Like :mod:`labsupport.flash.triton`, this module never imports Triton at import
time, so ``TRITON_INTERPRET`` can still be set first.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from typing import Any

import torch

from labsupport.harness.checking import Case, CheckResult, check_function
from labsupport.harness.numerics import seeded_randn
from labsupport.harness.validation import require_int, require_qkv

__all__ = ["TileRuleError", "check_triton_attention_kernel", "launch_attention_kernel", "triton_or_stand_in"]

EXERCISE = "attention_tile_kernel"

# Seconds one case may take when the kernel is compiled for the GPU. Its first launch with a case's shapes and
# block sizes compiles it, and the first in a process also builds Triton's launcher and the CUDA context: seconds
# that are not the learner's, beyond the harness's default. (An interpreted kernel keeps the default: the
# interpreter's run is the whole case.)
COMPILED_TIME_BUDGET_S = 120.0


class TileRuleError(RuntimeError):
    """A kernel broke the tiling rule: it loaded more than one tile of keys (or queries) at once."""


class _StandIn:
    """Where Triton is missing (macOS, Windows): ``@triton.jit`` leaves the function as it is and any
    ``tl.<name>`` is a placeholder, so that a cell defining a kernel still runs; the checker then says why
    the exercise cannot run here."""

    def jit(self, fn: Any = None, **_: Any) -> Any:
        return fn if fn is not None else (lambda f: f)

    def __getattr__(self, name: str) -> Any:
        return _StandIn()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Triton is not installed here, so Triton code cannot run on this machine")


def triton_or_stand_in() -> tuple[Any, Any]:
    """``(triton, triton.language)``, or two stand-ins when Triton cannot be imported (see :class:`_StandIn`).

    Set ``TRITON_INTERPRET=1`` before calling this on a machine without a GPU.
    """
    try:
        import triton
        import triton.language as tl
    except Exception:
        return _StandIn(), _StandIn()
    return triton, tl


def _is_triton_kernel(kernel: object) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return isinstance(kernel, (JITFunction, InterpretedFunction))


def _is_interpreted(kernel: object) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


@contextlib.contextmanager
def _largest_load_recorder() -> Iterator[list[int]]:
    """Record the number of elements of every ``tl.load`` the interpreter executes (empty list if unsupported)."""
    sizes: list[int] = []
    try:
        from triton.runtime.interpreter import InterpreterBuilder

        original = InterpreterBuilder.create_masked_load
    except Exception:  # another Triton version: no load audit, the loop check in the source still runs
        yield sizes
        return

    def recording_load(self: Any, ptrs: Any, *args: Any, **kwargs: Any) -> Any:
        sizes.append(int(ptrs.data.size))
        return original(self, ptrs, *args, **kwargs)

    InterpreterBuilder.create_masked_load = recording_load  # type: ignore[method-assign]
    try:
        yield sizes
    finally:
        InterpreterBuilder.create_masked_load = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _jit_calls_interpreted() -> Iterator[None]:
    """While an interpreted copy of a compiled kernel runs, run the ``@triton.jit`` functions it calls interpreted too.

    Where Triton was imported without ``TRITON_INTERPRET`` (the GPU path), every
    ``@triton.jit`` function is a compiled ``JITFunction``: the learner's helpers,
    and Triton's own ``tl.zeros``, ``tl.max`` and ``tl.sum``, which are written in
    Triton. A ``JITFunction`` may only be called from inside a kernel being
    compiled, so the interpreted copy's first ``tl.zeros`` raised "Cannot call
    @triton.jit'd outside of the scope of a kernel". Here such a call runs the
    callee's source through the interpreter instead, as Triton's own
    ``InterpretedFunction`` does for a device call, but with the language
    patches it needs undone as soon as the callee returns (the interpreter's own
    device call leaves them in place, and a kernel compiled later in the same
    process would be built from the patched language).

    It also mends the interpreter's ``int()`` of a scalar (``range(0, n_k, ...)``
    over a kernel argument): Triton 3.6 converts the one-element array that holds
    it with ``int(array)``, which NumPy 2.4 refuses for an array of one
    dimension; later Tritons squeeze it first, as this does.
    """
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    original = JITFunction.__dict__.get("__call__")  # None: inherited, so deleting ours brings it back
    original_patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor(tensor: Any, *rest: Any) -> Any:
        result = original_patch_tensor(tensor, *rest)
        if rest and hasattr(rest[0], "set_attr"):  # the scope that undoes the interpreter's patches
            rest[0].set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))
        return result

    def interpreted_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        rewritten = interpreter.InterpretedFunction.rewritten_fn.get(self.fn)
        if rewritten is None:
            rewritten = interpreter.InterpretedFunction(self.fn).rewrite()
        scope = interpreter._patch_lang(self.fn)
        try:
            return rewritten(*args, **kwargs)
        finally:
            if scope is not None:
                scope.restore()

    JITFunction.__call__ = interpreted_call  # type: ignore[method-assign]
    interpreter._patch_lang_tensor = patch_tensor
    try:
        yield
    finally:
        if original is None:
            del JITFunction.__call__
        else:
            JITFunction.__call__ = original  # type: ignore[method-assign]
        interpreter._patch_lang_tensor = original_patch_tensor


def _interpreted_copy(kernel: Any) -> Any:
    """The kernel itself under ``TRITON_INTERPRET=1``; for a compiled kernel, an interpreted copy of its source.

    The interpreter runs on CPU tensors whatever ``TRITON_INTERPRET`` says, so a
    kernel compiled for the GPU can have its loads audited exactly like one
    interpreted from the start.
    """
    if _is_interpreted(kernel):
        return kernel
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(kernel.fn)


def _ieee_launch_options() -> dict[str, str]:
    """The launch option that marks a compiled launch as one with IEEE fp32 dots; ``{}`` where unsupported.

    By default a compiled ``tl.dot`` of fp32 tiles runs on the tensor cores in
    TF32 (a 10-bit mantissa), whose error (about 1e-2 on the checker's cases)
    is the hardware's, not the learner's. The option alone does not change
    that: ``tl.dot`` settles its precision itself before the backend's
    ``default_dot_input_precision`` is ever read (see :func:`_fp32_dots_in_ieee`,
    which does). It still goes with the launch so that Triton caches the IEEE
    build apart from a TF32 one the learner's own launch may have made: its
    in-memory cache key holds the launch options, not the precision setting.
    A Triton without the option gets none (and its fp32 cases the looser
    tolerance of :func:`_tolerances`).
    """
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except Exception:  # pragma: no cover - no CUDA backend in this Triton
        return {}
    fields = getattr(CUDAOptions, "__dataclass_fields__", {})
    return {"default_dot_input_precision": "ieee"} if "default_dot_input_precision" in fields else {}


@contextlib.contextmanager
def _fp32_dots_in_ieee() -> Iterator[None]:
    """While a kernel is compiled, make each fp32 ``tl.dot`` that names no precision an IEEE fp32 one.

    ``tl.dot`` picks its precision when the kernel is compiled: the
    ``input_precision`` it is given, else Triton's fp32 default
    (``triton.knobs.language.fp32_default``, the ``TRITON_F32_DEFAULT``
    environment variable), else TF32 where the hardware has it. Here the
    default is set to ``"ieee"`` (the knob and its environment variable, which
    is also part of Triton's on-disk cache key) and put back afterwards.
    """
    import os

    import triton

    language = getattr(getattr(triton, "knobs", None), "language", None)
    if language is not None and hasattr(language, "fp32_default") and hasattr(language, "scope"):
        with language.scope():
            language.fp32_default = "ieee"
            yield
        return
    saved = os.environ.get("TRITON_F32_DEFAULT")  # a Triton before knobs reads the variable itself
    os.environ["TRITON_F32_DEFAULT"] = "ieee"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_F32_DEFAULT", None)
        else:
            os.environ["TRITON_F32_DEFAULT"] = saved


def _cause_chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _launch(kernel: Any, grid: tuple[int, ...], *args: Any, **constexprs: Any) -> None:
    """``kernel[grid](*args, **constexprs)``; a compiled kernel built with IEEE fp32 dots where Triton can.

    A compiled kernel gets the launch option of :func:`_ieee_launch_options`
    and is launched (so compiled, on its first launch with these arguments)
    inside :func:`_fp32_dots_in_ieee`.
    """
    options = {} if _is_interpreted(kernel) else _ieee_launch_options()
    with _fp32_dots_in_ieee() if options else contextlib.nullcontext():
        kernel[grid](*args, **constexprs, **options)


def launch_attention_kernel(kernel: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                            block_m: int = 16, block_n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a learner's tile kernel on ``q (B, H, Lq, D)``, ``k, v (B, H, Lk, D)``; return float32 ``(out, lse)``.

    The grid is ``(B·H, ceil(Lq / block_m))``; ``scale = 1/sqrt(D)``. ``D``,
    ``block_m`` and ``block_n`` must be powers of two of at least 16 (``tl.dot``
    needs that). Under the interpreter, tensors stay on the CPU; a compiled
    kernel gets them on the GPU. A ``NotImplementedError`` raised inside the
    kernel comes out as ``NotImplementedError``.
    """
    import triton

    q, k, v = require_qkv(q, k, v)
    batch, heads, n_q, dim = q.shape
    n_k = k.shape[-2]
    for name, value in (("head dim D", dim), ("block_m", block_m), ("block_n", block_n)):
        value = require_int(name, value, minimum=16)
        if value & (value - 1):
            raise ValueError(f"{name} must be a power of two of at least 16 (tl.dot needs it), got {value}")
    if not _is_triton_kernel(kernel):
        raise TypeError(f"kernel must be a @triton.jit function, got {type(kernel).__name__}")
    device = q.device if _is_interpreted(kernel) else torch.device("cuda")
    if not _is_interpreted(kernel) and not torch.cuda.is_available():
        raise RuntimeError("this kernel was compiled for a GPU and there is none: set TRITON_INTERPRET=1 "
                           "before triton is first imported (the chapter's set-up cell does it)")
    q3, k3, v3 = (t.reshape(batch * heads, t.shape[-2], dim).contiguous().to(device) for t in (q, k, v))
    out = torch.full((batch * heads, n_q, dim), float("nan"), dtype=torch.float32, device=device)
    lse = torch.full((batch * heads, n_q), float("nan"), dtype=torch.float32, device=device)
    grid = (batch * heads, triton.cdiv(n_q, block_m))
    try:
        _launch(kernel, grid, q3, k3, v3, out, lse, n_q, n_k, 1.0 / math.sqrt(dim), BLOCK_M=block_m,
                BLOCK_N=block_n, D=dim)
    except Exception as error:
        if any(isinstance(e, NotImplementedError) or "NotImplementedError" in str(e) for e in _cause_chain(error)):
            raise NotImplementedError("your code here") from None
        raise
    return out.view(batch, heads, n_q, dim).cpu(), lse.view(batch, heads, n_q).cpu()


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_m: int = 16,
               block_n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention and the row logsumexp, in float64, returned in float32 (what the kernel writes)."""
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    out = scores.softmax(dim=-1) @ v.double()
    return out.float(), torch.logsumexp(scores, dim=-1).float()


def _cases() -> list[Case]:
    gen = torch.Generator().manual_seed(404)
    specs = [
        # name, (B, H, Lq, Lk), D, dtype, query scale, block_m, block_n
        ("one block of queries, one of keys (Lq = Lk = 16)", (1, 1, 16, 16), 16, torch.float32, 1.0, 16, 16),
        ("Lk = 40: three key blocks, the last one 8 keys short; Lq = 24", (1, 2, 24, 40), 16, torch.float32, 1.0,
         16, 16),
        ("scores in the hundreds (exp overflows without the running max)", (1, 1, 16, 48), 16, torch.float32, 40.0,
         16, 16),
        ("fewer keys than one block (Lk = 5)", (2, 1, 20, 5), 16, torch.float32, 1.0, 16, 16),
        ("float16 inputs, D = 32, Lk = 70 with 32-key blocks", (1, 2, 17, 70), 32, torch.float16, 1.0, 16, 32),
    ]
    cases = []
    for name, (b, h, lq, lk), d, dtype, q_scale, bm, bn in specs:
        q = (seeded_randn(gen, b, h, lq, d) * q_scale).to(dtype)
        k = seeded_randn(gen, b, h, lk, d).to(dtype)
        v = seeded_randn(gen, b, h, lk, d).to(dtype)
        cases.append(Case(name, (q, k, v), {"block_m": bm, "block_n": bn}))
    return cases


def _source_has_a_loop(kernel: Any) -> bool:
    try:
        source = inspect.getsource(kernel.fn)
    except (OSError, TypeError, AttributeError):
        return True  # cannot tell (e.g. defined in a console): give the benefit of the doubt
    return "for " in source and ("range(" in source or "tl.range(" in source or "tl.static_range(" in source)


def _audit_tiles(kernel: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_m: int,
                 block_n: int) -> tuple[tuple[torch.Tensor, torch.Tensor], bool]:
    """Run ``kernel`` interpreted on the CPU, watching its loads; raise :class:`TileRuleError` on a load too big.

    Returns the interpreted run's ``(out, lse)`` and whether the loads could be
    watched (``False`` on a Triton version whose interpreter this cannot hook).
    """
    callees = contextlib.nullcontext() if _is_interpreted(kernel) else _jit_calls_interpreted()
    with _largest_load_recorder() as sizes, callees:
        result = launch_attention_kernel(_interpreted_copy(kernel), q.cpu(), k.cpu(), v.cpu(), block_m=block_m,
                                         block_n=block_n)
    limit = max(block_m, block_n) * q.shape[-1]
    if sizes and max(sizes) > limit:
        raise TileRuleError(
            f"one tl.load of your kernel read {max(sizes)} numbers, but a tile holds at most "
            f"{max(block_m, block_n)} rows × D={q.shape[-1]} = {limit} (BLOCK_M={block_m}, BLOCK_N={block_n}, "
            f"Lk={k.shape[-2]}). Loading every key at once is dense attention; walk the keys in blocks of "
            "BLOCK_N so only one tile of K and V is on chip at a time"
        )
    return result, bool(sizes)


def _tolerances(compiled: bool) -> tuple[float, float]:
    """``(atol, rtol)``: fp32-exact runs (interpreted, or compiled with IEEE dots) get 2e-3; TF32 dots get 3e-2."""
    if compiled and not _ieee_launch_options():
        return 3e-2, 1e-2  # TF32: the correct kernel lands near 1e-2 on the large-score case
    return 2e-3, 1e-3


def check_triton_attention_kernel(kernel: Any) -> CheckResult:
    """Check a learner's ``@triton.jit`` tile kernel (see the module docstring) against dense attention.

    Each case launches the kernel with its own block sizes and compares ``out``
    and ``lse`` with a float64 reference. Every case first runs the kernel in
    Triton's interpreter on the CPU (for a kernel compiled for the GPU, an
    interpreted copy of its source), watching every ``tl.load``: a load of
    more than ``max(BLOCK_M, BLOCK_N) × D`` numbers means the kernel read more
    than one tile at once (dense attention reads all the keys) and fails the
    check with that explanation. A compiled kernel is then run on the GPU too
    (fp32 ``tl.dot`` in IEEE precision) and its own output is the one graded.
    """
    try:
        import triton  # noqa: F401
    except Exception:
        message = (f"⏳ {EXERCISE}: Triton is not installed here (it needs Linux or Colab), so this exercise "
                   "cannot run on this machine; the rest of the chapter does not need it.")
        print(message)
        return CheckResult(EXERCISE, "not done", message, 0, 0)

    compiled = _is_triton_kernel(kernel) and not _is_interpreted(kernel)

    def learner(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_m: int = 16,
                block_n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        if kernel is None or not _is_triton_kernel(kernel):
            raise TypeError(f"expected your @triton.jit kernel, got {type(kernel).__name__}; pass the kernel "
                            "itself (decorated with @triton.jit), without calling it")
        result, watched = _audit_tiles(kernel, q, k, v, block_m=block_m, block_n=block_n)
        if not compiled:
            return result
        if not watched and not _source_has_a_loop(kernel):  # a Triton whose interpreter cannot be watched
            raise TileRuleError("your kernel has no loop over key blocks: walk the keys BLOCK_N at a time")
        return launch_attention_kernel(kernel, q, k, v, block_m=block_m, block_n=block_n)

    learner.__name__ = getattr(kernel, "__name__", EXERCISE)
    atol, rtol = _tolerances(compiled)
    budget = {"time_budget_s": COMPILED_TIME_BUDGET_S} if compiled else {}
    return check_function(
        learner,
        _reference,
        _cases(),
        exercise=EXERCISE,
        atol=atol,
        rtol=rtol,
        **budget,
        hint="the idea first: keep m, l and acc for your rows, and for each block of keys rescale what you "
        "have by how much the running maximum moved before adding the block (tiered hints are in the "
        "chapter, above the kernel).",
        output_names=("out", "lse"),
    )
