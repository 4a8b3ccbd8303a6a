"""Fused Hedgehog feature-map kernel vs the PyTorch map: bf16 correctness, then time, at a real layer shape.

Usage (repo root): python -m benchmarks.gpu_feature_map [--shapes llama3-8b] [--lengths 1024 8192]
    [--tokens 32768] [--out DIR] [--smoke]
Every (shape, T) gets B = tokens / T and both inputs of a layer's maps: q (H heads, group 1) and k
(Hkv heads, group H / Hkv), each a [B,T,Hx,D] tensor transposed to [B,Hx,T,D] as the model hands
them over, with fp32 master weights (Kaiming init x 4: sharper, trained-looking maps).
  check: the kernel on the bf16 inputs vs the PyTorch map on the same values in fp32, one upstream
         gradient: ||x - ref|| / ||ref|| of phi, dx and dweight against kernels.testing.TOLERANCE.
  time:  fwd (no_grad), fwd+bwd (grads of x and weight) and fwd+bwd of the weight alone (attention
         transfer, where the LLM is frozen) of the PyTorch map as HybridAttention ran it before the
         kernel (fp32 maps on x, or on repeat_kv(k)) and of the kernel on un-repeated x.
Writes <out>/gpu_feature_map.json, prints a table last, exits 1 if a check fails.
--smoke: tiny fp32 shapes on CPU, to check the script without a GPU (run with TRITON_INTERPRET=1).
"""
import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch

from kernels.feature_maps import hedgehog_feature_map
from kernels.testing import TOLERANCE, relative_error, tolerances_by_name
from pipeline.hybrid.feature_maps import HedgehogFeatureMap

from .attention_inputs import SHAPES, AttentionShape, triton_runs_on
from .gpu_common import results_dir, Measured, bench_ms, environment, format_table, guarded, peak_memory_mib, \
    ratio, release_memory, write_result

SMOKE_SHAPES = {"tiny": AttentionShape(heads=4, kv_heads=2, head_dim=16, feature_dim=16)}  # the kernel's smallest dims
TENSORS = ("phi", "dx", "dweight")
WEIGHT_SCALE = 4.0
SKIPPED = "skipped: Triton needs CUDA or TRITON_INTERPRET=1"


def make_inputs(shape: AttentionShape, heads_in: int, batch: int, length: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, HedgehogFeatureMap]:
    """x [B,Hx,T,D] (a transposed view, requiring grad) and a map with fp32 weights [H,D,F']."""
    x = torch.randn(batch, length, heads_in, shape.head_dim, device=device, dtype=dtype).transpose(1, 2)
    feature_map = HedgehogFeatureMap(shape.heads, shape.head_dim, shape.feature_dim, "kaiming").to(device)
    with torch.no_grad():
        feature_map.weight.mul_(WEIGHT_SCALE)
    return x.requires_grad_(), feature_map


def torch_map(x: torch.Tensor, feature_map: HedgehogFeatureMap) -> torch.Tensor:  # [B,H,T,2F'] fp32
    """What HybridAttention.features computed before the kernel: the map on x, or on repeat_kv(x)."""
    group = feature_map.weight.shape[0] // x.shape[1]
    return feature_map(x if group == 1 else x.repeat_interleave(group, dim=1))


def kernel_map(x: torch.Tensor, feature_map: HedgehogFeatureMap) -> torch.Tensor:  # [B,H,T,2F'] in x's dtype
    return hedgehog_feature_map(x, feature_map.weight)


