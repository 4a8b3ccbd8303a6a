"""LoRA recovery (../shared/design/lolcats.md §3); the student it makes is saved by `pipeline.student`.

peft's `LoraConfig` on q/k/v/o of every layer; `get_peft_model` freezes everything else, so the
transferred feature maps and window factors stay fixed. The no-transfer baseline (§4) instead
trains them together with LoRA, with the same data and steps. The loss is next-token
cross-entropy on response tokens (prompt labels are -100).

Under torchrun (a `world` of N > 1 ranks) the model is sharded with FSDP2 and each update's forwards
are dealt over the ranks (`pipeline.sharded_training`): the updates of one process, up to float
summation order. N = 1 is one process, with no process group and no FSDP. `activation_checkpointing`
(`lora-recover.activation_checkpointing`) recomputes each decoder layer in the backward pass instead
of keeping its activations: less memory for about one more forward, the same gradients.
"""
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import DatasetDict
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from .config import LoraRecoverConfig
from .data import chunk_length
from .distributed import World
from .hybrid import load_linearized
from .perplexity import split_loss
from .sharded_training import DataParallel, shard
from .throughput import throughput_metrics
from .training import FitResult, LogFn, WindowDropoutSchedule, fit


def add_lora(model: PreTrainedModel, cfg: LoraRecoverConfig, train_feature_maps: bool) -> PeftModel:
    torch.manual_seed(cfg.seed)  # lora_A's random init: the same seed, the same student
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    for name, p in peft_model.named_parameters():
        if ".hybrid." in name:
            p.requires_grad_(train_feature_maps)
    return peft_model


def student_to_train(transfer: str | Path, teacher_source: str, dtype: torch.dtype, device: torch.device | str,
                     cfg: LoraRecoverConfig, train_feature_maps: bool) -> PeftModel:
    """The saved transfer with fresh LoRA: what lora-recover trains, and, on rank 0 of several, the
    unsharded student the trained weights are gathered into (`pipeline.sharded_training.gathered`)."""
    return add_lora(load_linearized(transfer, teacher_source, dtype, device), cfg, train_feature_maps)


@dataclass
class LoraOutcome:
    """What `recover` trained: its fit and what the stage's metrics count beside it."""
    fit: FitResult
    seq_len: int  # tokens per train chunk: what prepare-data cut (every row has as many)
    trainable_params: int

    def curve_rows(self) -> list[dict[str, float | None]]:
        return self.fit.curve_rows()

    def metrics(self, device: torch.device) -> dict[str, float]:
        """Headline figures: validation loss and perplexity before LoRA (paper's PPL@0) and of the best
        weights, and the cost."""
        tokens = self.fit.items_seen * self.seq_len
        return {
            "val_loss_start": self.fit.initial["loss"], "val_ppl_start": self.fit.initial["ppl"],
            "val_loss": self.fit.best["loss"], "val_ppl": self.fit.best["ppl"], "updates": self.fit.updates,
            "train_tokens": tokens, "trainable_params": self.trainable_params,
            **throughput_metrics(tokens, self.fit.wall_time_s, device),
        }


@contextlib.contextmanager
def activation_checkpointing(model: PeftModel, enabled: bool) -> Iterator[None]:
    """transformers' activation checkpointing of every decoder layer while inside, when `enabled`.

    Each layer runs under torch.utils.checkpoint (non-reentrant; FSDP2's hooks stay outside it) and is
    recomputed in the backward. `preserve_rng_state` replays torch's RNG for the recompute, so a hybrid
    layer redraws the same window-dropout coin, and the recompute's draws are forked off, so later
    forwards draw what they draw without checkpointing: the same gradients. transformers checkpoints a
    layer only in training mode while the teacher loads in eval mode, so the layers' own flag is set
    (not `.train()`, which would reach the attention and LoRA dropout inside them) and put back after."""
    if not enabled:
        yield
        return
    base = model.get_base_model()
    layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    modes = [layer.training for layer in layers]
    base.activation_checkpointing_enable({"use_reentrant": False, "preserve_rng_state": True})
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        base.activation_checkpointing_disable()
        for layer, mode in zip(layers, modes):
            layer.training = mode


def recover(model: PeftModel, data: DatasetDict, cfg: LoraRecoverConfig, checkpoints: Path,
            log_metrics: LogFn, window_dropout: float = 0.0, world: World = World()) -> LoraOutcome:
    """Train the LoRA (and trainable hybrid weights) of `model`, resuming from `checkpoints/lora.pt`.

    `window_dropout`: SSD's start probability over the updates (`WindowDropoutSchedule`); 0 = off.
    `world` of N > 1 ranks: `model` (each rank's whole copy) is sharded in place first, and stays so;
    `pipeline.sharded_training.gathered` makes an unsharded student of it."""
    train = data["train"]
    device = next(model.parameters()).device
    trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def loss(indices: list[int]) -> dict[str, torch.Tensor]:
        # transformers' mean over the response tokens of the whole micro-batch: with several
        # chunks per forward, a chunk weighs by its response tokens (one chunk: its own mean)
        rows = train[indices]
        ids, labels = torch.tensor(rows["input_ids"], device=device), torch.tensor(rows["labels"], device=device)
        return {"loss": model(ids, labels=labels).loss}

    with (activation_checkpointing(model, cfg.activation_checkpointing),
          WindowDropoutSchedule(model, window_dropout, cfg.seed) as dropout):
        evaluate = dropout.evaluating(lambda: split_loss(model, data["validation"]))
        processes = None  # one process: fit's own
        if world.size > 1:
            shard(model, world)
            processes = DataParallel(model, world, dropout.skip_forward)
            evaluate = processes.evaluating(evaluate)
        named_params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # sharded: DTensors
        result = fit(named_params, loss, range(len(train)), evaluate, cfg, checkpoints / "lora.pt", "lora-recover",
                     log_metrics, dropout.before_update, processes)
    return LoraOutcome(result, seq_len=chunk_length(data), trainable_params=trainable_params)
