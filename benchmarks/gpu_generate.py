"""generate() tokens/s and peak memory of a Llama-3-8B-shaped model: HybridCache vs SDPA with its default cache.

Usage (repo root): python -m benchmarks.gpu_generate [--batches 1 16 64] [--prompts 4096 32768]
    [--new-tokens 64] [--prefill-backend auto|torch] [--compile off|regions|layers] [--out DIR] [--smoke]
The model has Llama 3 8B's config with random bf16 weights made on the GPU, linearized with the
default `attention` block (terrace window 64, Hedgehog 64 -> F 128). The same model object runs
every column: `ours` (`lolcats_hybrid` with a `HybridCache`), `ours_graph` (the same with
`HybridCache(cuda_graph=True, compile=--compile)`: decode steps replayed from a CUDA graph) and `sdpa` with
`DynamicCache(config)` (what generate() makes by default). Every column of a (batch, prompt) gets
the same seeded prompt, so `graph_tokens_equal_eager` compares ours_graph's greedy tokens with ours'.
`floor_ms` is one step's weight bytes over the copy bandwidth measured in the run, and each
column's `floor_fraction` is floor_ms / ms_per_step. Per (batch, prompt, column):
  prefill   one forward over the prompt (logits of the last token only), timed on its own;
  decode    generate() continuing from that cache for --new-tokens greedy tokens, timed:
            tokens/s = batch * new tokens / seconds;
  memory    peak allocated over prefill + decode and over decode alone, and the cache's bytes.
When batch * prompt exceeds PREFILL_TOKENS, fewer rows are prefilled (the largest divisor of the
batch that fits) and the cache is repeated to the batch: decode cost does not depend on what the
rows hold. The JSON's `prefill_rows` says how many rows `prefill_s` is for.
A column whose KV cache cannot fit is skipped with the reason; an OOM is recorded as "OOM".
Our prefill runs through `attention.backend: auto` (the Triton training kernel when registered);
if that fails in the warm-up, or with --prefill-backend torch, the "triton" entry is dropped from
the prefill registry so prefill uses the PyTorch parallel form; decode is unaffected.
Writes <out>/gpu_generate.json; prints a summary table last. --smoke: a tiny fp32 model on CPU.
"""
import argparse
import time
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from kernels.hybrid_attention import BACKENDS, DECODE_BACKENDS
from pipeline.hybrid import ATTN_IMPLEMENTATION, HybridCache, HybridConfig, linearize
from pipeline.hybrid.attention import resolve_backend
from pipeline.hybrid.decode_graph import COMPILE_MODES

from .gpu_common import MIB, copy_bandwidth_tb_s, environment, format_table, guarded, ratio, release_memory, \
    results_dir, synchronize, write_result

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                 rms_norm_eps=1e-5)
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=4096)
PREFILL_TOKENS = 131072  # the most prompt tokens one prefill forward takes (8B activations: ~15 GB)
GOAL = "generate() >= 3x SDPA tokens/s at 4K in batch; memory flat in the prompt length"
COLUMNS = {"ours": ATTN_IMPLEMENTATION, "ours_graph": ATTN_IMPLEMENTATION, "sdpa": "sdpa"}


