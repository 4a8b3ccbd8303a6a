"""Scheduled sliding-window dropout (SSD, arXiv 2510.05901): config, layer, schedule, both training stages."""
import pytest
import torch

from pipeline.config import (AttentionTransferConfig, CacheTeacherAttnConfig, HybridConfig, LoraRecoverConfig,
                             VariantConfig, WindowDropout, check_params)
from pipeline.hybrid import linearize
from pipeline.hybrid.attention import HybridAttention, TransferLosses
from pipeline.lora import add_lora, recover
from pipeline.params import ConfigError, build_entry, read_params
from pipeline.teacher import load_teacher
from pipeline.teacher_states import TeacherStates, write_teacher_states
from pipeline.training import WindowDropoutSchedule, window_dropout_at
from pipeline.transfer import train_block
from tests.conftest import REPO

HEADS, KV_HEADS, HEAD_DIM, T = 4, 2, 8, 40
HYBRID = HybridConfig(window="sliding", window_size=16, feature_dim=8)


def layer_pair() -> tuple[HybridAttention, HybridAttention]:
    """A hybrid layer with trained-looking weights, and a linear-only layer with the same feature maps."""
    hybrid = HybridAttention(HYBRID, HEADS, HEAD_DIM)
    with torch.no_grad():
        for p in hybrid.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    linear = HybridAttention(HYBRID.for_mode("linear_only"), HEADS, HEAD_DIM)
    linear.load_state_dict({k: v for k, v in hybrid.state_dict().items() if k != "window_factors"})
    return hybrid.eval(), linear.eval()


def qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randn(1, HEADS, T, HEAD_DIM)  # [B,H,T,D]
    return q, torch.randn(1, KV_HEADS, T, HEAD_DIM), torch.randn(1, KV_HEADS, T, HEAD_DIM)  # k, v [B,Hkv,T,D]


# (a) the schedule

def test_schedule_starts_at_start_halves_midway_and_ends_at_zero():
    assert window_dropout_at(0.5, 0, 9) == 0.5
    assert window_dropout_at(0.5, 4, 9) == pytest.approx(0.25)
    assert window_dropout_at(0.5, 8, 9) == 0.0
    assert window_dropout_at(0.5, 0, 1) == 0.5  # a fit of one update runs at the start value


def test_schedule_sets_every_hybrid_layer_and_only_when_on():
    layers = torch.nn.ModuleList([HybridAttention(HYBRID, HEADS, HEAD_DIM) for _ in range(3)]).eval()
    with WindowDropoutSchedule(layers, 0.0, seed=0) as off:
        assert off.before_update(0, 4) == {}
        assert all(layer.window_dropout == 0.0 and not layer.training for layer in layers)
    with WindowDropoutSchedule(layers, 0.6, seed=0) as on:
        assert on.before_update(1, 4) == {"window_dropout": pytest.approx(0.4)}
        assert all(layer.window_dropout == pytest.approx(0.4) and layer.training for layer in layers)
        seen = on.evaluating(lambda: {"loss": float(any(layer.training for layer in layers))})()
        assert seen == {"loss": 0.0}, "validation passes run in eval mode"
        on.before_update(2, 4)
    assert all(layer.window_dropout == 0.0 and not layer.training for layer in layers)  # put back on exit


# (b) off: bitwise today's layer, no RNG draw

def test_p_zero_in_training_and_any_p_in_eval_change_nothing():
    hybrid, _ = layer_pair()
    q, k, v = qkv()
    reference = hybrid(q, k, v, HEAD_DIM ** -0.5)  # the attribute never set
    for training, p in ((True, 0.0), (False, 1.0), (False, 0.5)):
        hybrid.train(training)
        hybrid.window_dropout = p
        rng = torch.get_rng_state()
        y = hybrid(q, k, v, HEAD_DIM ** -0.5)
        assert torch.equal(y, reference), (training, p)
        assert torch.equal(torch.get_rng_state(), rng), f"an RNG draw at training={training}, p={p}"


