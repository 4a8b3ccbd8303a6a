"""Each model stage's step on a Llama-3-8B-shaped model (random bf16 weights): tokens/s, peak memory,
and the conversion time those rates project for the 8B recipe.

Usage (repo root): python -m benchmarks.gpu_stage_steps [--batch 8] [--seq-len 1024]
    [--train-tokens 20000000] [--eval-tokens N] [--out DIR] [--smoke]
Speed does not depend on weight values, so random weights stand in for the real model. Every step
is the pipeline's own code on one micro-batch of `--batch` chunks of `--seq-len` tokens:
  * teacher_forward: the teacher's forward without grad (lm-eval of the teacher, and what online
    teacher states cost inside each transfer step);
  * transfer_step: the linearized model in transfer mode over all layers as one joint block
    (`pipeline.transfer.transfer_mode` + `block_forward` from the token embeddings, as
    `cache-teacher-attn.states: online` trains), mse_factor x MSE, backward into the feature maps
    and window factors, AdamW step (attention-transfer defaults);
  * lora_step: `pipeline.lora.add_lora` (lora-recover defaults: r 8 on q/k/v/o) on that model,
    next-token loss over the chunk, backward, AdamW step;
  * student_forward: the LoRA student's forward without grad (lm-eval of a student).
Projection (../shared/design/lolcats.md §2-§3: ~20M tokens per training stage): hours = tokens /
tokens_per_s per stage, `--eval-tokens` for each of the two evaluated models when given.
Writes <out>/gpu_stage_steps.json, prints a table last.
"""
import argparse
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from pipeline.config import AttentionTransferConfig, LoraRecoverConfig
from pipeline.hybrid import HybridConfig, linearize
from pipeline.lora import add_lora
from pipeline.transfer import block_forward, transfer_mode

from .gpu_common import results_dir, MIB, bench_ms, environment, format_table, guarded, peak_memory_mib, \
    release_memory, write_result
from .gpu_generate import LLAMA3_8B, SMOKE_MODEL

TRAIN_TOKENS = 20_000_000  # per training stage for 8B: 2 epochs of ~10M Alpaca tokens (lolcats.md §2)


def optimizer_step(params: list[torch.nn.Parameter], lr: float, weight_decay: float):
    """One AdamW update and zero_grad, as `pipeline.training.fit` does after each micro-batch group."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def transfer_step(model, ids: torch.Tensor, cfg: AttentionTransferConfig):
    layers = range(model.config.num_hidden_layers)
    params = [p for p in model.parameters() if p.requires_grad]
    update = optimizer_step(params, cfg.lr, cfg.weight_decay)

    def step() -> None:
        with transfer_mode(model, layers, with_xent=False) as holders:
            with torch.no_grad():
                hidden = model.model.embed_tokens(ids)
            block_forward(model, layers, hidden)
            loss = cfg.mse_factor * torch.stack([h.mse for h in holders]).mean()
        loss.backward()
        update()
    return step


def lora_step(student, ids: torch.Tensor, cfg: LoraRecoverConfig):
    params = [p for p in student.parameters() if p.requires_grad]
    update = optimizer_step(params, cfg.lr, cfg.weight_decay)

    def step() -> None:
        student(ids, labels=ids).loss.backward()
        update()
    return step


def forward(model, ids: torch.Tensor):
    @torch.no_grad()
    def step() -> None:
        model(ids).logits
    return step


def measure(name: str, step, tokens: int, device: torch.device) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        step()  # compiles the Triton kernels and allocates the optimizer state before timing
        ms = bench_ms(step, device, warmup_ms=100, rep_ms=1000)
        return {"ms": round(ms, 2), "tokens_per_s": round(tokens / (ms / 1000), 1),
                **(peak_memory_mib(step, device) or {})}
    result = guarded(run, device)
    print(f"{name}: {result}", flush=True)
    release_memory(device)
    return result


def projection(steps: dict[str, Any], train_tokens: int, eval_tokens: int | None) -> dict[str, Any]:
    """Hours per stage at the measured rates; a stage whose step failed projects nothing."""
    budget = {"attention-transfer": ("transfer_step", train_tokens), "lora-recover": ("lora_step", train_tokens)}
    if eval_tokens is not None:
        budget["lm-eval teacher"] = ("teacher_forward", eval_tokens)
        budget["lm-eval student"] = ("student_forward", eval_tokens)
    hours: dict[str, Any] = {}
    for stage, (step, tokens) in budget.items():
        rate = steps[step].get("tokens_per_s") if isinstance(steps[step], dict) else None
        hours[stage] = round(tokens / rate / 3600, 3) if rate else None
    total = None if None in hours.values() else round(sum(hours.values()), 3)
    return {"train_tokens_per_stage": train_tokens, "eval_tokens_per_model": eval_tokens, "hours": hours,
            "total_hours": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="chunks per micro-batch (the GPU recipe's batch_size)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--train-tokens", type=int, default=TRAIN_TOKENS)
    parser.add_argument("--eval-tokens", type=int, default=None, help="lm-eval tokens per model, if known")
    parser.add_argument("--out", help="results folder (default: benchmarks/<this GPU>, e.g. benchmarks/h200)")
    parser.add_argument("--smoke", action="store_true", help="a tiny fp32 model on CPU")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shape = SMOKE_MODEL if args.smoke else LLAMA3_8B
    if args.smoke:
        args.batch, args.seq_len = 2, 128
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=dtype).eval()
    ids = torch.randint(0, shape["vocab_size"], (args.batch, args.seq_len), device=device)
    tokens = ids.numel()

    steps: dict[str, Any] = {"teacher_forward": measure("teacher_forward", forward(model, ids), tokens, device)}
    hybrid = HybridConfig()
    model = linearize(model, hybrid)  # feature maps in fp32, as the pipeline trains them
    steps["transfer_step"] = measure("transfer_step", transfer_step(model, ids, AttentionTransferConfig()),
                                     tokens, device)
    student = add_lora(model, LoraRecoverConfig(), train_feature_maps=False)
    steps["lora_step"] = measure("lora_step", lora_step(student, ids, LoraRecoverConfig()), tokens, device)
    steps["student_forward"] = measure("student_forward", forward(student, ids), tokens, device)

    result = {
        "environment": environment(device), "dtype": str(dtype), "model": shape, "attention": hybrid.to_dict(),
        "batch": args.batch, "seq_len": args.seq_len, "tokens_per_step": tokens,
        "weights_mib": round(sum(p.numel() * p.element_size() for p in model.parameters()) / MIB, 1),
        "steps": steps, "projection": projection(steps, args.train_tokens, args.eval_tokens),
    }
    path = write_result(results_dir(args.out, device), "gpu_stage_steps", result)
    print(f"wrote {path}")
    rows = [{"step": name, **(cell if isinstance(cell, dict) else {"ms": cell})} for name, cell in steps.items()]
    print(format_table(rows, ["step", "ms", "tokens_per_s", "peak_mib"]))
    print(format_table([{"stage": k, "hours": v} for k, v in result["projection"]["hours"].items()],
                       ["stage", "hours"]))


if __name__ == "__main__":
    main()
