"""Evaluation through lm-eval's seams (../shared/design/lolcats.md §5, style rule 14) on stories260K."""
import json
import logging
import math
import statistics
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

from pipeline.config import LmEvalConfig, LoraRecoverConfig, TaskLimits
from pipeline.evaluation import harness
from pipeline.evaluation.harness import evaluate_benchmarks
from pipeline.evaluation.heldout_perplexity import alpaca_perplexity, wikitext2_perplexity
from pipeline.evaluation.lm_model import CHECKOUT, LolcatsLM, check_checkout
from pipeline.evaluation.suite import AVERAGES, BENCHMARKS, DATA_ROOT, TASKS_DIR, ZERO_SHOT, averages, task_names
from pipeline.hybrid import HybridConfig, hybrid_state_dict, linearize, save_linearized
from pipeline.lora import add_lora
from pipeline.student import load_saved, save_student
from pipeline.params import ConfigError, build_block, read_params
from pipeline.teacher import load_teacher, load_tokenizer
from tests.conftest import REPO

TINY = LmEvalConfig(limit=TaskLimits(piqa=2, arc_easy=2, arc_challenge=2, hellaswag=2, winogrande=2, mmlu=2),
                    batch_size=4, mmlu_shots=0, ppl_seq_len=64, ppl_max_tokens=128)


def rows(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # task YAMLs and DATA_ROOT are relative to the repo root, as in stages


@pytest.fixture(scope="module")
def tasks():
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
        return manager.load([b.task for b in BENCHMARKS.values()])


@pytest.fixture(scope="module")
def linearized(stories_path):
    model = linearize(load_teacher(str(stories_path)), HybridConfig(window_size=8)).eval()
    return model, load_tokenizer(str(stories_path))


# ---- tasks/: every local task loads through lm-eval and reads the right fields

def test_all_local_tasks_are_indexed_and_used_when_the_data_is_there(tmp_path):
    assert task_names() == {name: b.task for name, b in BENCHMARKS.items()}
    assert task_names(tmp_path) == {name: b.stock_task for name, b in BENCHMARKS.items()}
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "validation.jsonl").write_text("{}\n")
    assert task_names(tmp_path)["piqa"] == "lolcats_piqa" and task_names(tmp_path)["mmlu"] == "mmlu"


def test_the_averages_are_the_papers():
    assert ZERO_SHOT == [b for b in BENCHMARKS if b != "mmlu"]
    assert AVERAGES == {"avg_zero_shot": tuple(ZERO_SHOT), "avg_all": tuple(BENCHMARKS)}
    assert averages({b: i for i, b in enumerate(BENCHMARKS)}, max) == {"avg_zero_shot": 4, "avg_all": 5}


def test_the_stock_fallbacks_are_lm_eval_tasks():
    index = TaskManager(include_defaults=True).task_index  # ~8 s: indexes every stock task
    assert all(b.stock_task in index for b in BENCHMARKS.values())


