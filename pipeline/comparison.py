"""Teacher vs students vs baselines: gap closure and recovery (../shared/design/lolcats.md §5).

Gap closure = (student - baseline) / (teacher - baseline), the baseline being the same-compute
linearization without attention transfer (`no_transfer`); recovery = student / teacher. A ratio whose
denominator is not at least GAP_Z standard errors from zero (teacher and baseline not told apart on
this many documents) is undetermined: reported as None, never as a number.
"""
import math
from dataclasses import dataclass

# benchmark -> the metric the paper reports for it (§5)
TASK_METRICS = {"piqa": "acc", "arc_easy": "acc", "arc_challenge": "acc_norm", "hellaswag": "acc_norm",
                "winogrande": "acc", "mmlu": "acc"}
ZERO_SHOT = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")
# Standard errors the gap teacher − baseline must exceed for its ratio to be reported (two-sided ~95%).
# At one stderr a gap of zero passes one time in three, and the ratio over it takes any size and sign:
# the 2026-12-02 H200 run had arc_easy's gap at -1.6 stderr, which gave lolcats a gap closure of -0.71.
GAP_Z = 2.0


@dataclass(frozen=True)
class Score:
    value: float
    stderr: float

    def __sub__(self, other: "Score") -> "Score":
        return Score(self.value - other.value, math.hypot(self.stderr, other.stderr))


def scores(metrics: dict[str, float]) -> dict[str, Score]:
    """Per benchmark (plus `avg_zero_shot` and `avg_all`) the paper's metric with its stderr."""
    out = {task: Score(metrics[f"{task}_{m}"], metrics[f"{task}_{m}_stderr"]) for task, m in TASK_METRICS.items()}
    out["avg_zero_shot"] = _mean([out[t] for t in ZERO_SHOT])
    out["avg_all"] = _mean([out[t] for t in TASK_METRICS])
    return out


def _mean(items: list[Score]) -> Score:
    """Mean of independent estimates: stderrs add in quadrature."""
    return Score(sum(s.value for s in items) / len(items),
                 math.sqrt(sum(s.stderr**2 for s in items)) / len(items))


def determined(gap: Score) -> bool:
    """Whether teacher and baseline differ by more than GAP_Z of their combined stderr."""
    return abs(gap.value) > GAP_Z * gap.stderr


def gap_closure(student: Score, baseline: Score, teacher: Score) -> float | None:
    gap = teacher - baseline
    if not determined(gap):
        return None
    return (student.value - baseline.value) / gap.value


def gaps(results: dict[str, dict[str, float]], teacher: str = "teacher",
         baseline: str = "no_transfer") -> dict[str, Score]:
    """Per benchmark teacher − baseline, the denominator of gap closure; {} without both models."""
    if teacher not in results or baseline not in results:
        return {}
    ours, theirs = scores(results[teacher]), scores(results[baseline])
    return {task: ours[task] - theirs[task] for task in ours}


def recovery(student: Score, teacher: Score) -> float | None:
    return student.value / teacher.value if teacher.value else None


def compare(results: dict[str, dict[str, float]], teacher: str = "teacher",
            baseline: str = "no_transfer") -> dict[str, dict[str, dict[str, float | None]]]:
    """{model: {benchmark: {value, stderr, gap_closure, recovery}}} for every evaluated model."""
    table = {name: scores(metrics) for name, metrics in results.items()}
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for name, per_task in table.items():
        out[name] = {}
        for task, score in per_task.items():
            out[name][task] = {
                "value": score.value, "stderr": score.stderr,
                "gap_closure": gap_closure(score, table[baseline][task], table[teacher][task])
                if baseline in table and teacher in table else None,
                "recovery": recovery(score, table[teacher][task]) if teacher in table else None,
            }
    return out
