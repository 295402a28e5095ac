"""Registers, spills and shared memory of the fused MoE dispatch's Triton kernels on an H100, without a GPU.

Compiles each kernel of ``labsupport.moe.triton_dispatch`` ahead of time for sm_90 (``triton.compile`` on an
``ASTSource`` with a ``GPUTarget``; Triton's bundled ptxas), for every configuration of its autotune list, and
reads the resource usage of the cubin with Triton's bundled ``cuobjdump``. A ``STACK`` above 0 means registers
spilled to local memory; the script then counts the spill instructions in the SASS and those inside the main
loop (spills only in the epilogue cost once per tile). The arguments are specialised as a GPU launch would
specialise them: bf16 tensors, 16-byte aligned pointers and sizes divisible by 16, the contiguous weight's
unit stride a constant.

    python3 benchmarks/moe_triton_resources.py [--kernels up down dpre dx dW_down dW_up] [--configs 0 1 ...]

Prints one line per (kernel, configuration). The numbers come from the local Triton's compiler (which may be
newer than a GPU machine's), so they guide the choice of configurations; they are not the device's.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # runs from a plain checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from triton_resources_cpu import compile_for_sm90, resources, spill_placement  # noqa: E402

# kind: (A_GATHER, OUT_SCATTER, EPILOGUE, HAS_BIAS, HAS_SCALE, the weight's unit stride)
ROWS = {"up": (True, False, 1, True, False, "stride_bn"), "down": (False, True, 0, True, False, "stride_bn"),
        "dpre": (True, False, 2, False, True, "stride_bk"), "dx": (False, True, 0, False, False, "stride_bk")}
# kind: (A_GATHER, B_GATHER, HAS_SCALE)
WGRAD = {"dW_down": (False, True, True), "dW_up": (True, False, False)}
ALIGNED = ("n_cols", "k_dim", "stride_am", "stride_be", "stride_bk", "stride_bn", "stride_om", "n_rows_w",
           "n_cols_w", "stride_bm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", default=[*ROWS, *WGRAD], choices=[*ROWS, *WGRAD])
    parser.add_argument("--configs", nargs="+", type=int, default=None, help="indices into the autotune lists")
    args = parser.parse_args()
    try:
        from labsupport.moe import triton_dispatch as td
    except Exception as error:  # noqa: BLE001
        print(f"cannot import the dispatch: {type(error).__name__}: {error}")
        return
    if not td.triton_available():
        print("triton is not installed: nothing compiled")
        return
    pointers_rows = {n: "bf16" for n in ("A", "B", "BIAS", "OUT", "OUT2", "PRE", "SCALE")}
    pointers_rows.update({n: "i32" for n in ("ORDER", "TILE_EXPERT", "TILE_START", "TILE_END")})
    pointers_w = {n: "bf16" for n in ("A", "B", "OUT", "BIAS_OUT", "SCALE")}
    pointers_w.update({"ORDER": "i32", "BOUNDS": "i32"})
    for kind in args.kernels:
        if kind in ROWS:
            a_gather, scatter, epilogue, bias, scale, unit = ROWS[kind]
            configs = td._ROWS_CONFIGS
        else:
            configs = td._WGRAD_CONFIGS
        for index, config in enumerate(configs):
            if args.configs is not None and index not in args.configs:
                continue
            if kind in ROWS:
                constants = dict(A_GATHER=a_gather, OUT_SCATTER=scatter, HAS_BIAS=bias, HAS_SCALE=scale,
                                 EPILOGUE=epilogue, EVEN_K=True, PREC="tf32", BLOCK_M=td.GPU_BLOCK_M,
                                 **config.kwargs)
                constants[unit] = 1  # a launch specialises an integer argument equal to 1
                fn, pointers = td._rows_kernel, pointers_rows
                pruned = config not in td._prune_rows(configs, {}, EPILOGUE=epilogue)
            else:
                a_gather, b_gather, scale = WGRAD[kind]
                constants = dict(A_GATHER=a_gather, B_GATHER=b_gather, HAS_SCALE=scale, PREC="tf32", **config.kwargs)
                fn, pointers, pruned = td._weight_grad_kernel, pointers_w, False
            label = (f"{kind:8s} config {index}: {config.kwargs} warps {config.num_warps} stages {config.num_stages}"
                     f"{' (pruned)' if pruned else ''}")
            try:
                kernel = compile_for_sm90(fn, pointers, constants, config.num_warps, config.num_stages, ALIGNED)
                usage = resources(kernel)
                shared = getattr(kernel.metadata, "shared", None)
                placement = spill_placement(kernel) if isinstance(usage, dict) and usage["stack"] else None
                where = f", spills {placement}" if placement else ""
                print(f"{label}: {usage}, dynamic shared {shared} bytes{where}", flush=True)
            except Exception as error:  # noqa: BLE001
                print(f"{label}: did not compile: {type(error).__name__}: {str(error)[:300]}", flush=True)


if __name__ == "__main__":
    main()
