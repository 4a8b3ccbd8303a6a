"""Registers, spills and shared memory of the decode step's Triton kernels, compiled for a GPU without one.

Usage (repo root): python -m benchmarks.decode_registers [--arch 90] [--batches 1 64] [--models llama3-8b ...] [--out DIR]
Compiles every launch of `fused_recurrent.launches` (the constexprs the step itself uses) for the
--arch target with Triton's own ptxas, per model shape, window kind and batch (the batch picks the
window kernel's heads per program, `GROUP_PROGRAMS`), and reads the cubin's
resource use with Triton's cuobjdump: registers a thread, stack (spilled) bytes, shared memory. No
GPU and no device time: the register count bounds how many warps a multiprocessor keeps resident,
which is what hides a memory-bound kernel's load latency, and a spill is local-memory traffic.
Writes <out>/decode_registers.json (default benchmarks/cpu); prints a table last. Run it with
TRITON_INTERPRET unset: the interpreter replaces the kernels with Python functions when they are defined.
"""
import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.hybrid_attention.fused_recurrent import launches
from kernels.hybrid_attention.kernel_windows import kernel_code
from kernels.hybrid_attention.ring import ring_size

from .gpu_common import format_table, write_result

# (query heads, kv heads, head dim, F = 2 x Hedgehog feature dim 64): the models the GPU benchmarks use
SHAPES = {"smollm2-135m": (9, 3, 64, 128), "llama3-8b": (32, 8, 128, 128), "phi3-mini": (32, 32, 96, 128),
          "gemma3-4b": (8, 4, 256, 128)}
# (window kind, window size, linear branch): the decode step's modes
MODES = {"terrace": ("terrace", 64, True), "sliding": ("sliding", 64, True), "linear_only": ("sliding", 0, True),
         "window_only": ("terrace", 64, False)}
BF16_ARGS = {"q_ptr", "k_ptr", "v_ptr", "ring_k_ptr", "ring_v_ptr", "y_ptr"}  # the model's dtype; the rest fp32


def signature(kernel, constexprs: dict) -> dict[str, str]:
    """Triton argument types by parameter name: the model's tensors bf16, state and scratch fp32."""
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name == "pos_ptr":
            types[name] = "*i64"
        elif name.endswith("_ptr"):
            types[name] = "*bf16" if name in BF16_ARGS else "*fp32"
        else:
            types[name] = "i32" if name == "B" else "fp32"
    return types


def resource_use(kernel, constexprs: dict, num_warps: int, arch: int) -> dict[str, int]:
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature(kernel, constexprs), constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED):(\d+)", usage))
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]), "shared_bytes": int(fields["SHARED"])}


def report(arch: int, batches: list[int], models: list[str]) -> list[dict[str, Any]]:
    rows, compiled = [], {}
    for model in models:
        H, Hkv, D, F = SHAPES[model]
        for batch in batches:
            for label, (window, window_size, linear) in MODES.items():
                plan = launches(batch, H, Hkv, D, F, ring_size(window_size, window), window_size,
                                kernel_code(window, "fused decode step"), linear=linear, maps=linear,
                                gamma=window_size > 0, gamma_logits=window_size > 0)  # as HybridCache runs it
                for name, launch in plan.items():
                    if name == "maps" and label != "terrace":
                        continue  # the maps kernel does not depend on the window
                    key = (launch.kernel, tuple(sorted(launch.constexprs.items())), launch.num_warps)
                    if key not in compiled:  # only the grid changed with the batch
                        compiled[key] = resource_use(launch.kernel, launch.constexprs, launch.num_warps, arch)
                    row = {"model": model, "batch": batch, "mode": label, "kernel": name,
                           "heads": launch.constexprs.get("HP"), "num_warps": launch.num_warps,
                           "grid": list(launch.grid), **compiled[key]}
                    rows.append(row)
                    print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64],
                        help="rows (the grids and the window kernel's heads per program depend on it)")
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", help="results folder (default: benchmarks/cpu: no GPU ran)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is set: the kernels are then Python functions, which cannot be compiled; "
                     "run with TRITON_INTERPRET=0")
    rows = report(args.arch, args.batches, args.models)
    result = {"arch": args.arch, "triton": triton.__version__, "batches": args.batches, "rows": rows}
    print("wrote", write_result(Path(args.out or Path(__file__).parent / "cpu"), "decode_registers", result))
    print(format_table(rows, ["model", "batch", "mode", "kernel", "heads", "num_warps", "registers", "stack_bytes",
                              "shared_bytes"]))


if __name__ == "__main__":
    main()
