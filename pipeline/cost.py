"""What linearizing Llama 3 8B, 70B and 405B at the paper's budgets would cost, projected from GPU steps.

Input: a `python -m benchmarks.gpu_stage_steps` result (benchmarks/<gpu>/gpu_stage_steps.json): the
time and peak memory of one attention-transfer step and one LoRA step of a Llama-3-8B-shaped model on
one GPU (random weights: speed does not depend on their values), `tokens_per_step` tokens each.

The projection [ours], per model and stage:
- time per token scales with the dense FLOPs per token, i.e. with the parameters a token passes
  through (the decoder layers; in LoRA also the lm_head), since the hybrid attention is linear in
  the context and small beside the projections: hours = tokens / measured tokens/s x params ratio,
  in GPU-hours of the measured GPU;
- memory = bf16 weights + the measured activation memory (peak above the weights) scaled by width x
  depth, the size of what a token leaves for the backward pass; `GPUs` is how many of the measured
  GPU's memory that needs when the weights are sharded (FSDP) and the activations are not.
LoLCATs' reported costs (../shared/design/lolcats.md §3, §4, §6) stand beside it: other GPUs (A100,
H100) and, at 70B and 405B, other data (RedPajama), so the comparison is of orders, not digits.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
TOKENS_PER_STAGE = 20_000_000  # the paper's budget per stage at every scale (§2: 2 x ~10M; §4: 20M)
MEASURED_SHAPE = "llama3-8b"  # the shape benchmarks.gpu_stage_steps times


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def layer_params(self) -> int:
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.heads * head_dim + 2 * self.hidden * self.kv_heads * head_dim
        return attention + 3 * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + 2 * self.vocab * self.hidden  # untied embedding and lm_head


# Llama 3 / 3.1 configs (hub config.json of each)
SHAPES = {
    "llama3-8b": Shape(4096, 14336, 32, 32, 8, 128256),
    "llama3.1-70b": Shape(8192, 28672, 80, 64, 8, 128256),
    "llama3.1-405b": Shape(16384, 53248, 126, 128, 8, 128256),
}
# LoLCATs' own figures, in GPU-hours and as they state them
REPORTED = {
    "llama3-8b": (6.5, "6.5 GPU-h on one A100-40GB (transfer ~2 h, LoRA ~4.5 h)"),
    "llama3.1-70b": (144.0, "18 h on one 8xH100 node (transfer 4 h, LoRA 14 h)"),
    "llama3.1-405b": (454.0, "transfer 5 h on each of 14 H100s, LoRA 16 h on 3x8 H100s"),
}
STAGES = {"attention-transfer": "transfer_step", "lora-recover": "lora_step"}  # stage -> measured step


def stage_params(shape: Shape, stage: str) -> int:
    """Parameters one token passes through: attention transfer runs the decoder layers only."""
    return shape.layers * shape.layer_params + (shape.vocab * shape.hidden if stage == "lora-recover" else 0)


def project(steps: dict) -> list[dict]:
    """One row per model: GPU-hours per stage and in all, peak memory per stage, GPUs needed, the paper's."""
    measured, tokens = SHAPES[MEASURED_SHAPE], steps["tokens_per_step"]
    gpu_gib = steps["environment"].get("memory_gib")
    rows = []
    for name, shape in SHAPES.items():
        row: dict = {"model": name, "params_b": shape.params / 1e9}
        weights_gib = 2 * shape.params / GIB
        for stage, step_name in STAGES.items():
            step = steps["steps"][step_name]
            seconds_per_token = step["ms"] / 1e3 / tokens
            ratio = stage_params(shape, stage) / stage_params(measured, stage)
            row[f"{stage}_gpu_hours"] = TOKENS_PER_STAGE * seconds_per_token * ratio / 3600
            activations_gib = step["above_start_mib"] / 1024 * (shape.hidden * shape.layers) / (
                measured.hidden * measured.layers)
            row[f"{stage}_peak_gib"] = weights_gib + activations_gib
            row[f"{stage}_gpus"] = (math.ceil(weights_gib / (gpu_gib - activations_gib))
                                    if gpu_gib and activations_gib < gpu_gib else None)
        row["gpu_hours"] = sum(row[f"{stage}_gpu_hours"] for stage in STAGES)
        row["reported_gpu_hours"], row["reported"] = REPORTED[name]
        rows.append(row)
    return rows


def read_steps(path: Path) -> dict | None:
    """The measured steps, or None when the file is absent (no GPU run committed)."""
    return json.loads(path.read_text()) if path.is_file() else None