@pytest.mark.parametrize("name, split, target, choices", [
    ("lolcats_piqa", "piqa/validation.jsonl", lambda d: d["label"], lambda d: [d["sol1"], d["sol2"]]),
    ("lolcats_arc_easy", "arc_easy/test.jsonl",
     lambda d: d["choices"]["label"].index(d["answerKey"]), lambda d: d["choices"]["text"]),
    ("lolcats_arc_challenge", "arc_challenge/test.jsonl",
     lambda d: d["choices"]["label"].index(d["answerKey"]), lambda d: d["choices"]["text"]),
    ("lolcats_hellaswag", "hellaswag/validation_derived.jsonl", lambda d: d["label"], lambda d: d["endings"]),
])
def test_zero_shot_task_docs_targets_and_choices(tasks, name, split, target, choices):
    task = tasks["tasks"][name]
    raw = rows(DATA_ROOT / split)
    docs = task.eval_docs
    assert len(docs) == len(raw) and task.config.num_fewshot == 0
    for i in (0, 1, len(raw) // 2, len(raw) - 1):
        assert docs[i] == raw[i]
        assert task.doc_to_target(docs[i]) == target(raw[i])
        assert task.doc_to_choice(docs[i]) == choices(raw[i])


def test_winogrande_scores_the_rest_of_the_sentence_after_each_filled_option(tasks):
    task = tasks["tasks"]["lolcats_winogrande"]
    doc = task.eval_docs[0]
    assert doc["sentence"] == "Sarah was a much better surgeon than Maria so _ always got the easier cases."
    assert task.doc_to_text(doc) == 1  # answer "2": Maria is the gold context
    assert task.doc_to_choice(doc) == ["Sarah was a much better surgeon than Maria so Sarah",
                                       "Sarah was a much better surgeon than Maria so Maria"]
    assert task.doc_to_target(doc) == "always got the easier cases."
    assert len(task.eval_docs) == 1267


def test_mmlu_is_57_subjects_each_with_its_own_test_and_shot_rows(tasks):
    group = tasks["groups"]["lolcats_mmlu"]
    subjects = list(group.get_all_tasks())
    assert len(subjects) == 57
    assert not group.aggregate_metric_list[0].weight_by_size  # the paper's unweighted mean
    total = 0
    for task in subjects:
        subject = task.task_name.removeprefix("lolcats_mmlu_")
        shots = task.fewshot_docs()  # the dev split through the same process_docs
        assert len(shots) == 5 and {d["subject"] for d in shots} == {subject}
        assert {d["subject"] for d in task.eval_docs} == {subject}
        assert task.config.num_fewshot == 5 and task.fewshot_cfg.sampler == "first_n"
        total += len(task.eval_docs)
    assert total == 14042
    task = tasks["tasks"]["lolcats_mmlu_anatomy"]
    context = task.fewshot_context(task.eval_docs[0], num_fewshot=5)
    assert context.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert context.count("\nAnswer:") == 6 and task.doc_to_choice(task.eval_docs[0]) == ["A", "B", "C", "D"]


# ---- the model: registration, loading a folder, right-padded batches

def test_lolcats_is_registered_beside_the_stock_models():
    assert get_model("lolcats") is LolcatsLM
    assert get_model("hf").__name__ == "HFLM"  # registering ours did not hide the stock ones
    probe = "import lm_eval.api.registry as r; print('lolcats' in r.model_registry)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "True", "the venv lacks lolcats_lm_eval.pth: run `make setup`"


def test_saved_folders_load_with_their_teachers_tokenizer(stories_path, linearized, tmp_path):
    model, _ = linearized
    save_linearized(model, tmp_path / "transfer", str(stories_path))
    loaded, source = load_saved(tmp_path / "transfer")
    assert source == str(stories_path)
    assert all(torch.equal(p, hybrid_state_dict(model)[n]) for n, p in hybrid_state_dict(loaded).items())

    peft_model = add_lora(linearize(load_teacher(str(stories_path)), HybridConfig(window_size=8)),
                          LoraRecoverConfig(), train_feature_maps=False)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)  # a trained-looking adapter, so loading it changes the logits
    save_student(peft_model, tmp_path / "student", str(stories_path))
    student, _ = load_saved(tmp_path / "student")
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, peft_model.eval()(ids).logits, atol=1e-5)
        assert not torch.allclose(student(ids).logits, loaded(ids).logits, atol=1e-3)


def test_batched_loglikelihood_equals_one_at_a_time(linearized):
    model, tokenizer = linearized
    pairs = [("Once upon a time", " there was a girl"), ("Tom had a dog.", " It was big and red and happy"),
             ("The sun", " was hot"), ("Lily saw a bird in the park and she", " smiled")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=0) for pair in pairs]
    one = LolcatsLM(pretrained=model, tokenizer=tokenizer, batch_size=1).loglikelihood(requests)
    four = LolcatsLM(pretrained=model, tokenizer=tokenizer, batch_size=4).loglikelihood(requests)  # right-padded
    assert [ll for ll, _ in four] == pytest.approx([ll for ll, _ in one], abs=1e-4)