def build_model(shape: dict[str, Any], dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """Random weights straight on the device (init runs there, no CPU copy)."""
    config = LlamaConfig(**shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return linearize(model.eval(), HybridConfig())


def kv_cache_bytes(config: LlamaConfig, batch: int, length: int, dtype: torch.dtype) -> int:
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * batch * config.num_key_value_heads * length * head_dim * dtype.itemsize


def cache_bytes(cache) -> int:
    if isinstance(cache, HybridCache):
        return cache.nbytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)


def fits(column: str, model, batch: int, prompt: int, new_tokens: int, device: torch.device) -> str | None:
    """Why a column is skipped up front, or None: the SDPA KV cache alone must fit next to the weights."""
    if column != "sdpa" or device.type != "cuda":
        return None
    need = kv_cache_bytes(model.config, batch, prompt + new_tokens, model.dtype)
    free = torch.cuda.mem_get_info(device)[0]
    if need > 0.9 * free:
        return f"skipped: the KV cache needs {need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
    return None


def run(model, column: str, batch: int, prompt: int, new_tokens: int, device: torch.device,
        compile_mode: str = "off") -> dict[str, Any]:
    model.set_attn_implementation(COLUMNS[column])
    rows = max(r for r in range(1, batch + 1) if batch % r == 0 and (r * prompt <= PREFILL_TOKENS or r == 1))
    prompt_rng = torch.Generator(device=device).manual_seed(prompt * 1000 + batch)  # every column: one prompt
    ids = torch.randint(0, model.config.vocab_size, (rows, prompt), device=device, generator=prompt_rng)
    cache = DynamicCache(config=model.config) if column == "sdpa" else \
        (HybridCache(cuda_graph=True, compile=compile_mode) if column == "ours_graph" else HybridCache(cuda_graph=False))
    release_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    synchronize(device)
    prefill_s = time.perf_counter() - start
    if rows < batch:
        cache.batch_repeat_interleave(batch // rows)
        ids = ids.repeat_interleave(batch // rows, dim=0)
        logits = logits.repeat_interleave(batch // rows, dim=0)
    ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    del logits
    after_prefill = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    out = model.generate(ids, past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0)
    synchronize(device)
    decode_s = time.perf_counter() - start
    generated = out.shape[1] - ids.shape[1]
    result = {"prefill_rows": rows, "prefill_s": round(prefill_s, 4), "decode_s": round(decode_s, 4),
              "new_tokens": generated, "decode_tokens_per_s": round(batch * generated / decode_s, 1),
              "ms_per_step": round(1000 * decode_s / generated, 3), "cache_mib": round(cache_bytes(cache) / MIB, 1),
              "tokens": out[:, ids.shape[1]:].cpu()}  # main() compares the columns' tokens, then drops them
    if column == "ours_graph":  # a capture that failed decodes eagerly: these say whether graphs ran at all
        graphs = cache.graphs
        result.update(warm_ups=graphs.warm_ups, captures=graphs.captures, replays=graphs.replays,
                      warm_up_s=round(graphs.warm_up_s, 4), capture_s=round(graphs.capture_s, 4),
                      graph_failure=graphs.failure)
    if device.type == "cuda":
        decode_peak = torch.cuda.max_memory_allocated(device)
        result["peak_mib"] = round(max(after_prefill, decode_peak) / MIB, 1)
        result["decode_peak_mib"] = round(decode_peak / MIB, 1)
    del cache, out, ids
    release_memory(device)
    return result


def warm_up(model, prompts: list[int], device: torch.device) -> str | None:
    """Compile every Triton kernel (prefill kernels per prompt length), touch every code path once.

    Returns why the Triton prefill was dropped, or None when it works (or was never registered).
    """
    run(model, "sdpa", 2, 256, 2, device)
    failure = guarded(lambda: [run(model, "ours", 1, prompt, 2, device) for prompt in prompts], device)
    if not isinstance(failure, str):
        return None
    BACKENDS.pop("triton", None)
    for prompt in prompts:
        run(model, "ours", 1, prompt, 2, device)
    return failure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompts", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-backend", choices=["auto", "torch"], default="auto")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="off", help="ours_graph's HybridCache(compile=...)")
    parser.add_argument("--out", help="results folder (default: benchmarks/<this GPU>, e.g. benchmarks/h200)")
    parser.add_argument("--smoke", action="store_true", help="a tiny fp32 model on CPU")
    args = parser.parse_args()
    if args.smoke:
        args.batches, args.prompts, args.new_tokens = [1, 2], [64, 256], 4
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    torch.manual_seed(0)
    model = build_model(SMOKE_MODEL if args.smoke else LLAMA3_8B, dtype, device)
    weights_mib = round(sum(p.numel() * p.element_size() for p in model.parameters()) / MIB, 1)
    if args.prefill_backend == "torch":
        BACKENDS.pop("triton", None)
    prefill_fallback = warm_up(model, args.prompts, device)
    bandwidth = copy_bandwidth_tb_s(device) if device.type == "cuda" else None
    floor_ms = round(weights_mib * MIB / (bandwidth * 1e12) * 1e3, 3) if bandwidth else None

    result = {
        "environment": environment(device), "dtype": str(dtype), "model": SMOKE_MODEL if args.smoke else LLAMA3_8B,
        "attention": HybridConfig().to_dict(), "weights_mib": weights_mib,
        "backends": {"prefill": resolve_backend(HybridConfig().backend, device), "triton_prefill_failed": prefill_fallback,
                     "decode": resolve_backend(HybridConfig().backend, device, DECODE_BACKENDS)},
        "graph_compile": args.compile, "prefill_tokens_limit": PREFILL_TOKENS, "new_tokens": args.new_tokens, "results": [], "goal": GOAL,
        "copy_bandwidth_tb_s": bandwidth, "floor_ms": floor_ms,
    }
    rows = result["results"]
    for prompt in args.prompts:
        for batch in args.batches:
            row: dict[str, Any] = {"prompt": prompt, "batch": batch}
            for column in COLUMNS:
                skip = fits(column, model, batch, prompt, args.new_tokens, device)
                row[column] = skip or guarded(lambda: run(model, column, batch, prompt, args.new_tokens, device,
                                                          args.compile), device)
                shown = {k: v for k, v in row[column].items() if k != "tokens"} if isinstance(row[column], dict) else row[column]
                print(f"prompt {prompt} batch {batch} {column}: {shown}", flush=True)
            ours, graph, sdpa = (row[c] if isinstance(row[c], dict) else {} for c in COLUMNS)
            row["speedup"] = ratio(ours.get("decode_tokens_per_s"), sdpa.get("decode_tokens_per_s"))
            row["graph_speedup"] = ratio(graph.get("decode_tokens_per_s"), ours.get("decode_tokens_per_s"))
            if "tokens" in ours and "tokens" in graph:
                row["graph_tokens_equal_eager"] = torch.equal(ours["tokens"], graph["tokens"])
            for cell in (ours, graph, sdpa):
                cell.pop("tokens", None)
                if floor_ms and "ms_per_step" in cell:
                    cell["floor_fraction"] = round(floor_ms / cell["ms_per_step"], 3)
            rows.append(row)
            write_result(results_dir(args.out, device), "gpu_generate", result)  # after every row: a crash keeps what was measured
    path = write_result(results_dir(args.out, device), "gpu_generate", result)
    print(f"wrote {path}")
    table = []
    for row in rows:
        line = {"prompt": row["prompt"], "batch": row["batch"], "speedup": row["speedup"],
                "graph_speedup": row["graph_speedup"], "graph_equal": row.get("graph_tokens_equal_eager")}
        for column in COLUMNS:
            cell = row[column]
            for key in ("decode_tokens_per_s", "prefill_s", "peak_mib", "cache_mib"):
                line[f"{column}_{key}"] = cell.get(key) if isinstance(cell, dict) else cell
        table.append(line)
    columns = ["prompt", "batch", *(f"{c}_{k}" for c in COLUMNS for k in ("decode_tokens_per_s", "prefill_s",
                                                                           "peak_mib", "cache_mib")), "speedup",
               "graph_speedup", "graph_equal"]
    print(format_table(table, columns))


if __name__ == "__main__":
    main()
