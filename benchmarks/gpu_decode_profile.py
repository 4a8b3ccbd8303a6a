"""Where one decode step of a Llama-3-8B-shaped model spends its time, graph-replayed and eager.

Usage (repo root): python -m benchmarks.gpu_decode_profile [--batches 1 64] [--prompt 4096] [--new-tokens 128]
    [--compile off regions layers] [--out DIR] [--smoke]
The model of `gpu_generate` (Llama 3 8B config, random bf16 weights, default `attention` block). Per
--compile mode (`HybridCache(cuda_graph=True, compile=...)`) and batch, after a prefill of --prompt tokens:
  replay_ms    the captured step's graph alone, replayed back to back: the device's time for a step
  forward_ms   one model(...) call of a one-token step: our host logic (DecodeGraphs.step) + the replay
  generate_ms  generate() per new token: transformers' loop (logits processing, stopping checks) on top,
               after a short generate() call has paid its once-a-process costs
  kernels      torch.profiler over --profile-steps replays: per kernel, launches and microseconds per
               step, each kernel filed as matmul (cuBLAS/cutlass), ours (our Triton kernels) or other;
               `kernel_us_per_step` against replay_ms says how much of a step is gaps between kernels
  eager_kernels  the same over eager steps (HybridCache without graphs): the launches a graph removes
  floor_ms     the weight bytes over the copy bandwidth measured in the run
--compile: which modules the captured step runs compiled by torch.compile (`decode_graph.compiled_modules`).
Writes <out>/gpu_decode_profile.json. --smoke: a tiny fp32 model on CPU (no graphs; the profile is
of CPU ops), which checks the script's logic only.
"""
import argparse
import time
from collections import defaultdict
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from pipeline.hybrid import HybridCache
from pipeline.hybrid.decode_graph import COMPILE_MODES

from .gpu_common import MIB, copy_bandwidth_tb_s, environment, guarded, release_memory, results_dir, \
    synchronize, wall_ms, write_result
from .gpu_generate import LLAMA3_8B, SMOKE_MODEL, build_model

OURS = ("_decode_step_kernel", "_window_kernel", "_state_kernel", "hedgehog", "_fwd_kernel")  # _fwd_kernel: the Hedgehog map's
MATMUL = ("gemm", "gemv", "nvjet", "cutlass", "xmma", "splitk")
TOP_KERNELS = 40


def kind(name: str) -> str:
    lowered = name.lower()
    if any(mark in lowered for mark in OURS):
        return "ours"
    return "matmul" if any(mark in lowered for mark in MATMUL) else "other"


def kernel_table(prof, steps: int, device: torch.device) -> dict[str, Any]:
    """Per kernel name: launches and microseconds per step, and the sums per kind."""
    per_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        on_device = event.device_type == torch.autograd.DeviceType.CUDA if device.type == "cuda" else \
            not event.cpu_children  # CPU: leaf ops stand in for kernels
        if not on_device:
            continue
        entry = per_name[event.name]
        entry[0] += 1
        entry[1] += event.time_range.elapsed_us()  # a kernel's duration; on CPU, the op's
    rows = sorted(({"name": name[:160], "kind": kind(name), "launches_per_step": round(n / steps, 2),
                    "us_per_step": round(us / steps, 2)} for name, (n, us) in per_name.items()),
                  key=lambda row: -row["us_per_step"])
    kinds = defaultdict(lambda: {"launches_per_step": 0.0, "us_per_step": 0.0})
    for row in rows:
        kinds[row["kind"]]["launches_per_step"] += row["launches_per_step"]
        kinds[row["kind"]]["us_per_step"] += row["us_per_step"]
    return {"kernel_us_per_step": round(sum(r["us_per_step"] for r in rows), 1),
            "launches_per_step": round(sum(r["launches_per_step"] for r in rows), 1),
            "by_kind": {k: {key: round(v, 1) for key, v in d.items()} for k, d in kinds.items()},
            "top": rows[:TOP_KERNELS]}


def profiled(fn, steps: int, device: torch.device) -> dict[str, Any]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        synchronize(device)
    return kernel_table(prof, steps, device)


