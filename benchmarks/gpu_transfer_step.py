"""One attention-transfer step of a Llama-3-8B-shaped layer: tokens/s with the Triton kernel vs the reference.

Usage (repo root): python -m benchmarks.gpu_transfer_step [--lengths 1024 8192] [--batches 32 2]
    [--window terrace] [--out DIR] [--smoke]
A step (../shared/design/lolcats.md §2) on random bf16 post-RoPE q, k, v (no grad: the projections
are frozen): the teacher's softmax output without grad, the student's hybrid output, mse_factor x
MSE(student, teacher), backward into the feature maps and window factors, an AdamW step with the
attention-transfer defaults (params.yaml), zero_grad. Two teachers:
  * pipeline_module: `HybridAttention` in transfer mode, exactly as pipeline.transfer drives it; its
    teacher is SDPA on fp32 q, k, v with enable_gqa, which neither flash (fp32) nor mem-efficient
    (GQA) attention takes, so torch runs the math backend with a [B,H,T,T] matrix;
  * bf16_flash_teacher: the same step composed from the module's features()/gamma() and
    hybrid_attention, with the teacher in bf16 flash SDPA.
The teachers alone are timed too. Writes <out>/gpu_transfer_step.json, prints a table last.
"""
import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.hybrid_attention import hybrid_attention
from pipeline.config import AttentionTransferConfig
from pipeline.hybrid.attention import HybridAttention, TransferLosses

from .attention_inputs import SHAPES, SMOKE_SHAPES, AttentionShape, hybrid_module, triton_runs_on
from .gpu_common import results_dir, Measured, bench_ms, environment, format_table, guarded, peak_memory_mib, \
    ratio, release_memory, write_result

BACKENDS = ("triton", "torch")
Loss = Callable[[HybridAttention, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def pipeline_module_loss(module: HybridAttention, q, k, v, scale: float) -> torch.Tensor:
    """The module in transfer mode: it computes the fp32 teacher itself and leaves the MSE behind."""
    module.transfer = TransferLosses(with_xent=False)
    try:
        module(q, k, v, scale)
        return module.transfer.mse
    finally:
        module.transfer = None


def flash_teacher(q, k, v, scale: float) -> torch.Tensor:  # [B,H,T,D] in q's dtype
    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


def fp32_teacher(q, k, v, scale: float) -> torch.Tensor:  # what HybridAttention.forward computes in transfer mode
    with torch.no_grad():
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=scale,
                                              enable_gqa=True)


def bf16_flash_teacher_loss(module: HybridAttention, q, k, v, scale: float) -> torch.Tensor:
    """The module's transfer computation, composed by hand around a bf16 flash teacher."""
    teacher = flash_teacher(q, k, v, scale)
    config = module.config
    fq, fk = module.features(q, k, config.backend)  # [B,H,T,F] each: fp32, or q's dtype from the fused maps
    student = hybrid_attention(q, k, v, fq, fk, module.gamma(), config.effective_window_size, config.window,
                               scale, config.backend)
    return F.mse_loss(student.float(), teacher.float())


TEACHERS: dict[str, tuple[Loss, Callable]] = {
    "pipeline_module": (pipeline_module_loss, fp32_teacher),
    "bf16_flash_teacher": (bf16_flash_teacher_loss, flash_teacher),
}


def transfer_step(module: HybridAttention, loss_fn: Loss, q, k, v, scale: float) -> Callable[[], torch.Tensor]:
    """One update as pipeline.training.fit makes it (AdamW on the module's parameters, fp32 masters)."""
    cfg = AttentionTransferConfig()
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step() -> torch.Tensor:
        loss = cfg.mse_factor * loss_fn(module, q, k, v, scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def measure_step(shape: AttentionShape, window: str, backend: str, loss_fn: Loss, inputs: tuple,
                 device: torch.device, warmup_ms: float, rep_ms: float) -> dict[str, Measured]:
    torch.manual_seed(1)  # the same feature-map init for every backend and teacher
    module = hybrid_module(shape, window, backend, device)
    q, k, v = inputs
    scale = shape.head_dim**-0.5
    with torch.no_grad():
        first_loss = guarded(lambda: loss_fn(module, q, k, v, scale).item(), device)
    if isinstance(first_loss, str):
        return {"first_mse": first_loss, "step_ms": first_loss, "memory": first_loss}
    step = transfer_step(module, loss_fn, q, k, v, scale)
    return {"first_mse": first_loss,
            "step_ms": guarded(lambda: bench_ms(step, device, warmup_ms, rep_ms), device),
            "memory": guarded(lambda: peak_memory_mib(step, device), device)}


def tokens_per_s(step_ms: Measured, tokens: int) -> float | None:
    return round(tokens / (step_ms / 1000)) if isinstance(step_ms, float) else None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 8192])
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 2], help="B per length")
    parser.add_argument("--window", default="terrace")
    parser.add_argument("--teachers", nargs="+", choices=sorted(TEACHERS), default=list(TEACHERS))
    parser.add_argument("--warmup-ms", type=float, default=25)
    parser.add_argument("--rep-ms", type=float, default=200)
    parser.add_argument("--out", help="results folder (default: benchmarks/<this GPU>, e.g. benchmarks/h200)")
    parser.add_argument("--smoke", action="store_true", help="a tiny fp32 layer on CPU")
    args = parser.parse_args()
    if args.smoke:
        args.shape, args.lengths, args.batches, args.rep_ms = "tiny", [192, 256], [2, 2], 20
    if len(args.batches) != len(args.lengths):
        parser.error("--batches needs one B per --lengths entry")
    return args


