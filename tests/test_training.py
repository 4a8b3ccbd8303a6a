"""Training stages on the real stories260K model and real Alpaca rows (../shared/design/lolcats.md §2-§4)."""
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import AttentionTransferConfig, CacheTeacherAttnConfig, HybridConfig, LoraRecoverConfig
from pipeline.hybrid import hybrid_state_dict, linearize, save_linearized
from pipeline.lora import add_lora, recover
from pipeline.student import load_student, save_student
from pipeline.io import DataFileError
from pipeline.params import ConfigError
from pipeline.perplexity import split_loss
from pipeline.teacher import load_teacher
from pipeline.teacher_states import TeacherStates, write_teacher_states
from pipeline import training
from pipeline.training import NonFiniteError, fit, resumable, stage_checkpoints
from pipeline.transfer import BlockResult, NoImprovementError, TransferOutcome, train_block, transfer_all_blocks
from tests.conftest import REPO

TRANSFER = AttentionTransferConfig(epochs=2, grad_accum=2, eval_every=2)
CPU = torch.device("cpu")
ATTENTION = HybridConfig(window_size=16)


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
        cached = states.read(block, "train", [3])
        assert cached.dtype == torch.bfloat16 and cached.shape == (1, 128, 64)
        assert torch.allclose(cached.float(), hidden[layers.start], atol=2e-2, rtol=1e-2)


def test_cache_size_is_checked_before_writing(stories_path, data, tmp_path):
    with pytest.raises(ConfigError, match=r"^cache-teacher-attn.max_cache_gb: the cache needs"):
        write_teacher_states(load_teacher(str(stories_path)), data, CacheTeacherAttnConfig(max_cache_gb=1e-6, states="disk"),
                             tmp_path / "s")
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
    hybrid = sum(p.numel() for p in hybrid_state_dict(model).values())
    transferred = transfer_all_blocks(model, states, TRANSFER, tmp_path / "t", lambda m, s: None).metrics(CPU)
    assert transferred["trainable_params"] == hybrid  # every block trained all of its feature maps and factors
    assert transferred["tokens"] == 3 * 2 * 6 * 128  # 3 blocks x 2 epochs x 6 chunks of 128 tokens
    save_linearized(model, tmp_path / "transfer", str(stories_path))
    cfg = LoraRecoverConfig(epochs=1, grad_accum=2, eval_every=1, lr=1e-3)
    peft_model = add_lora(model, cfg, train_feature_maps=False)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # r x (in + out) per projection: q (64+64), k (64+32), v (64+32), o (64+64), 5 layers
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == 5 * 8 * (128 + 96 + 96 + 128)
    outcome = recover(peft_model, data, cfg, tmp_path / "lora", lambda m, s: None)
    result, metrics = outcome.fit, outcome.metrics(CPU)
    assert result.best["loss"] <= result.initial["loss"] and math.isfinite(result.best["ppl"])
    assert (tmp_path / "lora" / "lora.pt").exists()
    assert metrics["trainable_params"] == 5 * 8 * (128 + 96 + 96 + 128)
    assert (metrics["val_ppl_start"], metrics["val_loss"]) == (result.initial["ppl"], result.best["loss"])
    assert metrics["train_tokens"] == metrics["tokens"] == 6 * 128 and metrics["updates"] == 3
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


def test_a_truncated_checkpoint_is_set_aside_and_training_starts_afresh(tmp_path, caplog):
    cfg = AttentionTransferConfig(epochs=2, grad_accum=1, eval_every=1, lr=0.1)

    def train(checkpoint, log_metrics=lambda m, s: None):
        p = torch.nn.Parameter(torch.ones(3))
        target = torch.arange(3.0)
        loss = lambda i: {"loss": ((p - target * (1 + i[0])) ** 2).sum()}
        evaluate = lambda: {"loss": ((p.detach() - target) ** 2).sum().item()}
        return fit({"w": p}, loss, [0, 1], evaluate, cfg, checkpoint, "test", log_metrics), p.detach().clone()

    reference, weights = train(tmp_path / "ref.pt")

    def dying_metrics(metrics, step):
        if step == 2:
            raise KeyboardInterrupt
    checkpoint = tmp_path / "c.pt"
    with pytest.raises(KeyboardInterrupt):
        train(checkpoint, dying_metrics)
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])  # a kill in the middle of a write elsewhere
    with caplog.at_level("WARNING", logger="pipeline.training"):
        result, again = train(checkpoint)
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert str(checkpoint) in warning and "c.pt.corrupt" in warning and "afresh" in warning
    assert (tmp_path / "c.pt.corrupt").exists()
    assert torch.equal(again, weights) and result.history == reference.history


