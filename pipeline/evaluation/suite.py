"""The six benchmarks of ../shared/design/lolcats.md §5, the lm-eval task that answers each, and the
paper's averages over them: the one list of benchmarks that the harness, the comparison and the report
read (`TaskLimits` in pipeline/config.py repeats the names as fields, held to this list by a test).
Only the standard library is imported: pipeline/comparison.py (and through it pipeline/config.py)
reads it without loading lm-eval or datasets.

Our tasks (`tasks/`, loaded through `include_path`) read the JSONL copies under ../shared/data;
where a copy is missing (a checkout without ../shared), the stock lm-eval task of the same
benchmark is used instead, which downloads from the Hugging Face Hub.
"""
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

DATA_ROOT = Path("../shared/data")  # relative to the repo root, the cwd of stages and README commands
TASKS_DIR = Path(__file__).resolve().parents[2] / "tasks"


@dataclass(frozen=True)
class Benchmark:
    task: str  # ours, in tasks/
    stock_task: str  # lm-eval's own, reading the hub
    data_files: tuple[str, ...]  # under DATA_ROOT, all needed by `task`
    metric: str  # the number the paper reports (§5)
    few_shot: bool = False  # MMLU: shots from the dev split (lm-eval.mmlu_shots)


# Keys are the metric prefixes (`piqa_acc`) and the fields of `lm-eval.limit`.
BENCHMARKS = {
    "piqa": Benchmark("lolcats_piqa", "piqa", ("piqa/validation.jsonl",), "acc"),
    "arc_easy": Benchmark("lolcats_arc_easy", "arc_easy",
                          ("arc_easy/train.jsonl", "arc_easy/validation.jsonl", "arc_easy/test.jsonl"), "acc"),
    "arc_challenge": Benchmark("lolcats_arc_challenge", "arc_challenge",
                               ("arc_challenge/train.jsonl", "arc_challenge/validation.jsonl",
                                "arc_challenge/test.jsonl"), "acc_norm"),
    "hellaswag": Benchmark("lolcats_hellaswag", "hellaswag", ("hellaswag/validation_derived.jsonl",), "acc_norm"),
    "winogrande": Benchmark("lolcats_winogrande", "winogrande", ("winogrande/validation.jsonl",), "acc"),
    "mmlu": Benchmark("lolcats_mmlu", "mmlu", ("mmlu/dev.jsonl", "mmlu/test.jsonl"), "acc", few_shot=True),
}
ZERO_SHOT = [name for name, b in BENCHMARKS.items() if not b.few_shot]  # "Avg. (no MMLU)" in the paper
# The paper's averages (metric name -> the benchmarks it averages), in the order the metrics are written.
AVERAGES = {"avg_zero_shot": tuple(ZERO_SHOT), "avg_all": tuple(BENCHMARKS)}

Value = TypeVar("Value")


def averages(per_benchmark: Mapping[str, Value], mean: Callable[[list[Value]], Value]) -> dict[str, Value]:
    """Every average of AVERAGES over `per_benchmark`: `mean` says how values combine, so the harness
    averages plain scores and the comparison scores with their stderrs, over the same benchmarks."""
    return {name: mean([per_benchmark[b] for b in members]) for name, members in AVERAGES.items()}


def task_names(data_root: str | Path = DATA_ROOT) -> dict[str, str]:
    """Per benchmark, our task if all its files exist under `data_root`, else the stock (hub) task."""
    root = Path(data_root)
    return {name: b.task if all((root / f).is_file() for f in b.data_files) else b.stock_task
            for name, b in BENCHMARKS.items()}
