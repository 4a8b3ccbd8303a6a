"""Constant-memory generation with `HybridCache` (../shared/design/lolcats.md §7).

Reference everywhere: `generate(use_cache=False)`, which recomputes the whole sequence with the
parallel form at every step. The cache must give the same tokens (and scores) for both window
kinds — terrace models decode with their own terrace window — for prompts shorter and longer
than the window, on stories260K (feature maps randomised so the linear branch matters) and on a
swapped SmolLM2-135M.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM

from kernels.hybrid_attention import DECODE_BACKENDS, fused_recurrent_hybrid_attention
from kernels.testing import assert_close
from pipeline.hybrid import HybridCache, HybridConfig, linearize
from pipeline.hybrid import attention as attention_module
from pipeline.hybrid import cache as cache_module
from pipeline.teacher import load_teacher, load_tokenizer

WINDOW = 8  # stories260K runs: prompts of 5 and 30 tokens sit inside one window and past two
SMOLLM2 = "SmolLM2-135M-Instruct"
SHORT_TEXT = "Once upon a time, there was a little girl named Lily."
LONG_TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park "
             "with her friends, and every day after lunch her mother walked her to the big green gate. ") * 4


def swapped_stories(path, **attention) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    linearize(model, HybridConfig(**{"window_size": WINDOW, "feature_init": "kaiming", "init_gamma": 0.5, **attention}))
    with torch.no_grad():  # trained-looking feature maps: sharp, so linear scores vary between keys
        for p in model.parameters():
            if p.requires_grad and p.dim() == 3:
                p.mul_(4.0)
    return model


def greedy(model, ids, cache: HybridCache | None, **kwargs):
    return model.generate(ids, max_new_tokens=kwargs.pop("max_new_tokens", 12), do_sample=False,
                          past_key_values=cache, use_cache=cache is not None, return_dict_in_generate=True,
                          output_scores=True, **kwargs)


@pytest.mark.parametrize("prompt_length", [5, 30], ids=["prompt-inside-window", "prompt-past-two-windows"])
@pytest.mark.parametrize("mode", ["hybrid", "window_only", "linear_only"])
@pytest.mark.parametrize("window", ["sliding", "terrace"])
def test_cached_greedy_equals_recomputing_on_stories(stories_path, window, mode, prompt_length):
    model = swapped_stories(stories_path, window=window, mode=mode)
    ids = torch.randint(3, model.config.vocab_size, (2, prompt_length))  # batch 2, equal lengths
    reference, cached = greedy(model, ids, None), greedy(model, ids, HybridCache())
    assert torch.equal(cached.sequences, reference.sequences)
    assert_close("scores", torch.stack(reference.scores), torch.stack(cached.scores))


@pytest.mark.parametrize("text", [SHORT_TEXT, LONG_TEXT], ids=["prompt-inside-window", "prompt-past-two-windows"])
@pytest.mark.parametrize("window", ["sliding", "terrace"])
def test_cached_greedy_equals_recomputing_on_smollm2(window, text):
    model = linearize(load_teacher(SMOLLM2), HybridConfig(window=window))
    ids = load_tokenizer(SMOLLM2)(text, return_tensors="pt").input_ids
    assert (ids.shape[1] < 64) == (text == SHORT_TEXT) and (text == SHORT_TEXT or ids.shape[1] > 128)
    reference, cached = greedy(model, ids, None, max_new_tokens=8), greedy(model, ids, HybridCache(), max_new_tokens=8)
    assert torch.equal(cached.sequences, reference.sequences)


def test_the_fused_decode_kernel_generates_the_same_tokens(stories_path, monkeypatch):
    """The Triton step (interpreted here) in place of the PyTorch one, through generate()."""
    monkeypatch.setitem(DECODE_BACKENDS, "torch", fused_recurrent_hybrid_attention)
    model = swapped_stories(stories_path, window="terrace")
    ids = torch.randint(3, model.config.vocab_size, (1, 14))
    reference, cached = greedy(model, ids, None, max_new_tokens=6), greedy(model, ids, HybridCache(), max_new_tokens=6)
    assert torch.equal(cached.sequences, reference.sequences)


def test_the_decode_kernel_applying_the_feature_maps_itself_generates_the_same_tokens(stories_path, monkeypatch):
    """Where the fused maps run (CUDA, bf16; forced here), each decode step is one kernel that applies the
    Hedgehog maps itself (interpreted here): the same tokens as recomputing the whole sequence."""
    monkeypatch.setitem(DECODE_BACKENDS, "torch", fused_recurrent_hybrid_attention)
    monkeypatch.setattr(attention_module, "use_fused_feature_maps", lambda backend, device, dtype: True)
    model = swapped_stories(stories_path, window="sliding")
    hybrid = model.model.layers[0].self_attn.hybrid
    assert hybrid.decode_maps("torch", torch.zeros(1)) is not None
    calls = []
    monkeypatch.setattr(cache_module, "fused_recurrent_hybrid_attention",
                        lambda *args, **kwargs: calls.append(kwargs) or fused_recurrent_hybrid_attention(*args, **kwargs))
    ids = torch.randint(3, model.config.vocab_size, (1, 14))
    reference, cached = greedy(model, ids, None, max_new_tokens=6), greedy(model, ids, HybridCache(), max_new_tokens=6)
    assert torch.equal(cached.sequences, reference.sequences)
    assert calls and all(call["hedgehog"] is not None for call in calls)


def test_sampling_is_reproducible_and_matches_recomputing(stories_path):
    model = swapped_stories(stories_path, window="terrace")
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    runs = []
    for cache in (HybridCache(), HybridCache(), None):
        torch.manual_seed(7)
        runs.append(model.generate(ids, max_new_tokens=12, do_sample=True, top_k=50, past_key_values=cache,
                                   use_cache=cache is not None))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_a_returned_cache_continues_like_one_long_generate(stories_path):
    model = swapped_stories(stories_path, window="sliding")
    ids = torch.randint(3, model.config.vocab_size, (2, 10))
    whole = model.generate(ids, max_new_tokens=16, do_sample=False, past_key_values=HybridCache())
    first = model.generate(ids, max_new_tokens=7, do_sample=False, past_key_values=HybridCache(),
                           return_dict_in_generate=True)
    assert isinstance(first.past_key_values, HybridCache)
    second = model.generate(first.sequences, max_new_tokens=9, do_sample=False, past_key_values=first.past_key_values,
                            return_dict_in_generate=True)
    assert torch.equal(second.sequences, whole)
    # a new turn of several tokens onto the returned cache: consumed token by token, still exact
    turn = torch.cat([second.sequences, torch.randint(3, model.config.vocab_size, (2, 5))], dim=1)
    third = model.generate(turn, max_new_tokens=6, do_sample=False, past_key_values=second.past_key_values)
    assert torch.equal(third, model.generate(turn, max_new_tokens=6, do_sample=False, use_cache=False))


def test_left_padded_rows_generate_as_if_alone(stories_path):
    model = swapped_stories(stories_path, window="terrace")
    long, short = torch.randint(3, 512, (1, 21)), torch.randint(3, 512, (1, 9))
    pad = 0
    ids = torch.cat([long, torch.cat([torch.full((1, 12), pad), short], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :12] = 0
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=pad,
                             past_key_values=HybridCache())
    for row, alone in ((0, long), (1, short)):
        expected = model.generate(alone, max_new_tokens=12, do_sample=False, use_cache=False)
        assert torch.equal(batched[row, ids.shape[1] - alone.shape[1]:], expected[0])


def test_beam_search_reorders_the_state(stories_path):
    model = swapped_stories(stories_path, window="terrace")
    ids = torch.randint(3, 512, (1, 13))
    kwargs = dict(max_new_tokens=8, num_beams=3, do_sample=False)
    assert torch.equal(model.generate(ids, past_key_values=HybridCache(), **kwargs),
                       model.generate(ids, use_cache=False, **kwargs))


def test_cache_memory_does_not_grow_with_the_context(stories_path):
    """The model's own window of 64: at 100 tokens the terrace ring is not even full yet."""
    model = swapped_stories(stories_path, window="terrace", window_size=64)
    sizes = {}
    with torch.no_grad():
        for context in (100, 2000):
            cache = HybridCache()
            ids = torch.randint(3, 512, (1, context))
            logits = model(ids, past_key_values=cache, use_cache=True).logits
            model(logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)  # one decode step
            assert cache.get_seq_length() == context + 1
            sizes[context] = cache.nbytes()
    assert sizes[100] == sizes[2000] > 0


def test_unsupported_uses_are_refused_with_what_to_do(stories_path):
    model = swapped_stories(stories_path, window="sliding")
    ids = torch.randint(3, 512, (2, 6))
    right_padded = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with pytest.raises(ValueError, match="left padding only.*padding_side = 'left'"):
        model(ids, attention_mask=right_padded, past_key_values=HybridCache())
    cache = HybridCache()
    model(ids, past_key_values=cache)
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(-1)
    with pytest.raises(ValueError, match="holds 2 rows but got a batch of 1"):
        model(ids[:1, :1], past_key_values=cache)
    teacher = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32).eval()
    cache = HybridCache()
    teacher(ids, past_key_values=cache)
    with pytest.raises(ValueError, match="model swapped by `linearize`"):
        teacher(ids[:, :1], past_key_values=cache)