def check(x: torch.Tensor, feature_map: HedgehogFeatureMap) -> dict[str, Any]:
    """Errors of the kernel per tensor against the PyTorch map in fp32, the dtype's rounding floor, verdict."""
    x_ref = x.detach().float().requires_grad_()
    reference = torch_map(x_ref, feature_map)
    upstream = torch.randn_like(reference).to(x.dtype)
    ref = [reference.detach(), *torch.autograd.grad(reference, [x_ref, feature_map.weight], upstream.float())]
    phi = kernel_map(x, feature_map)
    ours = [phi.detach(), *torch.autograd.grad(phi, [x, feature_map.weight], upstream)]
    tolerance = TOLERANCE[x.dtype]  # the CPU tests' bound, no looser one on the GPU (kernels/testing.py)
    errors = {n: relative_error(a, r) for n, a, r in zip(TENSORS, ours, ref)}
    # what rounding the exact result to the stored dtype alone costs (dweight stays fp32)
    floors = {n: relative_error(r.to(a.dtype), r) for n, a, r in zip(TENSORS, ours, ref)}
    finite = all(bool(torch.isfinite(a).all()) for a in ours)
    return {"tolerance": tolerance, "relative_error": errors, "rounding_floor": floors, "finite": finite,
            "passed": finite and all(e <= tolerance for e in errors.values())}


def measure(output: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
            device: torch.device, warmup_ms: float, rep_ms: float) -> dict[str, Measured]:
    """fwd, fwd+bwd (x and weight) and fwd+bwd of weight alone on a frozen x (a detached copy, so no
    dx is computed, as in attention transfer): times, and the fwd+bwd peak memory. output(x) -> phi."""
    frozen = x.detach()

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return output(x)
    upstream = guarded(lambda: torch.randn_like(forward()), device)
    if isinstance(upstream, str):
        return {"fwd_ms": upstream}
    timed = {"fwd_ms": forward,
             "fwd_bwd_ms": lambda: torch.autograd.grad(output(x), [x, weight], upstream),
             "fwd_bwd_weight_ms": lambda: torch.autograd.grad(output(frozen), [weight], upstream)}
    result: dict[str, Measured] = {name: guarded(lambda fn=fn: bench_ms(fn, device, warmup_ms, rep_ms), device)
                                   for name, fn in timed.items()}
    result["fwd_bwd_memory"] = guarded(lambda: peak_memory_mib(timed["fwd_bwd_ms"], device), device)
    return result


