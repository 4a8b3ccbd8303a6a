"""The hybrid swapped into real transformers models (../shared/design/lolcats.md §1.1-§1.4)."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.hybrid import HybridConfig, hybrid_state_dict, linearize, load_linearized, save_linearized

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
# Random-weight models of the other supported shapes (Qwen3 adds q/k norms before RoPE).
OTHER_ARCHITECTURES = {
    "mistral": dict(TINY, sliding_window=None),
    "qwen2": dict(TINY),
    "qwen3": dict(TINY, head_dim=16),
}


def stories(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def random_model(model_type: str) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, **OTHER_ARCHITECTURES[model_type])
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("window", ["sliding", "terrace"])
def test_window_only_over_the_whole_sequence_reproduces_the_teacher(stories_path, window):
    """RoPE, GQA and scaling are placed right: softmax over all keys is the teacher's attention."""
    model = stories(stories_path)
    ids = torch.randint(0, model.config.vocab_size, (2, 200))
    with torch.no_grad():
        teacher = model(ids).logits
        linearize(model, HybridConfig(mode="window_only", window=window, window_size=256))
        student = model(ids).logits
    assert (student - teacher).abs().max() <= 1e-4


@pytest.mark.parametrize("model_type", sorted(OTHER_ARCHITECTURES))
def test_other_architectures_swap_and_match_the_teacher(model_type):
    model = random_model(model_type)
    ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        teacher = model(ids).logits
        linearize(model, HybridConfig(mode="window_only", window="sliding", window_size=64))
        student = model(ids).logits
    assert (student - teacher).abs().max() <= 1e-4
    model = linearize(random_model(model_type), HybridConfig())
    model(ids).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_only_feature_maps_and_window_factors_train(stories_path):
    model = linearize(stories(stories_path), HybridConfig())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(hybrid_state_dict(model))
    # spec §1.4 per layer: H heads x 2 maps x D x F' + H window factors (stories260K: H 8, D 8)
    layers, heads, head_dim = 5, 8, 8
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == layers * (heads * 2 * head_dim * 64 + heads)

    ids = torch.randint(0, 512, (1, 150))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == trainable and all(g.abs().sum() > 0 for g in grads.values())


def test_greedy_generate_on_the_swapped_model_picks_its_forwards_argmax(stories_path):
    """Every new token is the argmax of the hybrid's own full forward over what precedes it: generate()
    decodes through the swapped attention, past the window (8) and with its cache, not around them."""
    model = linearize(stories(stories_path), HybridConfig(window_size=8))
    ids = torch.tensor([[1, 403, 407, 261, 378]])
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert out.shape == (1, 25) and torch.equal(out[:, :5], ids)
    with torch.no_grad():
        logits = model(out).logits
    assert torch.equal(out[:, 5:], logits[:, 4:-1].argmax(-1))


def test_save_and_load_rebuild_the_same_model(stories_path, tmp_path):
    model = linearize(stories(stories_path), HybridConfig(window="sliding", window_size=16))
    with torch.no_grad():  # move the weights away from their init so the load is visible
        for p in hybrid_state_dict(model).values():
            p.add_(torch.randn_like(p) * 0.1)
    save_linearized(model, tmp_path, teacher_source=str(stories_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "hybrid_attention.safetensors",
                                                          "tokenizer.json", "tokenizer_config.json"]
    loaded = load_linearized(tmp_path)
    ids = torch.randint(0, 512, (1, 100))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_left_padding_is_refused_right_padding_is_exact(stories_path):
    model = linearize(stories(stories_path), HybridConfig(window_size=8))
    ids = torch.randint(3, 512, (1, 30))
    with torch.no_grad():
        alone = model(ids).logits
        right = model(torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1),
                      attention_mask=torch.cat([torch.ones(1, 30), torch.zeros(1, 5)], 1).long()).logits
        assert (right[:, :30] - alone).abs().max() <= 1e-5
        with pytest.raises(ValueError, match="left padding"):
            model(torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1),
                  attention_mask=torch.cat([torch.zeros(1, 5), torch.ones(1, 30)], 1).long())
