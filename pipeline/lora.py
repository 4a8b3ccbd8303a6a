"""LoRA recovery (../shared/design/lolcats.md §3) and the complete student on disk.

peft's `LoraConfig` on q/k/v/o of every layer; `get_peft_model` freezes everything else, so the
transferred feature maps and window factors stay fixed. The no-transfer baseline (§4) instead
trains them together with LoRA, with the same data and steps. The loss is next-token
cross-entropy on response tokens (prompt labels are -100).

A student folder holds the hybrid weights (`save_linearized`) and the adapter (peft
`save_pretrained`); `load_student` rebuilds the whole model from the teacher source and it.
"""
import json
from pathlib import Path

import torch
from datasets import DatasetDict
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from .config import LoraRecoverConfig
from .hybrid import load_linearized, save_linearized
from .io import atomic_dir
from .perplexity import split_loss
from .training import FitResult, LogFn, fit


def add_lora(model: PreTrainedModel, cfg: LoraRecoverConfig, train_feature_maps: bool) -> PeftModel:
    torch.manual_seed(cfg.seed)  # lora_A's random init: the same seed, the same student
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    for name, p in peft_model.named_parameters():
        if ".hybrid." in name:
            p.requires_grad_(train_feature_maps)
    return peft_model


def recover(model: PeftModel, data: DatasetDict, cfg: LoraRecoverConfig, checkpoint: Path,
            log_metrics: LogFn) -> FitResult:
    train = data["train"]
    device = next(model.parameters()).device

    def loss(indices: list[int]) -> dict[str, torch.Tensor]:
        # transformers' mean over the response tokens of the whole micro-batch: with several
        # chunks per forward, a chunk weighs by its response tokens (one chunk: its own mean)
        rows = train[indices]
        ids, labels = torch.tensor(rows["input_ids"], device=device), torch.tensor(rows["labels"], device=device)
        return {"loss": model(ids, labels=labels).loss}

    named_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return fit(named_params, loss, range(len(train)), lambda: split_loss(model, data["validation"]),
               cfg, checkpoint, "lora-recover", log_metrics)


ADAPTER_CONFIG = "adapter_config.json"  # peft's name for it


def save_student(model: PeftModel, folder: str | Path, teacher_source: str) -> None:
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        _sort_target_modules(tmp / ADAPTER_CONFIG)
        save_linearized(model.get_base_model(), tmp, teacher_source)


def _sort_target_modules(path: Path) -> None:
    """peft writes `target_modules` from a set, in an order that changes from process to process
    (string hashing is salted), so the same weights would give a new file and a new DVC hash."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True))  # peft's own layout


def load_student(folder: str | Path, teacher_source: str | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> PeftModel:
    """The linearized teacher with its saved hybrid weights and LoRA adapter, ready for inference."""
    base = load_linearized(folder, teacher_source, dtype, device)
    return PeftModel.from_pretrained(base, str(folder)).eval()
