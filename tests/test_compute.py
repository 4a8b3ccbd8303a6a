"""The `compute` block, the Triton fallback of `attention.backend: auto`, online teacher states, the GPU recipe."""
import json
import logging

import pytest
import torch

from benchmarks.h200.pipeline.recipe import apply, readme_overrides
from kernels.hybrid_attention import chunk_refusal, hybrid_attention_chunk
from pipeline import config
from pipeline.config import AttentionTransferConfig, CacheTeacherAttnConfig, ComputeConfig, HybridConfig, PrepareDataConfig
from pipeline.data import prepare_alpaca, read_alpaca_rows
from pipeline.hybrid import hybrid_state_dict, linearize
from pipeline.hybrid import attention as attention_module
from pipeline.hybrid.attention import HybridAttention, resolve_backend
from pipeline.params import ConfigError, build_block, build_entry, read_params
from pipeline.teacher import load_teacher, load_tokenizer
from pipeline.teacher_states import TeacherStates, write_teacher_states
from pipeline.transfer import transfer_all_blocks
from tests.conftest import REPO, SHARED

CUDA = torch.device("cuda")


def test_auto_compute_is_the_cpu_in_fp32_without_a_gpu():
    assert not torch.cuda.is_available()  # the suite's machines have none
    assert (ComputeConfig().torch_device, ComputeConfig().torch_dtype) == (torch.device("cpu"), torch.float32)


def test_auto_compute_is_cuda_in_bf16_where_torch_sees_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (ComputeConfig().torch_device, ComputeConfig().torch_dtype) == (CUDA, torch.bfloat16)
    assert ComputeConfig(dtype="float32").torch_dtype == torch.float32
    assert ComputeConfig(device="cuda:1").torch_device == torch.device("cuda:1")
    assert ComputeConfig(device="cpu").torch_dtype == torch.float32


def test_cuda_asked_for_without_a_gpu_names_the_key():
    with pytest.raises(ConfigError, match=r"^compute.device: 'cuda' asked for, but torch sees no CUDA device"):
        ComputeConfig(device="cuda").torch_device


@pytest.mark.parametrize("head_dim, dtype, reason", [
    (512, torch.bfloat16, "the triton backend needs the head dim to be in [1, 256]"),
    (256, torch.bfloat16, None),  # Gemma 3: two D tiles of 128
    (8, torch.bfloat16, None),  # stories260K, padded to 16
    (96, torch.bfloat16, None),  # Phi-3, padded to 128
    (64, torch.float32, "takes bf16 or fp16 on CUDA, not fp32"),
    (64, torch.bfloat16, None),  # SmolLM2, Llama-3
])
def test_the_kernels_say_which_shapes_they_refuse(head_dim, dtype, reason):
    refusal = chunk_refusal(head_dim, 128, 64, "terrace", CUDA, dtype)
    assert refusal is None if reason is None else reason in refusal


def test_auto_falls_back_to_pytorch_once_per_reason_and_triton_stays_explicit(caplog, monkeypatch):
    monkeypatch.setattr(attention_module, "_REPORTED_FALLBACKS", set())
    assert HybridAttention(HybridConfig(), num_heads=8, head_dim=8).kernel_refusal(torch.zeros(1, 8, 4, 8)) is None
    layer = HybridAttention(HybridConfig(), num_heads=2, head_dim=512)
    refusal = layer.kernel_refusal(torch.zeros(1, 2, 4, 512))
    assert "got 512" in refusal
    with caplog.at_level(logging.WARNING, logger=attention_module.__name__):
        for _ in range(3):  # every layer of every step asks
            assert resolve_backend("auto", CUDA, dtype=torch.bfloat16, refusal=refusal) == "torch"
    assert [r.getMessage() for r in caplog.records] == [
        f"attention.backend auto: PyTorch instead of Triton here, since {refusal}"]
    assert resolve_backend("auto", CUDA, dtype=torch.bfloat16, refusal=None) == "triton"
    assert resolve_backend("triton", CUDA, dtype=torch.bfloat16, refusal=refusal) == "triton"  # the kernel raises
    q = torch.zeros(1, 2, 64, 512)
    with pytest.raises(ValueError, match=r"head dim to be in \[1, 256\].*: use attention.backend: torch"):
        hybrid_attention_chunk(q, q, q, None, None, None, 64, "terrace")


@pytest.fixture(scope="module")
def data(stories_path):
    cfg = PrepareDataConfig(seq_len=128, max_train_tokens=128 * 4, max_val_tokens=128 * 2, val_rows=20)
    rows = read_alpaca_rows(str(SHARED / "data" / "alpaca" / "train.jsonl"))
    return prepare_alpaca(rows, load_tokenizer(str(stories_path)), cfg).dataset


TRANSFER = AttentionTransferConfig(epochs=1, grad_accum=2, eval_every=1)


