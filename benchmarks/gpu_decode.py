"""One layer's decode step: our fused Triton step vs the PyTorch step, SDPA over a KV cache, fla's recurrent step.

Usage (repo root): python -m benchmarks.gpu_decode [--contexts 1024 4096 32768 131072] [--shape llama3-8b]
    [--out DIR] [--smoke]
First a correctness check: the Triton step against the PyTorch ring step on this device, bf16 and
fp32, both window kinds, over steps that evict keys into S; the script exits nonzero if it fails.
Then, per context length, batch 1, the --shape layer (default llama3-8b: H 32, Hkv 8, D 128, F 128, w 64):
  ours_kernel        fused_recurrent_hybrid_attention (its Triton kernels + the position increment)
  ours_kernel_graph  the same call replayed from a CUDA graph: GPU time without launch overhead
  ours_layer         + phi_q, phi_k and gamma, i.e. all a HybridCache decode step does per layer
  ours_wall, sdpa_wall  back-to-back calls timed by the host clock: Python and launch overhead included
  torch_step         hybrid_attention_ring_step, the PyTorch step the cache uses on CPU
  sdpa_kv_cache      F.scaled_dot_product_attention of 1 query over a bf16 KV cache of that length
  fla_recurrent      fla's fused_recurrent_linear_attn on one token with a [B,H,F,D] state
Our state advances every call (positions move on, terrace blocks are evicted every w calls), so a
median is the cost of a typical step. Writes <out>/gpu_decode.json; prints a summary table last.
--smoke: tiny fp32 shapes on CPU (run with TRITON_INTERPRET=1 to include the Triton step).
"""
import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from kernels.hybrid_attention import (RingState, fill_ring_state, fused_recurrent_hybrid_attention,
                                      hybrid_attention_ring_step, ring_size)
from kernels.testing import TOLERANCE, relative_error

from .attention_inputs import SHAPES, SMOKE_SHAPES, WINDOW_SIZE, AttentionShape, hybrid_module, random_inputs
from .gpu_common import results_dir, MIB, Measured, bench_ms, environment, format_table, guarded, ratio, \
    release_memory, wall_ms, write_result

GOAL = "ours <= 0.03 ms and flat; >= 6x SDPA at 32K, >= 20x at 128K"


def ring_state(shape: AttentionShape, batch: int, prompt: int, window: str, dtype: torch.dtype,
               device: torch.device) -> tuple[RingState, Any]:
    """A state after `prompt` random tokens, and inputs for `prompt + 256` tokens (steps read them)."""
    inputs = random_inputs(shape, batch, prompt + 256, dtype, device)
    state = RingState.empty(batch, shape.heads, shape.kv_heads, shape.head_dim, shape.features,
                            ring_size(WINDOW_SIZE, window), device=device, dtype=dtype)
    with torch.no_grad():
        fill_ring_state(state, torch.arange(batch, device=device), inputs.k[:, :, :prompt].detach(),
                        inputs.v[:, :, :prompt].detach(), inputs.fk[:, :, :prompt].detach(), WINDOW_SIZE, window)
    return state, inputs


def step_args(inputs, t: int, window: str) -> tuple:
    """Token t of every input, as the decode step takes them."""
    q, k, v, fq, fk, gamma = (x.detach() for x in inputs.leaves())
    return q[:, :, t], k[:, :, t], v[:, :, t], fq[:, :, t].float(), fk[:, :, t].float(), gamma, WINDOW_SIZE, window