# (c) dropped: the linear-only layer with the same feature maps

def test_p_one_runs_linear_only_and_trains_only_the_feature_maps():
    hybrid, linear = layer_pair()
    q, k, v = qkv()
    expected = linear(q, k, v, HEAD_DIM ** -0.5)
    hybrid.train()
    hybrid.window_dropout = 1.0
    y = hybrid(q, k, v, HEAD_DIM ** -0.5)
    assert torch.isfinite(y).all() and torch.equal(y, expected)
    assert not torch.allclose(y, hybrid.eval()(q, k, v, HEAD_DIM ** -0.5)), "the window is really dropped"
    y.square().sum().backward()
    grad = hybrid.window_factors.grad
    assert grad is None or torch.count_nonzero(grad) == 0
    assert all(torch.count_nonzero(p.grad) > 0 for n, p in hybrid.named_parameters() if "feature_map" in n)


def test_p_one_in_transfer_mode_scores_the_linear_only_output():
    hybrid, linear = layer_pair()
    q, k, v = qkv()
    for layer in (hybrid, linear):
        layer.transfer = TransferLosses(with_xent=True)
    hybrid.train()
    hybrid.window_dropout = 1.0
    teacher = hybrid(q, k, v, HEAD_DIM ** -0.5)
    assert torch.equal(teacher, linear(q, k, v, HEAD_DIM ** -0.5))  # the teacher's output either way
    assert torch.equal(hybrid.transfer.mse, linear.transfer.mse)
    assert torch.isfinite(hybrid.transfer.xent) and torch.equal(hybrid.transfer.xent, linear.transfer.xent)


# (d) 0 < p < 1: reproducible drops

def dropped_calls(hybrid: HybridAttention, q, k, v, kept: torch.Tensor, calls: int = 24) -> list[bool]:
    return [not torch.equal(hybrid(q, k, v, HEAD_DIM ** -0.5), kept) for _ in range(calls)]


def test_drops_follow_the_seed_and_each_update_its_own():
    hybrid, _ = layer_pair()
    q, k, v = qkv()
    kept = hybrid(q, k, v, HEAD_DIM ** -0.5)
    hybrid.train()
    hybrid.window_dropout = 0.5
    torch.manual_seed(7)
    first = dropped_calls(hybrid, q, k, v, kept)
    torch.manual_seed(7)
    assert dropped_calls(hybrid, q, k, v, kept) == first
    assert any(first) and not all(first)

    # the schedule re-seeds per update: what ran before (e.g. updates before a resume) does not matter
    with WindowDropoutSchedule(hybrid, 0.9, seed=3) as schedule:
        schedule.before_update(2, 10)
        update_2 = dropped_calls(hybrid, q, k, v, kept)
        torch.rand(100)
        schedule.before_update(2, 10)
        assert dropped_calls(hybrid, q, k, v, kept) == update_2
        assert any(update_2) and not all(update_2)


# (e) config refusals

def test_a_variant_without_the_key_has_dropout_off_and_lolcats_ssd_has_it():
    params = read_params(REPO / "params.yaml")
    check_params(params)
    assert build_entry(VariantConfig, params, "lolcats").window_dropout == WindowDropout()
    assert build_entry(VariantConfig, params, "lolcats_ssd").window_dropout == WindowDropout(transfer=0.5, lora=0.5)


