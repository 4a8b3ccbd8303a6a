"""Which architectures `linearize` takes, decided by what their attention does (pipeline/hybrid/support.py).

A table of small random-weight models of each type: every accepted one must place the hybrid
right (window covering the sequence, linear branch off: the teacher's logits), generate with
`HybridCache` exactly as it recomputes, and round-trip through save/load; every refused one must say
why in one line. Models mixing attention with conv/SSM layers are among them: their other layers
keep transformers' own state in `HybridCache`.
"""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kernels.testing import assert_close
from pipeline.hybrid import (HybridCache, HybridConfig, attention_modules, hybrid_state_dict, linearize,
                             load_linearized, save_linearized)
from pipeline.hybrid.attention import TransferLosses
from pipeline.hybrid.support import probe_attention_sites, refusal
from pipeline.teacher import load_tokenizer

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)
ACCEPTED = {
    "llama": {}, "mistral": dict(sliding_window=None), "qwen2": {}, "qwen3": dict(head_dim=16),
    "phi3": dict(pad_token_id=0), "olmo2": {}, "granite": {}, "gemma": dict(head_dim=16), "stablelm": {},
    "cohere": {}, "mixtral": dict(num_local_experts=2, num_experts_per_tok=1, sliding_window=None),
    "qwen2_moe": dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4),  # its module is `.attn`, not `.self_attn`
    # a local layer over its own 12-token window, kept exact (attention.linearize: global_only), and a
    # global one; the prompts (10, 40 tokens) lie inside and far past that window
    "gemma3_text": dict(head_dim=16, sliding_window=12, layer_types=["sliding_attention", "full_attention"]),
    # attention beside conv/SSM layers: a short conv (LFM2), a gated DeltaNet (conv + recurrent state,
    # Qwen3-Next), and Mamba-2 running in the same layer as the attention (Falcon-H1 "hybrid" layers)
    "lfm2": dict(layer_types=["conv", "full_attention"]),
    "qwen3_next": dict(head_dim=16, layer_types=["linear_attention", "full_attention"], num_experts=2,
                       num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                       linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                       linear_value_head_dim=16),
    "falcon_h1": dict(head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                      mamba_n_groups=1, mamba_chunk_size=16),
}
REFUSED = {
    "gemma2": (dict(head_dim=16, attn_logit_softcapping=5.0), "soft-caps its attention scores (softcap 5.0)"),
    "gemma3_text": (dict(head_dim=16, sliding_window=32), "every attention layer of model_type 'gemma3_text' already "
                    "runs over its own sliding window, so attention.linearize: global_only leaves nothing"),
    "mistral": (dict(sliding_window=32), "every attention layer of model_type 'mistral' already runs over its own"),
    "gpt_oss": (dict(num_local_experts=2, num_experts_per_tok=1, head_dim=16), "adds learned attention sinks"),
    "deepseek_v3": (dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                         qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=2, num_experts_per_tok=1,
                         moe_intermediate_size=32, first_k_dense_replace=2),
                    "has q/k head dim 16 but value head dim 8 (MLA-style)"),
    "gptj": (dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8), "has no module that calls transformers' attention"),
    # one attention block shared by several Mamba layers, told its layer at call time (layer_idx -1)
    "zamba2": (dict(num_hidden_layers=3, layers_block_type=["linear_attention", "hybrid", "hybrid"],
                    attention_head_dim=16, mamba_d_state=8, mamba_headdim=16, n_mamba_heads=8, chunk_size=16),
               "model.layers.1.shared_transformer.self_attn of model_type 'zamba2' has layer_idx -1, which names no "
               "decoder layer of its own"),
}
WINDOW = 16  # prompts of 10 and 40 tokens: inside one window and past two