def check_step(shape: AttentionShape, device: torch.device, dtype: torch.dtype, window: str) -> dict[str, Any]:
    """Triton vs PyTorch step over 70 steps after a 190-token prompt (terrace evicts at 192 and 256)."""
    torch.manual_seed(0)
    reference, inputs = ring_state(shape, 2, 190, window, dtype, device)
    fused = RingState(*(t.clone() for t in reference.tensors()))
    worst_y, worst_abs = 0.0, 0.0
    with torch.no_grad():
        for t in range(190, 260):
            args = step_args(inputs, t, window)
            y_ref, y_fused = hybrid_attention_ring_step(reference, *args), fused_recurrent_hybrid_attention(fused, *args)
            worst_y = max(worst_y, relative_error(y_fused, y_ref))
            worst_abs = max(worst_abs, float((y_ref.float() - y_fused.float()).abs().max()))
    state_error = max(relative_error(b, a) for a, b in zip(reference.tensors()[:3], fused.tensors()[:3]))
    tolerance = TOLERANCE[dtype]  # outputs rounded to the dtype: the CPU tests' bound (kernels/testing.py)
    return {"y_relative_rms": worst_y, "y_max_abs": worst_abs, "state_relative_rms": state_error,
            "tolerance": tolerance, "ok": worst_y <= tolerance and state_error <= tolerance}


def graphed(fn: Callable[[], Any], device: torch.device) -> Callable[[], None] | str:
    """fn captured in a CUDA graph (warmed up on a side stream first), or why not."""
    if device.type != "cuda":
        return "skipped: CUDA graphs need a GPU"
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def load_fla() -> tuple[Callable | None, str | None]:
    try:
        from fla.ops.linear_attn import fused_recurrent_linear_attn
        return fused_recurrent_linear_attn, None
    except Exception as error:  # noqa: BLE001 - record why, run the other columns
        return None, f"error: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def time_context(shape: AttentionShape, context: int, window: str, dtype: torch.dtype, device: torch.device,
                 triton_ok: bool, fla: Callable | None, fla_error: str | None) -> dict[str, Measured]:
    torch.manual_seed(0)
    state, inputs = ring_state(shape, 1, ring_size(WINDOW_SIZE, window), window, dtype, device)
    state.positions.fill_(context)  # the contents are random anyway; only the position matters
    # contiguous once here, so the timed call makes no copies
    args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in step_args(inputs, 0, window))
    q, k, v = args[:3]
    module = hybrid_module(shape, window, "torch", device)
    row: dict[str, Measured] = {"context": context}

    def ours() -> torch.Tensor:
        return fused_recurrent_hybrid_attention(state, *args)

    def ours_layer() -> torch.Tensor:
        fq_, fk_ = module.features(q[:, :, None], k[:, :, None], "triton")  # the fused maps, as the model decodes
        return fused_recurrent_hybrid_attention(state, q, k, v, fq_[:, :, 0], fk_[:, :, 0], module.gamma(),
                                                WINDOW_SIZE, window)

    with torch.no_grad():
        skip = "skipped: Triton needs CUDA or TRITON_INTERPRET=1"
        row["ours_kernel"] = guarded(lambda: bench_ms(ours, device), device) if triton_ok else skip
        replay = guarded(lambda: graphed(ours, device), device) if triton_ok else skip
        row["ours_kernel_graph"] = guarded(lambda: bench_ms(replay, device), device) if callable(replay) else replay
        row["ours_layer"] = guarded(lambda: bench_ms(ours_layer, device), device) if triton_ok else skip
        row["ours_wall"] = guarded(lambda: wall_ms(ours, device), device) if triton_ok else skip
        row["torch_step"] = guarded(lambda: bench_ms(lambda: hybrid_attention_ring_step(state, *args), device), device)
        sdpa = guarded(lambda: time_sdpa(shape, context, dtype, device), device)
        row["sdpa_kv_cache"], row["sdpa_wall"] = sdpa if isinstance(sdpa, tuple) else (sdpa, sdpa)
        if fla is None:
            row["fla_recurrent"] = fla_error
        else:
            row["fla_recurrent"] = guarded(lambda: time_fla(fla, shape, dtype, device), device)
    release_memory(device)
    for column in ("sdpa_kv_cache", "fla_recurrent", "torch_step"):
        row[f"{column}_over_ours"] = ratio(row[column], row["ours_kernel"])
        row[f"{column}_over_ours_graph"] = ratio(row[column], row["ours_kernel_graph"])
    row["state_mib"] = round(state.nbytes() / MIB, 3)
    row["kv_cache_mib"] = round(2 * context * shape.kv_heads * shape.head_dim * torch.finfo(dtype).bits / 8 / MIB, 3)
    return row


