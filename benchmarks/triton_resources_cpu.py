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


def compile_for_sm90(fn, pointers: dict[str, str], constants: dict[str, object], num_warps: int,
                     num_stages: int = 1, aligned: tuple[str, ...] = ()):
    """``fn`` compiled for sm_90: ``pointers`` maps pointer arguments to element types (``"bf16"``), other
    non-constant arguments are ``i32``; pointers and the ``aligned`` integers are marked divisible by 16, as a
    GPU launch specialises them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature = {}
    for name in names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = f"*{pointers[name]}"
        else:
            signature[name] = "i32"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if signature[n].startswith("*") or n in aligned and n not in constants}
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constants.items()},
                       attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def resources(kernel) -> dict[str, int] | str:
    """``REG``, ``STACK``, ``SHARED``, ``LOCAL`` of a compiled kernel's cubin (cuobjdump), or its error text."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return f"no cuobjdump at {tool}"
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(kernel.asm["cubin"])
        done = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True)
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", done.stdout + done.stderr)
    if not found:
        return (done.stdout + done.stderr)[-300:]
    return dict(zip(("registers", "stack", "static_shared", "local"), map(int, found.groups())))


def spill_placement(kernel) -> dict[str, int] | None:
    """Local-memory (spill) instructions in the SASS: all of them, and those inside the main loop.

    The main loop is the backward branch's range that holds the first ``HGMMA`` (Hopper's warpgroup matrix
    product). Spills only outside it (in the epilogue) cost once per tile, not once per ``BLOCK_K`` step.
    ``None`` when the SASS could not be read.
    """
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(kernel.asm["cubin"])
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout
    lines = [line for line in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/", line)]
    address = [int(re.search(r"/\*([0-9a-f]{4,})\*/", line).group(1), 16) for line in lines]
    products = [i for i, line in enumerate(lines) if "HGMMA" in line]
    spills = [i for i, line in enumerate(lines) if re.search(r"\b(STL|LDL)\b", line)]
    if not products:
        return None
    loop = None
    for i, line in enumerate(lines):
        target = re.search(r"0x([0-9a-f]+)", line.split("BRA", 1)[1]) if "BRA" in line else None
        if target and int(target.group(1), 16) in address:
            j = address.index(int(target.group(1), 16))
            if j <= products[0] <= i:
                loop = (j, i)
                break
    if loop is None:
        return None
    return {"spill_instructions": len(spills), "in_main_loop": sum(loop[0] <= i <= loop[1] for i in spills)}


def delta_prep_rows(warps: list[int]) -> list[dict]:
    """Chapter 03's preparation kernels at D = 128, chunks of 64, bf16 inputs, float32 intermediates."""
    from labsupport.linear_attention import triton_delta as td

    pointers = {"Q": "bf16", "K": "bf16", "V": "bf16", "BETA": "bf16", "LD": "bf16", "W": "fp32", "U": "fp32",
                "SC": "fp32", "G": "fp32"}
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
                    if isinstance(used, str):
                        raise RuntimeError(f"no resource table for {name}: {used}")
                    rows.append({"kernel": name, "warps": num_warps, "scores": scores, "gated": gated, **used})
                    print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4, 8])
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
              f"{r['registers']} | {r['stack']:,} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "triton_resources.json"), "w") as fh:
        json.dump({"triton": triton.__version__, "target": "sm_90", "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