def test_loglikelihoods_of_a_bf16_model_are_summed_from_fp32_log_probs(stories_path):
    """HFLM's default would sum bf16 log-probs (a long span's sum then keeps ~3 digits)."""
    model, tokenizer = load_teacher(str(stories_path)).to(torch.bfloat16).eval(), load_tokenizer(str(stories_path))
    context, continuation = "Once upon a time", " there was a little girl who liked to play in the park" * 6
    ids = tokenizer(context + continuation, return_tensors="pt").input_ids
    n = len(tokenizer(continuation, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logits = model(ids).logits[0, -n - 1:-1]
    target = ids[0, -n:, None]
    exact = logits.float().log_softmax(-1).gather(-1, target).sum().item()
    in_bf16 = logits.log_softmax(-1).gather(-1, target).sum().item()
    request = Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)
    (scored, _), = LolcatsLM(pretrained=model, tokenizer=tokenizer, batch_size=1).loglikelihood([request])
    assert scored == pytest.approx(exact, rel=1e-5) and scored != pytest.approx(in_bf16, rel=1e-5)


# ---- the harness and the perplexities

def test_evaluate_benchmarks_returns_every_flat_metric(linearized, monkeypatch, caplog):
    model, tokenizer = linearized
    raw = {}
    caplog.set_level(logging.INFO)

    def keep_results(*args, **kwargs):
        raw.update(simple_evaluate(*args, **kwargs))
        return raw
    monkeypatch.setattr(harness, "simple_evaluate", keep_results)
    metrics = evaluate_benchmarks(model, tokenizer, TINY)
    for name, b in BENCHMARKS.items():
        value, stderr = metrics[f"{name}_{b.metric}"], metrics[f"{name}_{b.metric}_stderr"]
        assert 0 <= value <= 1 and math.isfinite(stderr) and stderr >= 0
    assert {metrics[f"{b}_docs"] for b in BENCHMARKS if b != "mmlu"} == {2.0} and metrics["mmlu_docs"] == 57 * 2
    zero_shot = [metrics[f"{b}_{BENCHMARKS[b].metric}"] for b in BENCHMARKS if b != "mmlu"]
    assert metrics["avg_zero_shot"] == pytest.approx(sum(zero_shot) / 5)
    assert metrics["avg_all"] == pytest.approx((sum(zero_shot) + metrics["mmlu_acc"]) / 6)
    assert len(metrics) == 6 * 3 + 2
    # our MMLU mean over subjects is lm-eval's own aggregate of the lolcats_mmlu group (weight_by_size: false)
    assert metrics["mmlu_acc"] == pytest.approx(raw["results"]["lolcats_mmlu"]["acc,none"])
    assert metrics["mmlu_acc_stderr"] == pytest.approx(raw["results"]["lolcats_mmlu"]["acc_stderr,none"])
    # a readable log: lm-eval's per-subject INFO lines gone, one line of scores instead
    assert not [r for r in caplog.records if r.name.startswith("lm_eval") and r.levelno < logging.WARNING]
    assert [r for r in caplog.records if r.getMessage().startswith("lm-eval: piqa ")]


def test_mmlu_stderr_falls_back_to_the_spread_of_subjects_scored_on_one_question():
    subjects = [SimpleNamespace(task_name=f"s{i}") for i in range(4)]
    results = {"results": {f"s{i}": {"acc,none": float(i % 2), "acc_stderr,none": "N/A"} for i in range(4)},
               "n-samples": {f"s{i}": {"effective": 1} for i in range(4)}}
    assert harness._score(results, subjects, "acc") == (0.5, pytest.approx(statistics.stdev([0, 1, 0, 1]) / 2), 4)
    assert math.isnan(harness._score(results, subjects[:1], "acc")[1])


def test_perplexities_count_the_tokens_they_score(linearized):
    model, tokenizer = linearized
    wiki = wikitext2_perplexity(model, tokenizer, TINY)
    assert wiki["wikitext2_tokens"] == 2 * 63 and 1 < wiki["wikitext2_ppl"] < 512  # 2 windows; vocab 512
    chunks = Dataset.from_list([{"input_ids": list(range(1, 49)), "labels": [-100] * 8 + list(range(9, 49))}] * 5)
    alpaca = alpaca_perplexity(model, chunks, TINY)  # 128 tokens = 3 chunks of 48
    assert alpaca["alpaca_val_tokens"] == 3 * 40 and math.isfinite(alpaca["alpaca_val_ppl"])


# ---- the stock lm_eval command

def test_lm_eval_cli_scores_a_saved_student(stories_path, tmp_path):
    model = linearize(load_teacher(str(stories_path)), HybridConfig(window_size=8))
    save_student(add_lora(model, LoraRecoverConfig(), train_feature_maps=False), tmp_path / "student",
                 str(stories_path))
    done = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "lolcats",
                           "--model_args", f"pretrained={tmp_path / 'student'}", "--tasks", "lolcats_piqa",
                           "--include_path", "tasks", "--limit", "2", "--batch_size", "2",
                           "--output_path", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "|lolcats_piqa|" in done.stdout and "acc_norm" in done.stdout
    # HFLM loads the folder by its path (AutoModelForCausalLM after `import pipeline`), not as a built model
    assert "not of type `str`" not in done.stderr and "neither marked as CausalLM" not in done.stderr
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["n-samples"]["lolcats_piqa"]["effective"] == 2


# ---- the `lm-eval` params block

def test_lm_eval_defaults_equal_params_yaml():
    assert build_block(LmEvalConfig, read_params(REPO / "params.yaml")) == LmEvalConfig()


@pytest.mark.parametrize("raw, message", [
    ({"limit": {"piqa": "all"}}, "lm-eval.limit.piqa: expected an integer"),
    ({"limit": {"piqa": 0}}, "lm-eval.limit.piqa: must be null"),
    ({"limit": {"mmlu": 0}}, "lm-eval.limit.mmlu: must be null"),
    ({"limit": {"boolq": 10}}, "lm-eval.limit.boolq: unknown key; valid keys are"),
    ({"limits": {}}, "lm-eval.limits: unknown key; valid keys are"),
    ({"batch_size": 0}, "lm-eval.batch_size: must be at least 1"),
    ({"mmlu_shots": 6}, "lm-eval.mmlu_shots: must lie in [0, 5]"),
    ({"ppl_seq_len": 1}, "lm-eval.ppl_seq_len: must be at least 2"),
    ({"ppl_seq_len": 64, "ppl_max_tokens": 63}, "lm-eval.ppl_max_tokens: must be null or at least"),
    ({"seed": 0.5}, "lm-eval.seed: expected an integer"),
], ids=lambda v: str(v)[:40] if isinstance(v, dict) else None)
def test_a_mistyped_lm_eval_param_names_its_dotted_key(raw, message):
    with pytest.raises(ConfigError) as caught:
        build_block(LmEvalConfig, {"lm-eval": raw})
    assert str(caught.value).startswith(message)


def test_starting_python_imports_no_pipeline_and_another_checkout_is_refused(tmp_path):
    """A venv copied into another checkout must not silently run this checkout's code (issue: the .pth
    used to import `pipeline` at every interpreter start)."""
    done = subprocess.run([sys.executable, "-c", "import sys; print('pipeline' in sys.modules)"], cwd=tmp_path,
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    assert CHECKOUT == REPO
    check_checkout(REPO)
    check_checkout(tmp_path)  # not a checkout: the installed code is the one meant
    (tmp_path / "pipeline" / "evaluation").mkdir(parents=True)
    (tmp_path / "pipeline" / "evaluation" / "lm_model.py").write_text("")
    with pytest.raises(ImportError, match=r"is another checkout; run `make setup` here"):
        check_checkout(tmp_path)
