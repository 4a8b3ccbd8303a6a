"""LoRA recovery (../shared/design/lolcats.md §3); the student it makes is saved by `pipeline.student`.

peft's `LoraConfig` on q/k/v/o of every layer; `get_peft_model` freezes everything else, so the
transferred feature maps and window factors stay fixed. The no-transfer baseline (§4) instead
trains them together with LoRA, with the same data and steps. The loss is next-token
cross-entropy on response tokens (prompt labels are -100).
"""
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import DatasetDict
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from .config import LoraRecoverConfig
from .data import chunk_length
from .perplexity import split_loss
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


def recover(model: PeftModel, data: DatasetDict, cfg: LoraRecoverConfig, checkpoints: Path,
            log_metrics: LogFn, window_dropout: float = 0.0) -> LoraOutcome:
    """Train the LoRA (and trainable hybrid weights) of `model`, resuming from `checkpoints/lora.pt`.

    `window_dropout`: SSD's start probability over the updates (`WindowDropoutSchedule`); 0 = off."""
    train = data["train"]
    device = next(model.parameters()).device

    def loss(indices: list[int]) -> dict[str, torch.Tensor]:
        # transformers' mean over the response tokens of the whole micro-batch: with several
        # chunks per forward, a chunk weighs by its response tokens (one chunk: its own mean)
        rows = train[indices]
        ids, labels = torch.tensor(rows["input_ids"], device=device), torch.tensor(rows["labels"], device=device)
        return {"loss": model(ids, labels=labels).loss}

    named_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with WindowDropoutSchedule(model, window_dropout, cfg.seed) as dropout:
        result = fit(named_params, loss, range(len(train)),
                     dropout.evaluating(lambda: split_loss(model, data["validation"])),
                     cfg, checkpoints / "lora.pt", "lora-recover", log_metrics, dropout.before_update)
    return LoraOutcome(result, seq_len=chunk_length(data),
                       trainable_params=sum(p.numel() for p in named_params.values()))
