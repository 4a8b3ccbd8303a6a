"""What a generate() loop adds to a graph-replayed decode step, piece by piece.

Usage (repo root): python -m benchmarks.gpu_decode_loop [--batches 1 64] [--prompt 4096] [--steps 64]
    [--compile off] [--out DIR] [--smoke]
The model of `gpu_generate` (Llama 3 8B config, random bf16 weights, default `attention` block), after
a prefill of --prompt tokens, with `HybridCache(cuda_graph=True, compile=...)`. Per batch, ms per step:
  replay          the captured graph alone, back to back (the device's time for a step)
  replay_idle     replay, then wait for the device: what a replay costs when it starts on an idle GPU
  step_idle       one model(...) decode step through DecodeGraphs.step, then wait (our host part)
  step_mask_idle  the same with the attention mask generate() passes
  loop            a greedy loop of model(...) + argmax, no host sync: the device-bound rate any
                  loop could reach
  loop_sync       the same loop reading a flag on the host every step, as generate()'s stopping check does
  generate        model.generate() per new token
  timeline        host clock marks inside generate() steps, medians in ms: `wait` in generate()'s
                  stopping check (the host waiting for the device), `prepare` from there to our step
                  (transformers' input preparation), `ours` from our step's start to the replay launch,
                  `launch` the replay call, `after` from the launch to the next stopping check
                  (transformers' logits processing, queued while the device runs the graph). The
                  device idles for about prepare + ours + launch a step.
  host_ops        torch.profiler over generate(): the host's time per step, op by op (self CPU time,
                  the largest first), and the device's kernel time per step (the profiler slows
                  graph launches, so these op times are relative only)
Writes <out>/gpu_decode_loop.json. --smoke: a tiny fp32 model on CPU (no graphs), checking the logic only.
"""
import argparse
import statistics
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from pipeline.hybrid import HybridCache
from pipeline.hybrid.decode_graph import COMPILE_MODES

from .gpu_common import MIB, environment, guarded, release_memory, results_dir, wall_ms, write_result
from .gpu_decode_profile import continuing, generate_ms, prefilled
from .gpu_generate import LLAMA3_8B, SMOKE_MODEL, build_model

TOP_OPS = 30