def transferred(stories_path, states_of):
    """Hybrid weights and per-layer rows after transfer from the states `states_of(model)` gives."""
    model = linearize(load_teacher(str(stories_path)), HybridConfig(window_size=16))
    outcome = transfer_all_blocks(model, states_of(model), TRANSFER, states_of.checkpoints, lambda m, s: None)
    return hybrid_state_dict(model), outcome.per_layer_rows()


def test_online_teacher_states_train_exactly_as_a_cache_of_one_joint_block(stories_path, data, tmp_path):
    teacher = load_teacher(str(stories_path))
    disk, online = tmp_path / "disk", tmp_path / "online"
    layers = teacher.config.num_hidden_layers
    write_teacher_states(teacher, data, CacheTeacherAttnConfig(block_size=layers, dtype="float32"), disk)
    metrics = write_teacher_states(teacher, data, CacheTeacherAttnConfig(states="online"), online)
    assert sorted(p.name for p in online.iterdir()) == ["manifest.json"] and metrics["online"] == 1.0
    assert TeacherStates.open(online, data, teacher.get_input_embeddings()).blocks == [range(0, layers)]

    def from_disk(model):
        return TeacherStates.open(disk)
    from_disk.checkpoints = tmp_path / "c1"

    def from_teacher(model):
        return TeacherStates.open(online, data, model.get_input_embeddings())
    from_teacher.checkpoints = tmp_path / "c2"

    cached_weights, cached_rows = transferred(stories_path, from_disk)
    online_weights, online_rows = transferred(stories_path, from_teacher)
    assert online_rows == cached_rows
    assert all(torch.equal(online_weights[n], cached_weights[n]) for n in cached_weights)


def test_auto_states_go_online_above_max_cache_gb_and_disk_refuses(stories_path, data, tmp_path, caplog):
    teacher = load_teacher(str(stories_path))
    with caplog.at_level(logging.WARNING):
        write_teacher_states(teacher, data, CacheTeacherAttnConfig(max_cache_gb=1e-6), tmp_path / "auto")
    assert json_mode(tmp_path / "auto") == "online" and "states auto: online" in caplog.text
    with pytest.raises(ConfigError, match=r"^cache-teacher-attn.max_cache_gb: the cache needs .* or set states: online"):
        write_teacher_states(teacher, data, CacheTeacherAttnConfig(max_cache_gb=1e-6, states="disk"), tmp_path / "d")


def json_mode(folder) -> str:
    return json.loads((folder / "manifest.json").read_text())["mode"]


def test_several_chunks_per_forward_train_as_accumulated_ones(stories_path, data, tmp_path):
    teacher = load_teacher(str(stories_path))
    write_teacher_states(teacher, data, CacheTeacherAttnConfig(block_size=2), tmp_path / "s")
    states = TeacherStates.open(tmp_path / "s")
    rows = []
    for batch_size in (1, 2):
        model = linearize(load_teacher(str(stories_path)), HybridConfig(window_size=16))
        cfg = AttentionTransferConfig(epochs=1, grad_accum=2, eval_every=1, batch_size=batch_size)
        rows.append(transfer_all_blocks(model, states, cfg, tmp_path / f"c{batch_size}", lambda m, s: None).per_layer_rows())
    for one, two in zip(*rows):
        assert one["mse_before"] == pytest.approx(two["mse_before"], rel=1e-5)
        assert one["mse_after"] == pytest.approx(two["mse_after"], rel=1e-4)


def test_the_readme_gpu_recipe_validates_every_block():
    params = read_params(REPO / "params.yaml")
    overrides = readme_overrides((REPO / "README.md").read_text())
    assert len(overrides) >= 19
    for override in overrides:
        apply(params, override)  # raises on a key params.yaml lacks, unless `+` adds it (as dvc exp run -S)
    assert config.check_params(params)  # the cross-block checks too: lolcats_long joins whole chunks
    assert build_entry(config.VariantConfig, params, "lolcats_long").transfer_seq_len == 4096
    with pytest.raises(KeyError, match="already a key"):
        apply(params, "+variants.lolcats={transfer: false}")
    with pytest.raises(KeyError, match="not a key"):
        apply(params, "variants.lolcats_typo={transfer: false}")
    blocks = {cls.BLOCK: build_block(cls, params) for cls in (getattr(config, n) for n in config.__all__)
              if hasattr(cls, "BLOCK") and cls.BLOCK != "variants"}
    assert blocks["cache-teacher-attn"].states == "online"
    assert all(v is None for v in blocks["lm-eval"].limit.to_dict().values()) and blocks["lm-eval"].mmlu_shots == 5
    assert blocks["lora-recover"].grad_accum == blocks["attention-transfer"].grad_accum == 8
    assert blocks["prepare-data"].max_train_tokens is None
