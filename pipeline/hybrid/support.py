"""Which attention modules of a model the hybrid replaces, decided from what the model does.

No list of model types: one forward of a few tokens runs under a recording attention implementation
(`PROBE_IMPLEMENTATION`, registered with transformers' `AttentionInterface` like the hybrid itself),
and every module that hands it q, k, v is an attention site, whatever its name (`self_attn`,
`attn`, `attention`). What each site passes tells whether the hybrid can stand in for it: post-RoPE
q [B,H,T,D], un-repeated k, v [B,Hkv,T,D], and no extra term in its softmax. Everything else is
refused before any work, with one line naming the reason; nothing is ever left unswapped silently.
Decoder layers without an attention site are taken when transformers gives them no key/value
cache (conv/SSM mixers, MLP-only layers): `HybridCache` keeps their stock state (cache.py).
"""
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import CacheLayerMixin, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PROBE_IMPLEMENTATION = "lolcats_probe"
PROBE_TOKENS = 4


@dataclass(frozen=True)
class AttentionSite:
    """One attention module as the probe saw it call the attention interface."""
    name: str  # its path in the model, e.g. "model.layers.3.self_attn"
    module: torch.nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int  # of q and k
    value_dim: int
    sliding_window: int | None  # the teacher's own local window, if the layer has one
    softcap: float | None  # tanh soft-capping of the scores (Gemma 2)
    has_sinks: bool  # a learned per-head sink logit in the softmax (gpt-oss)
    is_causal: bool


_recorded: list[tuple[torch.nn.Module, tuple, dict]] | None = None  # filled during a probe only


def _record(module, query, key, value, attention_mask, **kwargs):
    if _recorded is not None:
        _recorded.append((module, (query.shape, key.shape, value.shape), kwargs))
    # answer like SDPA so the forward goes on; extra score terms (softcap, sinks) are only recorded
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                  scaling=kwargs.get("scaling"))


AttentionInterface.register(PROBE_IMPLEMENTATION, _record)
AttentionMaskInterface.register(PROBE_IMPLEMENTATION, sdpa_mask)


def probe_attention_sites(model: PreTrainedModel) -> list[AttentionSite]:
    """Every module that calls the attention interface in one forward, in call (layer) order."""
    global _recorded
    names = {module: name for name, module in model.named_modules()}
    previous = model.config._attn_implementation
    device = next(model.parameters()).device
    ids = torch.arange(PROBE_TOKENS, device=device)[None] % model.config.get_text_config().vocab_size
    _recorded = []
    try:
        model.set_attn_implementation(PROBE_IMPLEMENTATION)
        with torch.no_grad():
            model(input_ids=ids)
        calls = list(_recorded)
    except Exception as e:  # noqa: BLE001  (any model's failure is reported, with its type)
        raise ValueError(f"cannot linearize model_type {model.config.model_type!r}: a {PROBE_TOKENS}-token "
                         f"probe forward failed under the attention interface ({type(e).__name__}: {e})") from e
    finally:
        _recorded = None
        model.set_attn_implementation(previous)
    sites, seen = [], set()
    for module, (q, k, v), kwargs in calls:
        if module in seen:  # a module called twice in one forward is not a plain attention layer
            raise ValueError(f"cannot linearize model_type {model.config.model_type!r}: {names[module]} calls the "
                             "attention interface more than once per forward")
        seen.add(module)
        sites.append(AttentionSite(
            names[module], module, q[1], k[1], q[-1], v[-1], kwargs.get("sliding_window"), kwargs.get("softcap"),
            kwargs.get("s_aux") is not None, bool(getattr(module, "is_causal", True))))
    return sites


def refusal(model: PreTrainedModel, sites: list[AttentionSite]) -> str | None:
    """Why the hybrid cannot replace these sites, or None when it can replace all of them."""
    model_type = model.config.model_type
    if not sites:
        return (f"model_type {model_type!r} has no module that calls transformers' attention interface (it computes "
                "attention in its own code), so there is nothing the hybrid can stand in for")
    reason = _layer_refusal(model_type, model.config.get_text_config(decoder=True), sites)
    if reason is not None:
        return reason
    for site in sites:
        reason = _site_refusal(site)
        if reason is not None:
            return f"{site.name} of model_type {model_type!r} {reason}"
    return None


def _layer_refusal(model_type: str, text_config, sites: list[AttentionSite]) -> str | None:
    """Why HybridCache cannot lay out these layers, or None.

    Each site's state is found by its module's `layer_idx`, so that must name its own decoder layer.
    transformers' own cache layout (`DynamicCache(config=...)`) tells what a layer without a site
    keeps: a conv/SSM state or nothing is kept as it is; a key/value cache means attention computed
    past the interface, which would stay softmax unseen.
    """
    layers = DynamicCache(config=text_config).layers  # the layout transformers gives this model
    indices = [getattr(site.module, "layer_idx", None) for site in sites]
    for site, index in zip(sites, indices):
        if index not in range(len(layers)) or indices.count(index) > 1:
            return (f"{site.name} of model_type {model_type!r} has layer_idx {index!r}, which names no decoder layer "
                    "of its own (a block shared between layers?), so HybridCache cannot tell which state is its")
    for index, layer in enumerate(layers):
        if index not in indices and isinstance(layer, CacheLayerMixin):  # keys and values: unseen softmax
            return (f"model_type {model_type!r} mixes attention with other layers ({len(sites)} of its "
                    f"{len(layers)} decoder layers call the attention interface), and layer {index} "
                    f"({type(layer).__name__}) keeps a cache HybridCache cannot hold")
    return None


def _site_refusal(site: AttentionSite) -> str | None:
    if not site.is_causal:
        return "is not causal attention"
    if site.value_dim != site.head_dim:
        return (f"has q/k head dim {site.head_dim} but value head dim {site.value_dim} (MLA-style); the hybrid's "
                "linear branch needs one head dim")
    if site.num_heads % site.num_kv_heads:
        return f"has {site.num_heads} query heads, not a multiple of its {site.num_kv_heads} key/value heads"
    if site.softcap is not None:
        return f"soft-caps its attention scores (softcap {site.softcap}), which the hybrid's softmax window does not"
    if site.has_sinks:
        return "adds learned attention sinks to its softmax, which the hybrid's softmax window does not"
    return None  # a site's own sliding window is kept or imitated: `attention.linearize`
