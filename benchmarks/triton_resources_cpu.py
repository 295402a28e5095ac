"""Registers and spill space of the course's Triton kernels on an H100, read without a GPU.

Triton compiles a kernel ahead of time for any target it knows, on any machine: this script compiles chapter 03's
preparation kernels for ``sm_90`` (an H100) with the ptxas bundled in Triton's wheel, then reads the cubin's
resource table with the bundled ``cuobjdump``. ``STACK`` is the per-thread local memory, which for these
kernels is spilled registers: a kernel at 255 registers with a non-zero stack holds more than fits.

Run from the repository root (no GPU needed, about a minute)::

    python3 benchmarks/triton_resources_cpu.py [--warps 4 8] [--out DIR]

It prints a Markdown table and writes ``DIR/triton_resources.json``. The numbers are the compiler's on this
machine's Triton version; the GPU benchmark scripts record what the GPU's own Triton reports at launch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its current default


def compile_for_sm90(kernel, signature: dict[str, str], constants: dict[str, object], num_warps: int):
    """``kernel`` compiled for an H100 (sm_90) with ``num_warps`` warps and one pipeline stage."""
    import triton
    from triton.backends.compiler import GPUTarget

    full = {name: signature.get(name, "constexpr") for name in kernel.arg_names}
    missing = [name for name in kernel.arg_names if name not in signature and name not in constants]
    if missing:
        raise ValueError(f"no type or constant given for the arguments {missing} of {kernel.fn.__name__}")
    source = triton.compiler.ASTSource(fn=kernel, signature=full,
                                       constexprs={k: v for k, v in constants.items() if k in kernel.arg_names})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps,
                                                                           "num_stages": 1})


def resources(compiled) -> dict[str, int]:
    """Registers per thread and stack (local memory) bytes per thread of a compiled kernel, from its cubin."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        table = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
    found = {key: re.search(rf"{key}:(\d+)", table) for key in ("REG", "STACK")}
    if not all(found.values()):
        raise RuntimeError(f"cuobjdump printed no REG/STACK entry:\n{table}")
    return {"registers": int(found["REG"].group(1)), "stack_bytes": int(found["STACK"].group(1))}


def delta_prep_rows(warps: list[int]) -> list[dict]:
    """Chapter 03's preparation kernels at D = 128, chunks of 64, bf16 inputs, float32 intermediates."""
    from labsupport.linear_attention import triton_delta as td

    pointers = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "BETA": "*bf16", "LD": "*bf16", "W": "*fp32",
                "U": "*fp32", "SC": "*fp32", "G": "*fp32", "length": "i32", "n_chunks": "i32"}
    kernels = [("whole rows", td._delta_prep_blocked_kernel, {}),
               ("pieces of 16 columns", td._delta_prep_pieces_kernel, {"BD": 16, "F32": False}),
               ("pieces of 32 columns", td._delta_prep_pieces_kernel, {"BD": 32, "F32": False})]
    rows = []
    for name, kernel, extra in kernels:
        for num_warps in warps:
            for scores in (True, False):
                for gated in (False, True):
                    constants = {"DK": 128, "DV": 128, "BK": 128, "BDV": 128, "C": 64, "S": 16, "LOG_S": 4,
                                 "HAS_DECAY": gated, "STORE_SCORES": scores, "PREC": "tf32", "PREC_INV": "tf32",
                                 **extra}
                    used = resources(compile_for_sm90(kernel, pointers, constants, num_warps))
                    rows.append({"kernel": name, "warps": num_warps, "scores": scores, "gated": gated, **used})
                    print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON file")
    args = parser.parse_args()
    try:
        import triton
    except ImportError:
        print("Triton is not installed: nothing to compile")
        return
    rows = delta_prep_rows(args.warps)
    print(f"\nTriton {triton.__version__}, target sm_90; D = 128, chunks of 64, bf16 inputs, float32 intermediates\n")
    print("| preparation kernel | warps | scores | gated | registers | stack bytes |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['warps']} | {'yes' if r['scores'] else 'no'} | {'yes' if r['gated'] else 'no'} | "
              f"{r['registers']} | {r['stack_bytes']:,} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "triton_resources.json"), "w") as fh:
        json.dump({"triton": triton.__version__, "target": "sm_90", "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