def prefilled(model, batch: int, prompt: int, cache: HybridCache, device: torch.device) -> torch.Tensor:
    """Fill `cache` with a seeded prompt (one row, repeated to the batch: decode cost does not depend on what
    the rows hold); returns the next token ids [batch, 1]."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device=device,
                        generator=torch.Generator(device=device).manual_seed(prompt))
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    cache.batch_repeat_interleave(batch)
    return logits[:, -1].argmax(-1, keepdim=True).repeat(batch, 1)


def continuing(cache: HybridCache, token: torch.Tensor) -> torch.Tensor:
    """generate()'s input_ids that continue `cache` with `token` [B,1]. generate() feeds only the columns
    the cache has not seen, the new token; the others are ones, not the pad id 0, which generate() would
    take for left padding."""
    return torch.cat([token.new_ones(token.shape[0], cache.get_seq_length()), token], dim=1)


def generate_ms(model, cache: HybridCache, token: torch.Tensor, new_tokens: int,
                device: torch.device) -> tuple[float, torch.Tensor]:
    """generate()'s host-clock ms per new token, continuing `cache` from `token`; and its last token [B,1]."""
    ids = continuing(cache, token)
    synchronize(device)
    start = time.perf_counter()
    out = model.generate(ids, past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0)
    synchronize(device)
    return round(1000 * (time.perf_counter() - start) / (out.shape[1] - ids.shape[1]), 3), out[:, -1:]


def measure(model, batch: int, prompt: int, new_tokens: int, profile_steps: int, compile_mode: str,
            device: torch.device) -> dict[str, Any]:
    graphs = device.type == "cuda"
    cache = HybridCache(cuda_graph=graphs, compile=compile_mode) if graphs else HybridCache(cuda_graph=False)
    token = prefilled(model, batch, prompt, cache, device)

    def step():
        with torch.no_grad():
            return model(input_ids=token, past_key_values=cache, use_cache=True)

    step(), step(), step()  # eager warm-up, capture, first replay
    result: dict[str, Any] = {"batch": batch, "prompt": prompt, "compile": compile_mode}
    if graphs:
        if cache.graphs.failure:
            return dict(result, failure=cache.graphs.failure)
        captured = cache.graphs.captured[batch]
        result["replay_ms"] = round(wall_ms(captured.graph.replay, device, 50), 3)
        result["kernels"] = profiled(captured.graph.replay, profile_steps, device)
    result["forward_ms"] = round(wall_ms(step, device, 50), 3)
    _, token = generate_ms(model, cache, token, 2, device)  # generate()'s first call sets up what later ones reuse
    result["generate_ms"], _ = generate_ms(model, cache, token, new_tokens, device)
    result["cache_mib"] = round(cache.nbytes() / MIB, 1)
    eager = HybridCache(cuda_graph=False)
    token = prefilled(model, batch, prompt, eager, device)

    def eager_step():
        with torch.no_grad():
            return model(input_ids=token, past_key_values=eager, use_cache=True)

    result["eager_forward_ms"] = round(wall_ms(eager_step, device, 20), 3)
    result["eager_kernels"] = profiled(eager_step, profile_steps, device)
    del cache, eager
    release_memory(device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=128)  # enough to spread generate()'s own setup thin
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--compile", nargs="+", default=list(COMPILE_MODES), choices=COMPILE_MODES)
    parser.add_argument("--out", help="results folder (default: benchmarks/<this GPU>, e.g. benchmarks/h200)")
    parser.add_argument("--smoke", action="store_true", help="a tiny fp32 model on CPU")
    args = parser.parse_args()
    if args.smoke:
        args.batches, args.prompt, args.new_tokens, args.profile_steps, args.compile = [1, 2], 64, 4, 2, ["off"]
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    torch.manual_seed(0)
    model = build_model(SMOKE_MODEL if args.smoke else LLAMA3_8B, dtype, device)
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth_tb_s(device) if device.type == "cuda" else None
    result: dict[str, Any] = {
        "environment": environment(device), "dtype": str(dtype), "model": SMOKE_MODEL if args.smoke else LLAMA3_8B,
        "weights_mib": round(weights_bytes / MIB, 1), "copy_bandwidth_tb_s": bandwidth,
        "floor_ms": round(weights_bytes / (bandwidth * 1e12) * 1e3, 3) if bandwidth else None, "results": []}
    for compile_mode in args.compile:
        for batch in args.batches:
            row = guarded(lambda: measure(model, batch, args.prompt, args.new_tokens, args.profile_steps,
                                          compile_mode, device), device)
            result["results"].append(row if isinstance(row, dict) else
                                     {"batch": batch, "compile": compile_mode, "failure": row})
            shown = {k: v for k, v in result["results"][-1].items() if k not in ("kernels", "eager_kernels")}
            print(shown, {k: result["results"][-1].get(k, {}).get("by_kind") for k in ("kernels", "eager_kernels")},
                  flush=True)
            write_result(results_dir(args.out, device), "gpu_decode_profile", result)
    print("wrote", write_result(results_dir(args.out, device), "gpu_decode_profile", result))


if __name__ == "__main__":
    main()