def host_ops(model, ids: torch.Tensor, cache, steps: int, device: torch.device) -> dict[str, Any]:
    """Host time per generate() step by op, and device kernel time per step."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        model.generate(ids, past_key_values=cache, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                       pad_token_id=0)
    rows = []
    for event in prof.key_averages():
        if event.self_cpu_time_total > 0:
            rows.append({"name": event.key[:120], "calls_per_step": round(event.count / steps, 2),
                         "self_cpu_us_per_step": round(event.self_cpu_time_total / steps, 1)})
    rows.sort(key=lambda row: -row["self_cpu_us_per_step"])
    device_us = sum(e.self_device_time_total for e in prof.key_averages()) / steps if device.type == "cuda" else None
    return {"self_cpu_us_per_step": round(sum(r["self_cpu_us_per_step"] for r in rows), 1),
            "device_us_per_step": None if device_us is None else round(device_us, 1), "top": rows[:TOP_OPS]}


def host_timeline(model, ids: torch.Tensor, cache, steps: int) -> dict[str, float]:
    """Medians (ms) of the phases of a generate() step, from host clock marks (see the module docstring).
    With graphs, `ours` ends at the replay; without (--smoke), the eager forward stands in for the replay."""
    marks: list[tuple[str, float]] = []

    def timed(owner, name: str, label: str) -> None:
        call = getattr(owner, name)

        def wrapper(*args, **kwargs):
            marks.append((label + "_in", time.perf_counter()))
            out = call(*args, **kwargs)
            marks.append((label + "_out", time.perf_counter()))
            return out

        setattr(owner, name, wrapper)

    graphs = cache.graphs
    step_owner, step_name = (graphs, "step") if graphs is not None else (model, "forward")
    replay_owner, replay_name = (graphs.captured[ids.shape[0]].graph, "replay") if graphs is not None else \
        (model, "forward")
    saved = [(owner, name, vars(owner).get(name)) for owner, name in
             ((model, "_has_unfinished_sequences"), (step_owner, step_name), (replay_owner, replay_name))]
    timed(model, "_has_unfinished_sequences", "check")
    timed(step_owner, step_name, "step")
    timed(replay_owner, replay_name, "replay")
    try:
        model.generate(ids, past_key_values=cache, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                       pad_token_id=0)
    finally:
        for owner, name, value in reversed(saved):
            if value is None:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
    phases: dict[str, list[float]] = {"wait": [], "prepare": [], "ours": [], "launch": [], "after": []}
    last: dict[str, float] = {}
    for label, t in marks:  # a step: check_in, check_out, step_in, replay_in, replay_out, ..., check_in
        if label == "check_in" and "replay_out" in last:
            phases["after"].append(t - last.pop("replay_out"))
        if label == "replay_out" and {"check_in", "check_out", "step_in", "replay_in"} <= last.keys():
            phases["wait"].append(last["check_out"] - last["check_in"])
            phases["prepare"].append(last["step_in"] - last["check_out"])
            phases["ours"].append(last["replay_in"] - last["step_in"])
            phases["launch"].append(t - last["replay_in"])
            for name in ("check_in", "check_out", "step_in", "replay_in"):
                del last[name]
        last[label] = t
    return {name: round(1000 * statistics.median(values), 3) for name, values in phases.items() if values}


def measure(model, batch: int, prompt: int, steps: int, compile_mode: str, device: torch.device) -> dict[str, Any]:
    graphs = device.type == "cuda"
    cache = HybridCache(cuda_graph=True, compile=compile_mode) if graphs else HybridCache(cuda_graph=False)
    token = prefilled(model, batch, prompt, cache, device)

    def step(**extra):
        with torch.no_grad():
            return model(input_ids=token, past_key_values=cache, use_cache=True, **extra)

    step(), step(), step()  # eager warm-up, capture, first replay
    result: dict[str, Any] = {"batch": batch, "prompt": prompt, "compile": compile_mode}
    if graphs:
        if cache.graphs.failure:
            return dict(result, failure=cache.graphs.failure)
        graph = cache.graphs.captured[batch].graph
        result["replay_ms"] = round(wall_ms(graph.replay, device, steps), 3)
        result["replay_idle_ms"] = round(wall_ms(graph.replay, device, steps, wait=True), 3)
    result["step_idle_ms"] = round(wall_ms(step, device, steps, wait=True), 3)
    # the mask grows by a column a step, as generate()'s does (made here, one op more than generate's cat)
    result["step_mask_idle_ms"] = round(wall_ms(lambda: step(attention_mask=torch.ones(
        batch, cache.get_seq_length() + 1, dtype=torch.long, device=device)), device, steps, wait=True), 3)

    def loop(sync: bool):
        nonlocal token
        with torch.no_grad():
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        if sync:
            bool((token == -1).all())  # a flag read on the host, like generate()'s stopping check

    result["loop_ms"] = round(wall_ms(lambda: loop(False), device, steps), 3)
    result["loop_sync_ms"] = round(wall_ms(lambda: loop(True), device, steps), 3)
    result["generate_ms"], token = generate_ms(model, cache, token, steps, device)
    result["timeline"] = host_timeline(model, continuing(cache, token), cache, steps)
    result["host_ops"] = host_ops(model, continuing(cache, token), cache, min(steps, 16), device)
    result["cache_mib"] = round(cache.nbytes() / MIB, 1)
    del cache
    release_memory(device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--compile", nargs="+", default=["off"], choices=COMPILE_MODES)
    parser.add_argument("--out", help="results folder (default: benchmarks/<this GPU>, e.g. benchmarks/h200)")
    parser.add_argument("--smoke", action="store_true", help="a tiny fp32 model on CPU")
    args = parser.parse_args()
    if args.smoke:
        args.batches, args.prompt, args.steps, args.compile = [1, 2], 64, 4, ["off"]
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    torch.manual_seed(0)
    model = build_model(SMOKE_MODEL if args.smoke else LLAMA3_8B, dtype, device)
    result: dict[str, Any] = {"environment": environment(device), "dtype": str(dtype),
                              "model": SMOKE_MODEL if args.smoke else LLAMA3_8B, "results": []}
    for compile_mode in args.compile:
        for batch in args.batches:
            row = guarded(lambda: measure(model, batch, args.prompt, args.steps, compile_mode, device), device)
            result["results"].append(row if isinstance(row, dict) else
                                     {"batch": batch, "compile": compile_mode, "failure": row})
            shown = {k: v for k, v in result["results"][-1].items() if k != "host_ops"}
            print(shown, flush=True)
            write_result(results_dir(args.out, device), "gpu_decode_loop", result)
    print("wrote", write_result(results_dir(args.out, device), "gpu_decode_loop", result))
    for row in result["results"]:
        print(row.get("batch"), row.get("compile"), {k: v for k, v in row.get("host_ops", {}).items() if k != "top"})
        for op in row.get("host_ops", {}).get("top", [])[:15]:
            print("   ", op)


if __name__ == "__main__":
    main()
