"""The six benchmarks of ../shared/design/lolcats.md §5 through lm-eval's stock `simple_evaluate`.

One call scores one in-memory model (wrapped in `LolcatsLM`) on PIQA, ARC-e, ARC-c, HellaSwag,
WinoGrande (0-shot) and MMLU (`mmlu_shots`-shot), with our `tasks/` (or the stock tasks where
../shared/data lacks a file, `suite.task_names`). A task's `lm-eval.limit` keeps a seeded
random subset of its documents (per subject for MMLU), passed as lm-eval's `samples`, so every
model sees the same documents. The result is flat: `<benchmark>_<metric>` and its `_stderr`
(lm-eval's), `<benchmark>_docs`, and the paper's averages (`suite.AVERAGES`: `avg_zero_shot`
over 5 tasks, `avg_all` over 6). MMLU is the unweighted mean over subjects, as the paper.
"""
import contextlib
import logging
import math
import random
import statistics

import datasets
import torch
from lm_eval import simple_evaluate
from lm_eval.api.task import Task
from lm_eval.tasks import TaskManager

from ..config import LmEvalConfig
from .heldout_perplexity import alpaca_perplexity, wikitext2_perplexity
from .lm_model import LolcatsLM
from .probes import evaluate_probes
from .suite import BENCHMARKS, DATA_ROOT, TASKS_DIR, averages, task_names

log = logging.getLogger(__name__)


def _leaves(loaded: dict, name: str) -> list[Task]:
    """The scored tasks behind a task or group name."""
    if name in loaded["groups"]:
        return list(loaded["groups"][name].get_all_tasks())
    return [loaded["tasks"][name]]


def _subset(task: Task, limit: int | None, seed: int) -> list[int] | None:
    """Sorted document indices to score, None for all; the same for every model (seeded by name)."""
    n = len(task.eval_docs)
    if limit is None or limit >= n:
        return None
    return sorted(random.Random(f"{seed}:{task.task_name}").sample(range(n), limit))


def _score(results: dict, tasks: list[Task], metric: str) -> tuple[float, float, int]:
    """Unweighted mean of `metric` over tasks (one task, or MMLU's subjects), its stderr, documents.

    stderr of a mean of k independent task means: sqrt(sum se_i^2) / k. Where lm-eval has no
    se_i (a task scored on one document, as MMLU's CPU default), the spread of the k task means,
    stdev / sqrt(k), which also counts the subjects' differences: larger, never smaller. NaN for
    a single task on a single document.
    """
    rows = [results["results"][t.task_name] for t in tasks]
    values = [row[f"{metric},none"] for row in rows]
    errors = [row[f"{metric}_stderr,none"] for row in rows]
    k = len(values)
    if "N/A" not in errors:
        stderr = math.sqrt(sum(e ** 2 for e in errors)) / k
    else:
        stderr = statistics.stdev(values) / math.sqrt(k) if k > 1 else math.nan
    docs = sum(results["n-samples"][t.task_name]["effective"] for t in tasks)
    return sum(values) / k, stderr, docs


def evaluate_benchmarks(model: torch.nn.Module, tokenizer, cfg: LmEvalConfig) -> dict[str, float]:
    names = task_names(DATA_ROOT)
    stock = {b: name for b, name in names.items() if name != BENCHMARKS[b].task}
    for benchmark, name in stock.items():
        log.warning("%s: no local copy under %s, using lm-eval's stock task %r (reads the Hugging Face Hub)",
                    benchmark, DATA_ROOT, name)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=bool(stock))
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # else one bar per MMLU subject and split
    try:
        loaded = manager.load(list(names.values()))
    finally:
        if bars:
            datasets.enable_progress_bars()
    leaves = {b: _leaves(loaded, name) for b, name in names.items()}

    samples = {}
    for benchmark, tasks in leaves.items():
        for task in tasks:
            if BENCHMARKS[benchmark].few_shot:
                task.set_config(key="num_fewshot", value=cfg.mmlu_shots)
            subset = _subset(task, getattr(cfg.limit, benchmark), cfg.seed)
            if subset is not None:
                samples[task.task_name] = subset

    log.info("lm-eval on %s; %d of %d tasks limited to a subset", ", ".join(names.values()), len(samples),
             sum(map(len, leaves.values())))
    lm = LolcatsLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    top = [loaded["groups"][name] if name in loaded["groups"] else loaded["tasks"][name] for name in names.values()]
    with _lm_eval_warnings_only():  # else two INFO lines per MMLU subject: ~260 lines per stage
        results = simple_evaluate(lm, tasks=top, task_manager=manager, samples=samples or None, log_samples=False,
                                  random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                                  fewshot_random_seed=cfg.seed)

    metrics = {}
    for benchmark, tasks in leaves.items():
        metric = BENCHMARKS[benchmark].metric
        value, stderr, docs = _score(results, tasks, metric)
        metrics |= {f"{benchmark}_{metric}": value, f"{benchmark}_{metric}_stderr": stderr,
                    f"{benchmark}_docs": float(docs)}
    scores = {b: metrics[f"{b}_{BENCHMARKS[b].metric}"] for b in BENCHMARKS}
    metrics |= averages(scores, lambda values: sum(values) / len(values))
    log.info("lm-eval: %s; avg %.4f (zero-shot %.4f)", ", ".join(
        f"{b} {metrics[f'{b}_{BENCHMARKS[b].metric}']:.4f} ± {metrics[f'{b}_{BENCHMARKS[b].metric}_stderr']:.4f}"
        for b in BENCHMARKS), metrics["avg_all"], metrics["avg_zero_shot"])
    return metrics


@contextlib.contextmanager
def _lm_eval_warnings_only():
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def evaluate_model(model: torch.nn.Module, tokenizer, cfg: LmEvalConfig, alpaca_split=None) -> dict[str, float]:
    """Benchmarks, long-context probes, WikiText-2 perplexity and, given prepared chunks, Alpaca
    validation perplexity."""
    model.eval()
    metrics = evaluate_benchmarks(model, tokenizer, cfg)
    metrics |= evaluate_probes(model, tokenizer, cfg)
    metrics |= wikitext2_perplexity(model, tokenizer, cfg)
    if alpaca_split is not None:
        metrics |= alpaca_perplexity(model, alpaca_split, cfg)
    return metrics
