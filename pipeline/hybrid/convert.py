"""Swap every softmax attention of a transformers causal LM for the hybrid, and save/load the result.

../shared/design/lolcats.md §1.1, §2. No modeling code is copied and no model type is listed: `linearize`
finds the attention modules by what they do (`support.py`), registers
`hybrid_attention_forward` with transformers' `AttentionInterface` (plus a mask builder, without
which transformers passes no mask), attaches a `HybridAttention` to each attention module as
`self_attn.hybrid`, freezes everything else, and switches the model's attention implementation.
A forward pre-hook on each attention module shows its `hybrid` the `HybridCache` of the current
call (transformers does not pass the cache to attention functions; see cache.py), and one on the
model lays out a fresh `HybridCache` for its layers (`HybridCache.fit`: conv/SSM layers keep
transformers' own state classes).
A linearized model is saved as its new weights only (safetensors), `config.json` (model_type `lolcats`:
the teacher by a stable id and the HybridConfig; `pipeline.auto` registers it with transformers' Auto
classes) and the teacher's tokenizer.
"""
import dataclasses
import functools
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from ..io import atomic_write, atomic_write_json, file_digest
from ..params import ConfigError
from ..teacher import check_teacher, load_teacher, load_tokenizer, teacher_reference
from .attention import HybridAttention, hybrid_attention_forward
from .cache import HybridCache
from .decode_graph import is_one_token_step
from .config import HybridConfig
from .support import probe_attention_sites, refusal

ATTN_IMPLEMENTATION = "lolcats_hybrid"
WEIGHTS_FILE = "hybrid_attention.safetensors"
CONFIG_FILE = "config.json"  # transformers' name: AutoConfig reads it (`pipeline.auto` registers the type)
MODEL_TYPE = "lolcats"


def causal_padding_mask(*args, local_size: int | None = None, **kwargs):
    """transformers' mask for our implementation: causal + padding only, sliding windows left out.

    Every attention site carries a hybrid that applies its own window (a teacher's local layer kept
    exact is a window-only hybrid over that window), and reads padding from the mask's last row; a
    sliding mask there would look like left padding. sdpa's builder returns None when nothing is
    padded, a boolean mask otherwise (checked by the forward).
    """
    if local_size is not None:
        kwargs["mask_function"] = causal_mask_function
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, hybrid_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, causal_padding_mask)


def attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The attention modules `linearize` gave a hybrid, in layer order."""
    return [m for m in model.modules() if isinstance(getattr(m, "hybrid", None), HybridAttention)]


def _show_cache(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("past_key_values")
    module.hybrid.cache = cache if isinstance(cache, HybridCache) else None


def _fit_cache(model: PreTrainedModel, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("past_key_values")
    if isinstance(cache, HybridCache) and not cache.layers:
        cache.fit(model.config, {module.layer_idx for module in attention_modules(model)})


def _hide_cache(module: torch.nn.Module, args: tuple, kwargs: dict, output) -> None:
    module.hybrid.cache = None  # no reference to the cache outlives the call


def linearize(model: PreTrainedModel, config: HybridConfig) -> PreTrainedModel:
    """Swap in place; afterwards only feature maps and window factors require grad.

    The attention modules are found by a probe forward (`support.py`); a model the hybrid cannot
    stand in for is refused with a `ValueError` naming the reason, before anything changes.
    """
    sites = probe_attention_sites(model)
    reason = refusal(model, sites)
    if reason is None and config.linearize == "global_only" and all(s.sliding_window for s in sites):
        reason = (f"every attention layer of model_type {model.config.model_type!r} already runs over its own sliding "
                  "window, so attention.linearize: global_only leaves nothing to linearize; set it to all")
    if reason is not None:
        raise ValueError(f"cannot linearize: {reason}")
    model.requires_grad_(False)
    device = next(model.parameters()).device
    for site in sites:
        layer_config = config
        if site.sliding_window is not None and config.linearize == "global_only":
            # exact softmax over the teacher's own window: a window-only hybrid, no weights
            layer_config = dataclasses.replace(config, mode="window_only", window="sliding",
                                               window_size=site.sliding_window)
        # fp32 masters for the new weights whatever the model dtype ([ours], spec §2)
        hybrid = HybridAttention(layer_config, site.num_heads, site.head_dim).to(device=device, dtype=torch.float32)
        hybrid.teacher_window = site.sliding_window
        site.module.hybrid = hybrid
        site.module.register_forward_pre_hook(_show_cache, with_kwargs=True)
        site.module.register_forward_hook(_hide_cache, with_kwargs=True, always_call=True)
    model.register_forward_pre_hook(_fit_cache, with_kwargs=True)
    _hybrid_cache_by_default(model)
    _decode_steps_through_graphs(model)
    if config.linearize == "all":  # every layer is global now: the stock KV cache must keep every key
        _drop_sliding_windows(model.config.get_text_config())
    model.lolcats_hybrid_config = config
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def _hybrid_cache_by_default(model: PreTrainedModel) -> None:
    """`generate()` without a cache gets a `HybridCache` (constant memory) where transformers would make a
    `DynamicCache`; a cache passed in, `cache_implementation` or `use_cache=False` are left to transformers."""
    stock = model._prepare_cache_for_generation

    def prepare(generation_config, model_kwargs: dict, *args, **kwargs):
        if (model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False
                and generation_config.cache_implementation is None):
            model_kwargs["past_key_values"] = HybridCache()
            return None
        return stock(generation_config, model_kwargs, *args, **kwargs)

    model._prepare_cache_for_generation = prepare


def _decode_steps_through_graphs(model: PreTrainedModel) -> None:
    """A one-token step onto a `HybridCache(cuda_graph=True)` replays its captured graph (decode_graph.py);
    every other call runs the model's own forward."""
    eager = model.forward

    @functools.wraps(eager)
    def forward(*args, **kwargs):
        cache = kwargs.get("past_key_values")
        graphed = isinstance(cache, HybridCache) and cache.graphs is not None
        if graphed and not args and is_one_token_step(cache, kwargs):
            return cache.graphs.step(model, eager, cache, kwargs)
        return eager(*args, **kwargs)

    model.forward = forward