def random_model(model_type: str, extra: dict) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, **{**BASE, **extra})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("model_type", sorted(ACCEPTED))
def test_accepted_architectures_place_generate_and_round_trip(model_type, tmp_path, stories_path):
    ids = torch.randint(3, 128, (1, 40))
    teacher = random_model(model_type, ACCEPTED[model_type])
    with torch.no_grad():
        expected = teacher(ids).logits
        linearize(teacher, HybridConfig(mode="window_only", window="sliding", window_size=64))
        assert (teacher(ids).logits - expected).abs().max() <= 1e-4

    model = linearize(random_model(model_type, ACCEPTED[model_type]),
                      HybridConfig(window_size=WINDOW, feature_init="kaiming", init_gamma=0.5))
    for prompt in (ids[:, :10], ids):
        kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True)
        reference = model.generate(prompt, use_cache=False, **kwargs)
        cached = model.generate(prompt, past_key_values=HybridCache(), **kwargs)
        assert torch.equal(cached.sequences, reference.sequences)
        assert_close("scores", torch.stack(reference.scores), torch.stack(cached.scores))

    teacher_dir = tmp_path / "teacher"
    random_model(model_type, ACCEPTED[model_type]).save_pretrained(teacher_dir)
    load_tokenizer(str(stories_path)).save_pretrained(teacher_dir)  # a saved model carries its teacher's tokenizer
    save_linearized(model, tmp_path / "student", str(teacher_dir))
    reloaded = load_linearized(tmp_path / "student")
    assert all(torch.equal(hybrid_state_dict(reloaded)[n], p) for n, p in hybrid_state_dict(model).items())
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_refused_architectures_say_why_before_any_change(model_type):
    extra, reason = REFUSED[model_type]
    model = random_model(model_type, extra)
    implementation = model.config._attn_implementation
    with pytest.raises(ValueError, match=r"^cannot linearize: ") as caught:
        linearize(model, HybridConfig())
    assert reason in str(caught.value)
    assert model.config._attn_implementation == implementation  # the probe left the model as it was
    assert not any(hasattr(m, "hybrid") for m in model.modules())


def test_a_layer_keeping_key_values_without_an_attention_site_is_refused():
    """An attention computed past the interface would stay softmax, its KV cache beside HybridCache: what
    `refusal` says when the probe misses a layer (here by hiding layer 0's site from it)."""
    model = random_model("llama", {})
    sites = probe_attention_sites(model)
    assert refusal(model, sites) is None
    assert refusal(model, sites[1:]) == ("model_type 'llama' mixes attention with other layers (1 of its 2 decoder "
                                        "layers call the attention interface), and layer 0 (DynamicLayer) keeps "
                                        "a cache HybridCache cannot hold")


def test_a_mixed_model_linearized_all_keeps_its_conv_layers():
    """attention.linearize: all turns only attention layer types global; LFM2's conv layer stays a conv,
    its conv state kept and counted in HybridCache."""
    model = linearize(random_model("lfm2", ACCEPTED["lfm2"]), HybridConfig(window_size=WINDOW, linearize="all"))
    assert model.config.layer_types == ["conv", "full_attention"]
    ids = torch.randint(3, 128, (1, 40))
    kwargs = dict(max_new_tokens=6, do_sample=False)
    cache = HybridCache()
    assert torch.equal(model.generate(ids, past_key_values=cache, **kwargs),
                       model.generate(ids, use_cache=False, **kwargs))
    conv, attention = cache.layers
    assert cache.nbytes() == conv.conv_states[0].nbytes + attention.nbytes() > attention.nbytes() > 0


def test_beam_search_reorders_both_states_of_a_layer_holding_attention_and_ssm():
    """Falcon-H1 runs attention and Mamba-2 in one layer: beams reorder the hybrid's and the SSM's states alike."""
    model = linearize(random_model("falcon_h1", ACCEPTED["falcon_h1"]), HybridConfig(window_size=WINDOW))
    ids = torch.randint(3, 128, (1, 20))
    kwargs = dict(max_new_tokens=5, num_beams=3, do_sample=False)
    assert torch.equal(model.generate(ids, past_key_values=HybridCache(), **kwargs),
                       model.generate(ids, use_cache=False, **kwargs))


def test_a_local_layer_linearized_imitates_its_teachers_window():
    """attention.linearize: all on Mistral with a 12-token sliding window: prompts past the window run
    (no left-padding error), the transfer target is the teacher's windowed softmax (transfer mode hands
    every layer the teacher's output, so the logits are the teacher's), and HybridCache and the stock
    cache (which must now keep every key) generate alike."""
    extra = dict(sliding_window=12)
    ids = torch.randint(3, 128, (1, 40))
    teacher = random_model("mistral", extra)
    with torch.no_grad():
        expected = teacher(ids).logits
    model = linearize(random_model("mistral", extra), HybridConfig(window_size=WINDOW, linearize="all"))
    modules = attention_modules(model)
    assert [m.hybrid.teacher_window for m in modules] == [12, 12] and all(m.hybrid.config.uses_linear for m in modules)
    for module in modules:
        module.hybrid.transfer = TransferLosses(with_xent=False)
    with torch.no_grad():
        assert (model(ids).logits - expected).abs().max() <= 1e-5
    for module in modules:
        module.hybrid.transfer = None
    kwargs = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, past_key_values=HybridCache(), **kwargs),
                       model.generate(ids, use_cache=False, **kwargs))
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))