def test_a_truncated_teacher_state_shard_fails_at_open_naming_it(states, tmp_path):
    folder = tmp_path / "states"
    shutil.copytree(states.folder, folder)
    shard = folder / "validation-0000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DataFileError, match=rf"^{re.escape(str(shard))}: unreadable teacher-state shard \(.*\); "
                                            r"`dvc repro -f cache-teacher-attn`"):
        TeacherStates.open(folder)
    shard.unlink()
    with pytest.raises(DataFileError, match=rf"^{re.escape(str(shard))}: unreadable teacher-state shard"):
        TeacherStates.open(folder)


def test_a_huge_lr_stops_at_the_first_non_finite_validation_loss(stories_path, states, tmp_path):
    # before: the NaN validation loss never counted as best, so the block silently kept its initial weights
    diverging = AttentionTransferConfig(epochs=1, grad_accum=1, eval_every=1, lr=1e6, min_lr=0.0)
    with pytest.raises(NonFiniteError, match=r"^block 0 \(layers 0-1\): non-finite validation mse_layer_0 \(nan\) "
                                             r"at update 1$"):
        transfer_all_blocks(student(stories_path), states, diverging, tmp_path / "c", lambda m, s: None)


def test_blocks_that_never_beat_their_initial_loss_are_reported_and_fail_above_the_threshold(tmp_path, caplog):
    def block(index: int, lr: float) -> BlockResult:  # a quadratic: lr 1e3 overshoots for ever, finitely
        p = torch.nn.Parameter(torch.ones(3))
        evaluate = lambda: {"loss": (p.detach() ** 2).sum().item()}
        cfg = AttentionTransferConfig(epochs=4, grad_accum=1, eval_every=1, lr=lr, min_lr=0.0)
        result = fit({"w": p}, lambda i: {"loss": (p * p).sum()}, [0, 1], evaluate, cfg, tmp_path / f"{index}.pt",
                     f"block {index}", lambda m, s: None)
        return BlockResult(index, [index], result, {index: result.initial["loss"]}, {index: result.best["loss"]}, 3)

    outcome = TransferOutcome([block(0, 0.1), block(1, 1e3), block(2, 1e3)], seq_len=128)
    assert outcome.unimproved_blocks == [1, 2]
    assert outcome.metrics(CPU)["unimproved_blocks"] == 2
    with caplog.at_level("WARNING", logger="pipeline.transfer"):
        outcome.check_improvement(1.0, tmp_path)  # within the threshold: reported, not fatal
    assert [r.getMessage() for r in caplog.records] == [
        "attention-transfer: blocks [1, 2] never beat their initial validation loss and keep their initial weights "
        "(diverged? lower attention-transfer.lr)"]
    with pytest.raises(NoImprovementError, match=r"2 of 3 trained blocks .* \(blocks \[1, 2\]\), more than "
                                                 r"max_unimproved_frac 0.5; lower attention-transfer.lr"):
        outcome.check_improvement(0.5, tmp_path)


def test_a_non_finite_validation_loss_stops_training(tmp_path):
    p = torch.nn.Parameter(torch.ones(3))
    cfg = AttentionTransferConfig(epochs=1, grad_accum=1, eval_every=1)
    passes = iter([1.0, float("nan")])
    with pytest.raises(NonFiniteError, match=r"^test: non-finite validation loss \(nan\) at update 1$"):
        fit({"w": p}, lambda i: {"loss": (p * p).sum()}, [0, 1], lambda: {"loss": next(passes)}, cfg,
            tmp_path / "c.pt", "test", lambda m, s: None)


