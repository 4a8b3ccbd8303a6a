"""Where one forward+backward of the hybrid attention spends its time: device time per kernel.

Usage (repo root): python -m benchmarks.gpu_attention_profile [--shapes llama3-8b] [--lengths 1024 32768]
    [--tokens 32768] [--window terrace] [--backend triton] [--steps 5] [--out DIR] [--smoke]
Per (shape, T), B = tokens / T: the step (hybrid_attention on given fq, fk, then autograd.grad of
every input against one upstream gradient) is timed whole, then run --steps times under
torch.profiler; each kernel's self device time is divided by --steps. The kernel times are what
to optimise next; the step time is the number to compare with gpu_attention.json.
Writes <out>/gpu_attention_profile.json after every case. --smoke: tiny fp32 shapes on CPU, the
torch backend, CPU operator times instead of kernels.
"""
import argparse
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from kernels.hybrid_attention import hybrid_attention

from .attention_inputs import SHAPES, SMOKE_SHAPES, WINDOW_SIZE, random_inputs
from .gpu_common import results_dir, bench_ms, environment, release_memory, write_result

KERNELS_KEPT = 15  # the largest, per case


def kernel_times(step, device: torch.device, steps: int) -> dict[str, float]:
    """Self time per kernel (CUDA) or operator (CPU), ms per step, largest first."""
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    times = {}
    for event in prof.key_averages():
        us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if us > 0:
            times[event.key[:80]] = round(us / steps / 1000, 4)
    return dict(sorted(times.items(), key=lambda item: -item[1])[:KERNELS_KEPT])


def profile_case(shape_name: str, length: int, args: argparse.Namespace, device: torch.device,
                 dtype: torch.dtype) -> dict[str, Any]:
    shape = {**SHAPES, **SMOKE_SHAPES}[shape_name]
    batch = args.tokens // length
    torch.manual_seed(0)
    x = random_inputs(shape, batch, length, dtype, device)
    upstream = torch.randn_like(x.q)

    def step() -> tuple[torch.Tensor, ...]:
        o = hybrid_attention(x.q, x.k, x.v, x.fq, x.fk, x.gamma, WINDOW_SIZE, args.window, x.scale, args.backend)
        return torch.autograd.grad(o, x.leaves(), upstream)
    return {"shape": shape_name, "length": length, "batch": batch,
            "fwd_bwd_ms": bench_ms(step, device, 10, 40 if not args.smoke else 5),
            "kernels_ms_per_step": kernel_times(step, device, args.steps)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["llama3-8b"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 32768])
    parser.add_argument("--tokens", type=int, default=32768, help="B*T of every case")
    parser.add_argument("--window", default="terrace")
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per case")
    parser.add_argument("--out", help="results folder (default: benchmarks/<this GPU>, e.g. benchmarks/h200)")
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 shapes on CPU, torch backend")
    args = parser.parse_args()
    if args.smoke:
        args.shapes, args.lengths, args.tokens, args.backend, args.steps = list(SMOKE_SHAPES), [128], 256, "torch", 2
    return args


def main() -> None:
    args = parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    rows: list[dict[str, Any]] = []
    for shape_name in args.shapes:
        for length in args.lengths:
            rows.append(profile_case(shape_name, length, args, device, dtype))
            release_memory(device)
            path = write_result(results_dir(args.out, device), "gpu_attention_profile", {
                "environment": environment(device),
                "settings": {"dtype": str(dtype), "window": args.window, "window_size": WINDOW_SIZE,
                             "backend": args.backend, "tokens": args.tokens, "steps": args.steps},
                "results": rows})
            print(f"{shape_name} T={length}: {rows[-1]['fwd_bwd_ms']:.3f} ms", flush=True)
            for name, ms in rows[-1]["kernels_ms_per_step"].items():
                print(f"  {ms:9.4f}  {name}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