def time_sdpa(shape: AttentionShape, context: int, dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """(do_bench, host-clock) ms of one query over a KV cache of `context` keys."""
    q = torch.randn(1, shape.heads, 1, shape.head_dim, device=device, dtype=dtype)
    k_cache = torch.randn(1, shape.kv_heads, context, shape.head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)
    return bench_ms(sdpa, device), wall_ms(sdpa, device)


def time_fla(fla: Callable, shape: AttentionShape, dtype: torch.dtype, device: torch.device) -> float:
    """One token through fla's recurrent linear attention: q, k features [B,T,H,F], v [B,T,H,D]."""
    fq = torch.rand(1, 1, shape.heads, shape.features, device=device, dtype=dtype)
    fk = torch.rand_like(fq)
    v = torch.randn(1, 1, shape.heads, shape.head_dim, device=device, dtype=dtype)
    kv_state = torch.randn(1, shape.heads, shape.features, shape.head_dim, device=device)
    return bench_ms(lambda: fla(fq, fk, v, initial_state=kv_state, output_final_state=True), device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 32768, 131072])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--windows", nargs="+", default=["terrace", "sliding"], choices=["terrace", "sliding"])
    parser.add_argument("--out", help="results folder (default: benchmarks/<this GPU>, e.g. benchmarks/h200)")
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 shapes on CPU")
    args = parser.parse_args()
    if args.smoke:
        args.contexts = [64, 256]
    device = torch.device("cpu" if args.smoke else "cuda")
    shape = SMOKE_SHAPES["tiny"] if args.smoke else SHAPES[args.shape]
    dtype = torch.float32 if args.smoke else torch.bfloat16
    triton_ok = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    fla, fla_error = load_fla()

    result: dict[str, Any] = {
        "environment": environment(device, extra_modules=("fla",)), "dtype": str(dtype), "batch": 1,
        "shape": vars(shape) | {"features": shape.features, "window_size": WINDOW_SIZE},
        "correctness": {}, "correctness_passed": None, "timings_ms": [],
        "goal": GOAL,
    }
    # Written after every check and every row, so a crash (a kernel fault ends the CUDA context) keeps the rest.
    if not triton_ok:
        result["correctness"]["skipped"] = "Triton needs CUDA or TRITON_INTERPRET=1"
    for check_dtype in ([torch.float32] if args.smoke else [torch.bfloat16, torch.float32]) if triton_ok else []:
        for window in ("sliding", "terrace"):
            name = f"{str(check_dtype).removeprefix('torch.')}-{window}"
            result["correctness"][name] = check_step(shape, device, check_dtype, window)
            print(f"check {name}: {result['correctness'][name]}", flush=True)
            write_result(results_dir(args.out, device), "gpu_decode", result)
    passed = all(r["ok"] for r in result["correctness"].values() if isinstance(r, dict))
    result["correctness_passed"] = passed
    rows = result["timings_ms"]
    for window in args.windows if passed else []:
        for context in args.contexts:
            rows.append({"window": window, **time_context(shape, context, window, dtype, device, triton_ok, fla,
                                                          fla_error)})
            print(f"{window} {context}: {rows[-1]}", flush=True)
            write_result(results_dir(args.out, device), "gpu_decode", result)
    path = write_result(results_dir(args.out, device), "gpu_decode", result)
    print(f"wrote {path}")
    columns = ["window", "context", "ours_kernel", "ours_kernel_graph", "ours_layer", "ours_wall", "torch_step",
               "sdpa_kv_cache", "sdpa_wall", "fla_recurrent", "sdpa_kv_cache_over_ours", "sdpa_kv_cache_over_ours_graph",
               "state_mib", "kv_cache_mib"]
    print(format_table(rows, columns) if rows else "no timings: the correctness check failed")
    if not passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