def test_a_transfer_without_updates_trains_no_params(stories_path, states, tmp_path):
    """The no-transfer baseline's attention-transfer (epochs 0): it counts neither tokens nor weights."""
    outcome = transfer_all_blocks(student(stories_path), states, AttentionTransferConfig(epochs=0), tmp_path,
                                  lambda m, s: None)
    metrics = outcome.metrics(CPU)
    assert (metrics["trainable_params"], metrics["tokens"], metrics["updates_per_block"]) == (0, 0.0, 0)
    assert outcome.seq_len == 128 and all(b.trainable_params > 0 for b in outcome.blocks)


def test_stage_checkpoints_are_keyed_by_identity_and_removed_after_success(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "CHECKPOINT_ROOT", tmp_path)
    with stage_checkpoints("lora-recover", "lolcats", {"lr": 1}) as folder:
        assert folder.is_dir() and folder.parent == tmp_path / "lora-recover" and folder.name.startswith("lolcats-")
        with stage_checkpoints("lora-recover", "lolcats", {"lr": 2}) as other:
            assert other != folder
    assert not folder.exists() and not other.exists()


def test_checkpoints_are_removed_after_a_training_failure_and_kept_after_an_interrupt(tmp_path):
    with pytest.raises(NonFiniteError), resumable(tmp_path / "failed") as folder:
        (folder / "block_000.pt").write_bytes(b"x")
        raise NonFiniteError("block 0: non-finite loss")
    assert not (tmp_path / "failed").exists()
    with pytest.raises(KeyboardInterrupt), resumable(tmp_path / "killed") as folder:
        (folder / "block_000.pt").write_bytes(b"x")
        raise KeyboardInterrupt
    assert (tmp_path / "killed" / "block_000.pt").exists()


SAVE_STUDENT = """
import sys, torch
from pipeline.config import HybridConfig, LoraRecoverConfig
from pipeline.hybrid import linearize
from pipeline.lora import add_lora
from pipeline.student import save_student
from pipeline.teacher import load_teacher
torch.manual_seed(0)
model = add_lora(linearize(load_teacher(sys.argv[1]), HybridConfig(window_size=16)), LoraRecoverConfig(),
                 train_feature_maps=False)
save_student(model, sys.argv[2], sys.argv[1])
"""


def test_a_saved_student_is_byte_identical_whatever_the_process(stories_path, tmp_path):
    """peft writes target_modules from a set: without sorting, string-hash salting reorders it per process."""
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-c", SAVE_STUDENT, str(stories_path), str(tmp_path / seed)],
                       env=env, check=True, capture_output=True, timeout=300)
    files = sorted(p.relative_to(tmp_path / "1") for p in (tmp_path / "1").rglob("*") if p.is_file())
    assert Path("adapter/adapter_config.json") in files
    assert files == sorted(p.relative_to(tmp_path / "2") for p in (tmp_path / "2").rglob("*") if p.is_file())
    assert all((tmp_path / "1" / f).read_bytes() == (tmp_path / "2" / f).read_bytes() for f in files)


def test_fit_and_a_block_each_leave_one_readable_summary_line(tmp_path, caplog):
    p = torch.nn.Parameter(torch.ones(3))
    cfg = AttentionTransferConfig(epochs=2, grad_accum=1, eval_every=1, lr=0.1)
    with caplog.at_level("INFO", logger="pipeline.training"):
        result = fit({"w": p}, lambda i: {"loss": (p * p).sum()}, [0, 1],
                     lambda: {"loss": (p.detach() ** 2).sum().item()}, cfg, tmp_path / "c.pt", "block 0",
                     lambda m, s: None)
    assert re.fullmatch(r"block 0: 4 updates in \d+ s; val loss 3 -> \S+ \(best at update 4\)",
                        caplog.records[-1].getMessage())
    block = BlockResult(0, [0, 1], result, {0: 0.5, 1: 0.25}, {0: 0.125, 1: 0.0625}, 3)
    assert block.summary() == ("block 0 (layers 0-1): val MSE mean 0.375 -> 0.09375 over 4 updates; "
                               "worst layer 0: 0.5 -> 0.125")
