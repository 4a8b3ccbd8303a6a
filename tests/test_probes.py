"""Long-context probes: generation is seeded and lands on the stated tokens, lm-eval scores them, and
the linear-branch gain is the student's edge over window_only beyond the window."""
import dataclasses
import json
import math

import pytest
import torch

from pipeline.comparison import Score, beyond_window, linear_branch_gains
from pipeline.config import HybridConfig, LmEvalConfig, ProbesConfig, check_params
from pipeline.params import ConfigError
from pipeline.evaluation.lm_model import LolcatsLM
from pipeline.evaluation.probes import evaluate_probes, probe_metrics
from pipeline.hybrid import linearize
from pipeline.probes import PASSKEY_FILE, POSITION_LOSS_FILE, PROBES_DIR, passkey_docs, position_docs, \
    wikitext_articles, write_jsonl
from pipeline.report import PipelineResults, headline, undetermined_linear_branch_gains
from pipeline.teacher import load_teacher, load_tokenizer
from tests.conftest import SHARED
from tests.helpers import scored

SMOLLM2 = "SmolLM2-135M-Instruct"
WIKITEXT = SHARED / "data" / "wikitext2" / "test.jsonl"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def articles() -> list[str]:
    return wikitext_articles(WIKITEXT)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_tokenizer(SMOLLM2)


def test_generation_is_deterministic_for_a_seed(articles, smollm2_tokenizer):
    cfg = ProbesConfig(source=str(WIKITEXT))
    assert passkey_docs(smollm2_tokenizer, articles, cfg) == passkey_docs(smollm2_tokenizer, articles, cfg)
    assert position_docs(smollm2_tokenizer, articles, cfg) == position_docs(smollm2_tokenizer, articles, cfg)
    other = dataclasses.replace(cfg, seed=1)
    assert [d["key"] for d in passkey_docs(smollm2_tokenizer, articles, other)] != \
        [d["key"] for d in passkey_docs(smollm2_tokenizer, articles, cfg)]


@pytest.mark.parametrize("source", [SMOLLM2, str(SHARED / "models" / "stories260K")])
def test_the_key_lies_at_the_stated_distance_in_tokens(articles, source):
    tokenizer = load_tokenizer(source)
    cfg = ProbesConfig(source=str(WIKITEXT), context_lengths=[256, 512], distances=[40, 200, 400], docs_per_cell=2)
    docs = passkey_docs(tokenizer, articles, cfg)
    assert len(docs) == 2 * (2 + 3)  # 256 tokens: d40, d200; 512 tokens: d40, d200, d400
    for doc in docs:
        ids = tokenizer(doc["context"], add_special_tokens=False)["input_ids"]
        assert len(ids) == doc["context_tokens"] <= doc["context_length"]
        head, tail = tokenizer.decode(ids[:-doc["distance"]]), tokenizer.decode(ids[-doc["distance"]:])
        assert head.rstrip().endswith(doc["key"]) and tail.lstrip().startswith("is the pass key.")
        assert doc["target_distance"] <= doc["distance"] <= doc["target_distance"] + 40  # whole filler words


def test_position_documents_split_as_lm_eval_splits_them(articles, smollm2_tokenizer, stories_path):
    cfg = ProbesConfig(source=str(WIKITEXT))
    docs = position_docs(smollm2_tokenizer, articles, cfg)
    assert [d["bin"] for d in docs] == ["0-64", "64-256", "256-512"] * cfg.position_docs
    lm = LolcatsLM(pretrained=load_teacher(str(stories_path), torch.float32, CPU), tokenizer=smollm2_tokenizer)
    for doc in docs:
        assert articles[doc["article"]].startswith(doc["context"] + doc["continuation"])
        if doc["context"]:
            assert len(lm._encode_pair(doc["context"], doc["continuation"])[1]) == doc["tokens"] == doc["end"] - doc["start"]


def write_probes(root, tokenizer, articles, cfg: ProbesConfig) -> None:
    (root / PROBES_DIR).mkdir(parents=True)
    write_jsonl(root / PROBES_DIR / PASSKEY_FILE, passkey_docs(tokenizer, articles, cfg))
    write_jsonl(root / PROBES_DIR / POSITION_LOSS_FILE, position_docs(tokenizer, articles, cfg))


def test_the_teacher_retrieves_a_key_100_tokens_back(articles, smollm2_tokenizer, tmp_path, monkeypatch):
    cfg = ProbesConfig(source=str(WIKITEXT), context_lengths=[160], distances=[100], docs_per_cell=4,
                       position_bins=[0, 32, 64], position_docs=2)
    write_probes(tmp_path, smollm2_tokenizer, articles, cfg)
    monkeypatch.chdir(tmp_path)
    metrics = evaluate_probes(load_teacher(SMOLLM2, torch.float32, CPU).eval(), smollm2_tokenizer, LmEvalConfig())
    assert metrics["passkey_acc_d100"] >= 0.75 and metrics["passkey_acc_d100_docs"] == 4
    assert 0 < metrics["position_loss_0_32"] < 10 and metrics["position_loss_32_64_docs"] == 2