def run_case(shape: AttentionShape, heads_in: int, batch: int, length: int, dtype: torch.dtype,
             device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Check, then time both columns, for one input (q: heads_in = H, k: heads_in = Hkv) of one (shape, T)."""
    torch.manual_seed(0)
    x, feature_map = make_inputs(shape, heads_in, batch, length, dtype, device)
    triton_ok = triton_runs_on(device)
    row: dict[str, Any] = {"heads_in": heads_in, "group": shape.heads // heads_in}
    row["check"] = guarded(lambda: check(x, feature_map), device) if triton_ok else SKIPPED
    row["torch"] = measure(lambda x: torch_map(x, feature_map), x, feature_map.weight, device, args.warmup_ms,
                           args.rep_ms)
    row["kernel"] = measure(lambda x: kernel_map(x, feature_map), x, feature_map.weight, device, args.warmup_ms,
                            args.rep_ms) if triton_ok else SKIPPED
    kernel = row["kernel"] if isinstance(row["kernel"], dict) else {}
    row["speedup"] = {key: ratio(row["torch"][key], kernel.get(key)) for key in row["torch"] if key.endswith("_ms")}
    # the least the kernel's forward moves: x read once, phi written once
    moved = x.element_size() * (x.numel() + batch * shape.heads * length * shape.features)
    fwd = kernel.get("fwd_ms")
    row["kernel_fwd_tb_s"] = round(moved / (fwd / 1000) / 1e12, 3) if isinstance(fwd, float) else None
    return row


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["llama3-8b"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 8192])
    parser.add_argument("--tokens", type=int, default=32768, help="B*T of every case")
    parser.add_argument("--warmup-ms", type=float, default=25)
    parser.add_argument("--rep-ms", type=float, default=100)
    parser.add_argument("--out", help="results folder (default: benchmarks/<this GPU>, e.g. benchmarks/h200)")
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 shapes on CPU")
    args = parser.parse_args()
    if args.smoke:
        args.shapes, args.lengths, args.tokens, args.rep_ms = list(SMOKE_SHAPES), [64, 130], 260, 20
    return args


def main() -> None:
    args = parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    rows = []
    for shape_name in args.shapes:
        shape = {**SHAPES, **SMOKE_SHAPES}[shape_name]
        for length in args.lengths:
            batch = max(1, args.tokens // length)
            for name, heads_in in (("q", shape.heads), ("k", shape.kv_heads)):
                row = run_case(shape, heads_in, batch, length, dtype, device, args)
                rows.append({"shape": shape_name, **shape.__dict__, "input": name, "batch": batch, "length": length,
                             **row})
                release_memory(device)
                print(f"done {shape_name} T={length} {name}", flush=True)
            path = write_result(results_dir(args.out, device), "gpu_feature_map", report(device, dtype, args, rows))  # so far
    failed = [f"{r['shape']}-T{r['length']}-{r['input']}" for r in rows  # an error or OOM fails; a skip does not
              if r["check"] != SKIPPED and not (isinstance(r["check"], dict) and r["check"]["passed"])]
    path = write_result(results_dir(args.out, device), "gpu_feature_map", report(device, dtype, args, rows, failed))
    print(f"wrote {path}")
    print(summary(rows))
    sys.exit(1 if failed else 0)


def report(device: torch.device, dtype: torch.dtype, args: argparse.Namespace, rows: list[dict[str, Any]],
           failed: list[str] | None = None) -> dict[str, Any]:
    """The JSON document: written after every length, so a run cut short keeps what it measured."""
    return {
        "environment": environment(device),
        "settings": {"dtype": str(dtype), "tokens": args.tokens, "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms,
                     "weights": f"fp32 [H,D,F'], Kaiming init x {WEIGHT_SCALE}",
                     "inputs": "randn [B,T,Hx,D] transposed to [B,Hx,T,D]",
                     "timing": "median of triton.testing.do_bench (L2 flushed before each call); fwd under no_grad, "
                               "fwd_bwd = output + torch.autograd.grad w.r.t. x and weight, fwd_bwd_weight: x "
                               "detached (frozen LLM, attention transfer), grad w.r.t. weight only",
                     "memory": "torch.cuda.max_memory_allocated of one fwd+bwd after reset_peak_memory_stats"},
        "columns": {"torch": "HedgehogFeatureMap (fp32 einsum, softmaxes, cat, clamp) on x, or on "
                             "x.repeat_interleave(H // Hx, dim=1) for k: HybridAttention before the kernel",
                    "kernel": "kernels.feature_maps.hedgehog_feature_map(x, weight) on un-repeated x"},
        "check": {"reference": "the torch column on x upcast to fp32, same upstream gradient",
                  "metric": "||x - ref|| / ||ref|| per tensor",
                  "tolerances": tolerances_by_name()},
        "passed": None if failed is None else not failed, "failed": failed,
        "results": rows,
    }


def summary(rows: list[dict[str, Any]]) -> str:
    """One line per (shape, T, input): errors, ms of both columns, speedups."""
    lines = []
    for row in rows:
        line: dict[str, Any] = {"shape": row["shape"], "T": row["length"], "B": row["batch"], "x": row["input"]}
        if isinstance(row["check"], dict):
            line.update({f"err {n}": e for n, e in row["check"]["relative_error"].items()})
            line["pass"] = "yes" if row["check"]["passed"] else "NO"
        for column in ("torch", "kernel"):
            measured = row[column] if isinstance(row[column], dict) else {}
            line[f"{column} fwd"] = measured.get("fwd_ms", row[column])
            line[f"{column} f+b"] = measured.get("fwd_bwd_ms", row[column])
            line[f"{column} f+bW"] = measured.get("fwd_bwd_weight_ms", row[column])
        line.update({"x fwd": row["speedup"].get("fwd_ms"), "x f+b": row["speedup"].get("fwd_bwd_ms"),
                     "TB/s fwd": row["kernel_fwd_tb_s"]})
        lines.append(line)
    columns = list(dict.fromkeys(c for line in lines for c in line))
    return format_table(lines, columns)


if __name__ == "__main__":
    main()
