"""Which attention modules of a model the hybrid replaces, decided from what the model does.

No list of model types: one forward of a few tokens runs under a recording attention implementation
(`PROBE_IMPLEMENTATION`, registered with transformers' `AttentionInterface` like the hybrid itself),
and every module that hands it q, k, v is an attention site, whatever its name (`self_attn`,
`attn`, `attention`). What each site passes tells whether the hybrid can stand in for it: post-RoPE
q [B,H,T,D], un-repeated k, v [B,Hkv,T,D], and no extra term in its softmax. Everything else is
refused before any work, with one line naming the reason; nothing is ever left unswapped silently.
"""
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PreTrainedModel
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
    layers = model.config.get_text_config().num_hidden_layers
    if not sites:
        return (f"model_type {model_type!r} has no module that calls transformers' attention interface (it computes "
                "attention in its own code), so there is nothing the hybrid can stand in for")
    if len(sites) != layers:
        return (f"model_type {model_type!r} mixes attention with other layers ({len(sites)} of its {layers} "
                "decoder layers call the attention interface); their conv/SSM state has no place in HybridCache yet")
    for site in sites:
        reason = _site_refusal(site)
        if reason is not None:
            return f"{site.name} of model_type {model_type!r} {reason}"
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