@pytest.mark.parametrize("raw, message", [
    ({"window_dropout": {"transfer": 1.5}}, "variants.window_dropout.transfer: must lie in [0, 1], got 1.5"),
    ({"window_dropout": {"lora": -0.1}}, "variants.window_dropout.lora: must lie in [0, 1], got -0.1"),
    ({"window_dropout": {"start": 0.5}}, "variants.odd.window_dropout.start: unknown key; valid keys are"),
    ({"mode": "linear_only", "window_dropout": {"transfer": 0.5}},
     "variants.window_dropout: needs a hybrid layer, but mode is linear_only; set transfer and lora to 0"),
    ({"mode": "window_only", "window_dropout": {"lora": 0.2}},
     "variants.window_dropout: needs a hybrid layer, but mode is window_only; set transfer and lora to 0"),
    ({"transfer": False, "window_dropout": {"transfer": 0.5}},
     "variants.window_dropout.transfer: attention-transfer trains nothing when transfer is false; set it to 0"),
], ids=["transfer-range", "lora-range", "unknown-key", "linear-only", "window-only", "no-transfer"])
def test_each_window_dropout_refusal_names_its_key(raw, message):
    params = dict(read_params(REPO / "params.yaml"))
    params["variants"] = dict(params["variants"], odd=raw)
    with pytest.raises(ConfigError) as caught:
        check_params(params)
    assert str(caught.value).startswith(message)


def test_dropout_of_a_null_mode_variant_is_refused_when_attention_is_not_hybrid():
    params = dict(read_params(REPO / "params.yaml"))
    params["attention"] = dict(params["attention"], mode="linear_only")
    with pytest.raises(ConfigError, match=r"^variants\.lolcats_ssd\.window_dropout: needs a hybrid layer, "
                                          r"but attention\.mode is linear_only"):
        check_params(params)
    del params["variants"]["lolcats_ssd"]
    check_params(params)  # the variants without dropout are fine on a linear-only attention


def test_no_transfer_may_drop_the_window_in_lora_recover():
    assert VariantConfig(transfer=False, window_dropout=WindowDropout(lora=0.5)).window_dropout.lora == 0.5


# (f) both training stages' code paths

@pytest.fixture(scope="module")
def states(stories_path, data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("states")
    write_teacher_states(load_teacher(str(stories_path)), data, CacheTeacherAttnConfig(block_size=5), folder)
    return TeacherStates.open(folder)


def student(stories_path):
    return linearize(load_teacher(str(stories_path)), HybridConfig(window_size=16))


def logged_series(logged: list[tuple[dict, int]], key: str) -> list[tuple[int, float]]:
    return [(step, metrics[key]) for metrics, step in logged if key in metrics]


def test_attention_transfer_logs_a_decaying_window_dropout(stories_path, states, tmp_path):
    cfg = AttentionTransferConfig(epochs=1, grad_accum=1, eval_every=3)  # 6 train chunks: 6 updates
    runs = {}
    for start in (0.0, 0.5):
        logged = []
        model = student(stories_path)
        hybrids = [m for m in model.modules() if isinstance(m, HybridAttention)]
        modes = [h.training for h in hybrids]
        result = train_block(0, states, model, cfg, tmp_path / f"{start}.pt", lambda m, s: logged.append((m, s)),
                             window_dropout=start)
        runs[start] = result, logged
        assert [h.training for h in hybrids] == modes and all(h.window_dropout == 0.0 for h in hybrids)
    (off, off_logged), (on, on_logged) = runs[0.0], runs[0.5]
    assert logged_series(off_logged, "window_dropout") == []
    assert logged_series(on_logged, "window_dropout") == [
        (1, 0.5), (2, pytest.approx(0.4)), (3, pytest.approx(0.3)), (4, pytest.approx(0.2)),
        (5, pytest.approx(0.1)), (6, 0.0)]
    assert on.fit.initial == off.fit.initial, "the first validation pass runs before any dropout"
    assert [r["loss"] for r in on.fit.train_curve] != [r["loss"] for r in off.fit.train_curve], "some forwards dropped"


def test_lora_recover_logs_a_decaying_window_dropout(stories_path, data, tmp_path):
    logged = []
    cfg = LoraRecoverConfig(max_updates=3, eval_every=3)
    recover(add_lora(student(stories_path), cfg, train_feature_maps=True), data, cfg, tmp_path,
            lambda m, s: logged.append((m, s)), window_dropout=0.5)
    assert logged_series(logged, "window_dropout") == [(1, 0.5), (2, 0.25), (3, 0.0)]