# a local layer type -> its global one ("hybrid_sliding": attention beside a conv/SSM mixer, over a window)
_GLOBAL_KIND = {"sliding_attention": "full_attention", "chunked_attention": "full_attention",
                "hybrid_sliding": "hybrid"}


def _drop_sliding_windows(text_config) -> None:
    """Make transformers treat every attention layer as global (its DynamicCache would keep only a window of
    keys); conv/SSM layer types stay, since their modules and caches are chosen by them."""
    if getattr(text_config, "layer_types", None) is not None:
        text_config.layer_types = [_GLOBAL_KIND.get(kind, kind) for kind in text_config.layer_types]
    if getattr(text_config, "sliding_window", None) is not None:
        text_config.sliding_window = None


def hybrid_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the weights the swap added (feature maps, window factors), by their model names."""
    return {name: p.detach() for name, p in model.named_parameters() if ".hybrid." in name}


def hybrid_config(model: PreTrainedModel) -> HybridConfig:
    """The config a model was linearized with (a teacher's local layer kept exact has its own)."""
    if not hasattr(model, "lolcats_hybrid_config"):
        raise ValueError("this model has not been linearized")
    return model.lolcats_hybrid_config


def save_linearized(model: PreTrainedModel, folder: str | Path, teacher_source: str) -> None:
    """Write the new weights, the config that rebuilds them and the teacher's tokenizer; files land
    whole or not at all."""
    config = hybrid_config(model)
    if getattr(model, "lolcats_lora_merged", False):
        raise ValueError("this model's LoRA is merged into the teacher's weights, which a saved folder does not "
                         "hold: load it with merge_lora=False and save it with pipeline.student.save_student")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.contiguous().cpu() for name, t in hybrid_state_dict(model).items()}
    meta = {"architectures": ["LolcatsForCausalLM"], "model_type": MODEL_TYPE, **teacher_reference(teacher_source),
            "attention": config.to_dict()}
    atomic_write(folder / WEIGHTS_FILE, lambda path: save_file(tensors, path))
    load_tokenizer(teacher_source).save_pretrained(folder)
    atomic_write_json(folder / CONFIG_FILE, meta)  # last: a folder with its config is complete


def linearized_digest(folder: str | Path) -> str:
    """Identifies a saved linearized model (sha256 of its weights file)."""
    return file_digest(Path(folder) / WEIGHTS_FILE)


def saved_config(folder: str | Path) -> dict:
    """The config.json of a folder `save_linearized` wrote; a clear error for any other folder."""
    path = Path(folder) / CONFIG_FILE
    meta = json.loads(path.read_text()) if path.is_file() else {}
    if meta.get("model_type") != MODEL_TYPE:
        legacy = " (it holds hybrid_config.json: written before config.json; run `dvc repro` anew)" if (
            Path(folder) / "hybrid_config.json").is_file() else ""
        raise ConfigError(f"{folder}: not a saved linearized model (no {CONFIG_FILE} of model_type {MODEL_TYPE!r}){legacy}")
    return meta


def is_saved_linearized(folder: str | Path) -> bool:
    path = Path(folder) / CONFIG_FILE
    return path.is_file() and json.loads(path.read_text()).get("model_type") == MODEL_TYPE


def load_linearized(folder: str | Path, teacher_source: str | None = None, dtype: torch.dtype | str | None = None,
                    device: torch.device | str = "cpu") -> PreTrainedModel:
    """Teacher (from `teacher_source`, default the one recorded, checked) + swap + the saved hybrid weights.

    `dtype`: the teacher's; None loads it in fp32 (the CPU default's precision)."""
    folder = Path(folder)
    meta = saved_config(folder)
    if teacher_source is None:
        teacher_source = meta["teacher_source"]
        check_teacher(teacher_source, meta.get("teacher_sha256"), folder)
    model = load_teacher(teacher_source, torch.float32 if dtype is None else dtype, device)
    model = linearize(model, HybridConfig(**meta["attention"]))
    weights = load_file(str(folder / WEIGHTS_FILE), device=str(device))
    expected = set(hybrid_state_dict(model))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(f"{folder / WEIGHTS_FILE} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    model.load_state_dict(weights, strict=False)
    return model
