"""Training stages on the real stories260K model and real Alpaca rows (../shared/design/lolcats.md §2-§4)."""
import math

import pytest
import torch

from pipeline.config import AttentionTransferConfig, CacheTeacherAttnConfig, HybridConfig, LoraRecoverConfig, PrepareDataConfig
from pipeline.data import prepare_alpaca, read_alpaca_rows
from pipeline.hybrid import hybrid_state_dict, linearize, save_linearized
from pipeline.lora import add_lora, load_student, recover, save_student
from pipeline.params import ConfigError
from pipeline.perplexity import split_loss
from pipeline.teacher import load_teacher, load_tokenizer
from pipeline.teacher_states import TeacherStates, write_teacher_states
from pipeline.training import NonFiniteError, fit
from pipeline.transfer import train_block, transfer_all_blocks
from tests.conftest import SHARED

TRANSFER = AttentionTransferConfig(epochs=2, grad_accum=2, eval_every=2)
ATTENTION = HybridConfig(window_size=16)


@pytest.fixture(scope="module")
def data(stories_path):
    cfg = PrepareDataConfig(seq_len=128, max_train_tokens=128 * 6, max_val_tokens=128 * 2, val_rows=20)
    rows = read_alpaca_rows(str(SHARED / "data" / "alpaca" / "train.jsonl"))
    return prepare_alpaca(rows, load_tokenizer(str(stories_path)), cfg).dataset


@pytest.fixture(scope="module")
def states(stories_path, data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("states")
    write_teacher_states(load_teacher(str(stories_path)), data, CacheTeacherAttnConfig(block_size=2), folder)
    return TeacherStates.open(folder)


def student(stories_path):
    return linearize(load_teacher(str(stories_path)), ATTENTION)


def test_cache_holds_the_raw_residual_entering_each_block(stories_path, data, states):
    assert states.blocks == [range(0, 2), range(2, 4), range(4, 5)]
    teacher = load_teacher(str(stories_path))
    ids = torch.tensor([data["train"][3]["input_ids"]])
    with torch.no_grad():
        hidden = teacher(ids, output_hidden_states=True).hidden_states
    for block, layers in enumerate(states.blocks):
        cached = states.read(block, "train", 3)
        assert cached.dtype == torch.bfloat16 and cached.shape == (1, 128, 64)
        assert torch.allclose(cached.float(), hidden[layers.start], atol=2e-2, rtol=1e-2)


def test_cache_size_is_checked_before_writing(stories_path, data, tmp_path):
    with pytest.raises(ConfigError, match=r"^cache-teacher-attn.max_cache_gb: the cache needs"):
        write_teacher_states(load_teacher(str(stories_path)), data, CacheTeacherAttnConfig(max_cache_gb=1e-6), tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_transfer_lowers_every_layers_mse_and_trains_only_its_block(stories_path, states, tmp_path):
    model = student(stories_path)
    before = {n: p.clone() for n, p in hybrid_state_dict(model).items()}
    result = train_block(1, states, model, TRANSFER, tmp_path / "b1.pt", lambda m, s: None)
    assert result.layers == [2, 3]
    assert all(result.mse_after[i] < result.mse_before[i] for i in result.layers)
    changed = {n for n, p in hybrid_state_dict(model).items() if not torch.equal(p, before[n])}
    assert changed and all(".layers.2." in n or ".layers.3." in n for n in changed)


def test_transfer_is_deterministic_and_resumes_to_the_same_result(stories_path, states, tmp_path):
    reference = transfer_all_blocks(student(stories_path), states, TRANSFER, tmp_path / "a", lambda m, s: None)
    again = transfer_all_blocks(student(stories_path), states, TRANSFER, tmp_path / "b", lambda m, s: None)
    assert again.per_layer_rows() == reference.per_layer_rows()

    # a run that dies after its first validation pass, then a fresh process resuming from its checkpoint
    calls = {"n": 0}
    model = student(stories_path)

    def dying_metrics(metrics, step):
        calls["n"] += 1
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_block(0, states, model, TRANSFER, tmp_path / "c" / "block_000.pt", dying_metrics)
    assert (tmp_path / "c" / "block_000.pt").exists()
    resumed = transfer_all_blocks(student(stories_path), states, TRANSFER, tmp_path / "c", lambda m, s: None)
    assert resumed.per_layer_rows() == reference.per_layer_rows()


def test_non_finite_loss_stops_training_naming_the_part(stories_path, states, tmp_path):
    model = student(stories_path)
    weight = next(iter(p for n, p in model.named_parameters() if ".layers.4." in n and "feature_map_q" in n))
    with torch.no_grad():
        weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"block 2 \(layers 4-4\): non-finite"):
        train_block(2, states, model, TRANSFER, tmp_path / "n.pt", lambda m, s: None)


def test_fit_names_a_non_finite_gradient(tmp_path):
    p = torch.nn.Parameter(torch.ones(3))
    cfg = AttentionTransferConfig(epochs=1, grad_accum=1, eval_every=1)
    loss = lambda i: {"loss": (p * p).sum()}
    p.register_hook(lambda g: g * float("nan"))
    with pytest.raises(NonFiniteError, match="non-finite gradient of w at update 1"):
        fit({"w": p}, loss, [0, 1], lambda: {"loss": 0.0}, cfg, tmp_path / "c.pt", "test", lambda m, s: None)


def test_lora_recovers_and_the_student_reloads(stories_path, data, states, tmp_path):
    model = student(stories_path)
    transfer_all_blocks(model, states, TRANSFER, tmp_path / "t", lambda m, s: None)
    save_linearized(model, tmp_path / "transfer", str(stories_path))
    cfg = LoraRecoverConfig(epochs=1, grad_accum=2, eval_every=1, lr=1e-3)
    peft_model = add_lora(model, cfg, train_feature_maps=False)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # r x (in + out) per projection: q (64+64), k (64+32), v (64+32), o (64+64), 5 layers
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == 5 * 8 * (128 + 96 + 96 + 128)
    result = recover(peft_model, data, cfg, tmp_path / "lora.pt", lambda m, s: None)
    assert result.best["loss"] <= result.initial["loss"] and math.isfinite(result.best["ppl"])
    save_student(peft_model, tmp_path / "student", str(stories_path))
    reloaded = load_student(tmp_path / "student")
    assert split_loss(reloaded, data["validation"])["loss"] == pytest.approx(result.best["loss"], rel=1e-5)


def test_no_transfer_baseline_trains_feature_maps_with_lora(stories_path):
    peft_model = add_lora(student(stories_path), LoraRecoverConfig(), train_feature_maps=True)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any(".hybrid.feature_map_q" in n for n in trainable) and any(".hybrid.window_factors" in n for n in trainable)
    assert any("lora_A" in n for n in trainable)


def test_lora_init_follows_the_seed(stories_path):
    def lora_a(seed):
        model = add_lora(student(stories_path), LoraRecoverConfig(seed=seed), train_feature_maps=False)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    first, again, other = lora_a(0), lora_a(0), lora_a(1)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)