def test_window_only_cannot_see_a_key_beyond_its_reach(articles, stories_path, tmp_path, monkeypatch):
    """stories260K: 5 layers of a terrace window of 8 see at most 5 x 15 tokens back, so a key 200 tokens
    back cannot change window_only's prediction: its score is exactly that of a model without the key."""
    tokenizer = load_tokenizer(str(stories_path))
    cfg = ProbesConfig(source=str(WIKITEXT), context_lengths=[256], distances=[200], docs_per_cell=4,
                       position_bins=[0, 32, 64], position_docs=2)
    [doc, *_] = passkey_docs(tokenizer, articles, cfg)
    swapped = doc["context"].replace(doc["key"], "13579")
    window_only = linearize(load_teacher(str(stories_path), torch.float32, CPU),
                            HybridConfig(window_size=8).for_mode("window_only")).eval()
    teacher = load_teacher(str(stories_path), torch.float32, CPU).eval()

    def last_logits(model, text: str) -> torch.Tensor:
        with torch.no_grad():
            return model(tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids).logits[0, -1]
    assert torch.equal(last_logits(window_only, doc["context"]), last_logits(window_only, swapped))
    assert not torch.allclose(last_logits(teacher, doc["context"]), last_logits(teacher, swapped))  # the test can fail

    write_probes(tmp_path, tokenizer, articles, cfg)
    monkeypatch.chdir(tmp_path)
    metrics = evaluate_probes(window_only, tokenizer, LmEvalConfig())
    assert metrics["passkey_acc_d200"] == 0.0 and metrics["passkey_acc_d200_docs"] == 4


def test_probe_metrics_bin_lm_eval_samples():
    samples = {"lolcats_passkey": [{"doc": {"target_distance": d}, "acc": a} for d, a in [(40, 1), (40, 1), (200, 1), (200, 0)]],
               "lolcats_position_loss": [{"doc": {"start": a, "end": b}, "loss": x}
                                         for a, b, x in [(0, 128, 4.0), (0, 128, 2.0), (128, 256, 3.0)]]}
    metrics = probe_metrics(samples)
    assert metrics["passkey_acc_d40"] == 1.0 and metrics["passkey_acc_d40_stderr"] == 0.0
    assert metrics["passkey_acc_d200"] == 0.5 and math.isclose(metrics["passkey_acc_d200_stderr"], 0.5)  # 0.707 / sqrt(2)
    assert metrics["position_loss_0_128"] == 3.0 and metrics["position_loss_0_128_docs"] == 2
    assert math.isnan(metrics["position_loss_128_256_stderr"])  # one document: no stderr


def probes(near: float, far: float, far_se: float, loss: float, loss_se: float) -> dict[str, float]:
    """Probe metrics with passkey bins at 40 and 200 (4 documents each) and position bins 0-64, 128-256."""
    return {"passkey_acc_d40": near, "passkey_acc_d40_stderr": 0.1, "passkey_acc_d40_docs": 4.0,
            "passkey_acc_d200": far, "passkey_acc_d200_stderr": far_se, "passkey_acc_d200_docs": 4.0,
            "position_loss_0_64": 4.0, "position_loss_0_64_stderr": 0.1, "position_loss_0_64_docs": 2.0,
            "position_loss_128_256": loss, "position_loss_128_256_stderr": loss_se, "position_loss_128_256_docs": 2.0}


def test_beyond_the_window_pools_the_far_bins():
    far = beyond_window(probes(1.0, 0.5, 0.2, 3.0, 0.1) | {"passkey_acc_d300": 0.0, "passkey_acc_d300_stderr": 0.0,
                                                            "passkey_acc_d300_docs": 12.0}, window_size=64)
    assert math.isclose(far["passkey_acc_beyond"].value, (4 * 0.5 + 12 * 0.0) / 16)  # d200 and d300, not d40
    assert math.isclose(far["passkey_acc_beyond"].stderr, 4 * 0.2 / 16)
    assert far["position_loss_beyond"] == Score(3.0, 0.1)
    with pytest.raises(ValueError, match="raise prepare-probes.distances"):
        beyond_window(probes(1.0, 0.5, 0.2, 3.0, 0.1), window_size=128)  # nothing 256 tokens back


def test_linear_branch_gain_on_a_fixed_table():
    gains = linear_branch_gains(beyond_window(probes(0.9, 0.50, 0.10, 3.0, 0.1), 64),
                                beyond_window(probes(0.9, 0.10, 0.05, 3.5, 0.2), 64))
    assert math.isclose(gains["linear_branch_gain"].value, 0.40)
    assert math.isclose(gains["linear_branch_gain"].stderr, math.hypot(0.10, 0.05))
    assert math.isclose(gains["linear_branch_gain_loss"].value, 0.5)  # window_only's loss minus the student's
    assert math.isclose(gains["linear_branch_gain_loss"].stderr, math.hypot(0.1, 0.2))

    lm_eval = {"teacher": scored(0.6) | probes(0.9, 0.9, 0.05, 2.9, 0.1),
               "window_only": scored(0.6) | probes(0.9, 0.1, 0.05, 3.5, 0.2),
               "lolcats": scored(0.6) | probes(0.9, 0.5, 0.10, 3.4, 0.2)}
    metrics = headline(PipelineResults(prepare={"train_tokens": 2048, "train_chunks": 2},
                                       cache={"teacher_val_ppl": 9.0, "wall_time_s": 1.0}, transfer={}, lora={},
                                       lm_eval=lm_eval, window_size=64))
    assert math.isclose(metrics["lolcats_linear_branch_gain"], 0.4) and "window_only_linear_branch_gain" not in metrics
    assert metrics["window_only_passkey_acc_beyond"] == 0.1
    # lolcats' loss gain 0.1 ± 0.28: inside its noise; the accuracy gain 0.4 ± 0.11 and the teacher's are not
    assert undetermined_linear_branch_gains(metrics) == ["lolcats_linear_branch_gain_loss"]


def test_check_params_refuses_probes_that_never_leave_the_window():
    params = {"attention": {"window_size": 200}, "prepare-probes": {"distances": [40, 160, 280]}}
    with pytest.raises(ConfigError, match="prepare-probes: no probe lies 400 tokens back"):
        check_params(params)