def main() -> None:
    args = parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shape = {**SHAPES, **SMOKE_SHAPES}[args.shape]
    backends = BACKENDS if device.type == "cuda" or triton_runs_on(device) else ("torch",)
    rows = []
    for length, batch in zip(args.lengths, args.batches):
        torch.manual_seed(0)
        q = torch.randn(batch, shape.heads, length, shape.head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(batch, shape.kv_heads, length, shape.head_dim, device=device, dtype=dtype)
                for _ in range(2))
        scale = shape.head_dim**-0.5
        for teacher_name in args.teachers:
            loss_fn, teacher = TEACHERS[teacher_name]
            teacher_ms = guarded(lambda: bench_ms(lambda: teacher(q, k, v, scale), device, args.warmup_ms,
                                                  args.rep_ms), device)
            row: dict[str, Any] = {"length": length, "batch": batch, "tokens": batch * length,
                                   "teacher": teacher_name, "teacher_only_ms": teacher_ms}
            for backend in backends:
                measured = measure_step(shape, args.window, backend, loss_fn, (q, k, v), device,
                                        args.warmup_ms, args.rep_ms)
                row[backend] = dict(measured, tokens_per_s=tokens_per_s(measured["step_ms"], batch * length))
                release_memory(device)
            if "triton" in row:
                row["speedup_triton_vs_torch"] = ratio(row["torch"]["step_ms"], row["triton"]["step_ms"])
            rows.append(row)
            print(f"done T={length} {teacher_name}", flush=True)
        del q, k, v
        release_memory(device)

    path = write_result(results_dir(args.out, device), "gpu_transfer_step", {
        "environment": environment(device),
        "settings": {"shape": args.shape, **shape.__dict__, "dtype": str(dtype), "window": args.window,
                     "optimizer": "AdamW(lr, weight_decay) of attention-transfer defaults; fp32 master weights",
                     "mse_factor": AttentionTransferConfig().mse_factor,
                     "timing": "median of triton.testing.do_bench over whole steps (L2 flushed before each)",
                     "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms},
        "teachers": {"pipeline_module": "HybridAttention in transfer mode: fp32 SDPA, enable_gqa (math backend)",
                     "bf16_flash_teacher": "features()/gamma()/hybrid_attention composed, bf16 flash SDPA teacher"},
        "results": rows,
    })
    print(f"wrote {path}")
    print(summary(rows, backends))


def summary(rows: list[dict[str, Any]], backends: tuple[str, ...]) -> str:
    table = []
    for row in rows:
        line: dict[str, Any] = {"T": row["length"], "B": row["batch"], "teacher": row["teacher"],
                                "teacher ms": row["teacher_only_ms"]}
        for backend in backends:
            line[f"{backend} ms"] = row[backend]["step_ms"]
            line[f"{backend} tok/s"] = row[backend]["tokens_per_s"]
            line[f"{backend} mse"] = row[backend]["first_mse"]
        line["speedup"] = row.get("speedup_triton_vs_torch")
        table.append(line)
    return format_table(table, list(table[0]))


if __name__ == "__main__":
    main()
