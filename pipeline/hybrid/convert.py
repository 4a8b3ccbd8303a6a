"""Swap every softmax attention of a transformers causal LM for the hybrid, and save/load the result.

../shared/design/lolcats.md §1.1, §2. No modeling code is copied: `linearize` registers
`hybrid_attention_forward` with transformers' `AttentionInterface` (plus a mask builder, without
which transformers passes no mask), attaches a `HybridAttention` to each attention module as
`self_attn.hybrid`, freezes everything else, and switches the model's attention implementation.
A forward pre-hook on each attention module shows its `hybrid` the `HybridCache` of the current
call (transformers does not pass the cache to attention functions; see cache.py).
A linearized model is saved as its new weights only (safetensors) plus `hybrid_config.json`.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..io import atomic_write, atomic_write_json, file_digest
from ..teacher import load_teacher
from .attention import HybridAttention, hybrid_attention_forward
from .cache import HybridCache
from .config import HybridConfig

ATTN_IMPLEMENTATION = "lolcats_hybrid"
WEIGHTS_FILE = "hybrid_attention.safetensors"
CONFIG_FILE = "hybrid_config.json"

# Architectures whose attention modules call the attention interface with post-RoPE q and
# un-repeated k/v, and live at `model.layers[i].self_attn` (tested with random weights).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

AttentionInterface.register(ATTN_IMPLEMENTATION, hybrid_attention_forward)
# sdpa's builder returns None when nothing is padded, a boolean mask otherwise (checked by the forward).
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The attention module of every decoder layer, in layer order."""
    return [m for name, m in model.named_modules() if name.endswith(".self_attn")]


def _show_cache(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("past_key_values")
    module.hybrid.cache = cache if isinstance(cache, HybridCache) else None


def _hide_cache(module: torch.nn.Module, args: tuple, kwargs: dict, output) -> None:
    module.hybrid.cache = None  # no reference to the cache outlives the call


def linearize(model: PreTrainedModel, config: HybridConfig) -> PreTrainedModel:
    """Swap in place; afterwards only feature maps and window factors require grad."""
    model_type = model.config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"cannot linearize model_type {model_type!r}: supported are {list(SUPPORTED_MODEL_TYPES)}")
    text_config = model.config.get_text_config()
    num_heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
    model.requires_grad_(False)
    device = next(model.parameters()).device
    for module in attention_modules(model):
        # fp32 masters for the new weights whatever the model dtype ([ours], spec §2)
        module.hybrid = HybridAttention(config, num_heads, head_dim).to(device=device, dtype=torch.float32)
        module.register_forward_pre_hook(_show_cache, with_kwargs=True)
        module.register_forward_hook(_hide_cache, with_kwargs=True, always_call=True)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def hybrid_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the weights the swap added (feature maps, window factors), by their model names."""
    return {name: p.detach() for name, p in model.named_parameters() if ".hybrid." in name}


def hybrid_config(model: PreTrainedModel) -> HybridConfig:
    """The config a model was linearized with."""
    modules = attention_modules(model)
    if not modules or not hasattr(modules[0], "hybrid"):
        raise ValueError("this model has not been linearized")
    return modules[0].hybrid.config


def save_linearized(model: PreTrainedModel, folder: str | Path, teacher_source: str) -> None:
    """Write the new weights and the config that rebuilds them; files land whole or not at all."""
    config = hybrid_config(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.contiguous().cpu() for name, t in hybrid_state_dict(model).items()}
    meta = {"teacher_source": teacher_source, "attention": config.to_dict()}
    atomic_write(folder / WEIGHTS_FILE, lambda path: save_file(tensors, path))
    atomic_write_json(folder / CONFIG_FILE, meta)


def linearized_digest(folder: str | Path) -> str:
    """Identifies a saved linearized model (sha256 of its weights file)."""
    return file_digest(Path(folder) / WEIGHTS_FILE)


def load_linearized(folder: str | Path, teacher_source: str | None = None,
                    dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Teacher (from `teacher_source`, default the one recorded) + swap + the saved hybrid weights."""
    folder = Path(folder)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    model = load_teacher(teacher_source or meta["teacher_source"], dtype=dtype)
    model = linearize(model, HybridConfig(**meta["attention"]))
    weights = load_file(str(folder / WEIGHTS_FILE))
    expected = set(hybrid_state_dict(model))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(f"{folder / WEIGHTS_FILE} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    model.load_state_dict(weights, strict=False)
    return model
