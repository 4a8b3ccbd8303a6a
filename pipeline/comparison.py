"""Teacher vs students vs baselines: gap closure and recovery (../shared/design/lolcats.md §5).

Gap closure = (student - baseline) / (teacher - baseline), the baseline being the same-compute
linearization without attention transfer (`no_transfer`); recovery = student / teacher. A ratio whose
denominator is not at least GAP_Z standard errors from zero (teacher and baseline not told apart on
this many documents) is undetermined: reported as None, never as a number. The linear-branch gains
(long-context probes against the window-only baseline) follow the same GAP_Z rule.
"""
import math
import re
from dataclasses import dataclass

from .evaluation.suite import BENCHMARKS, averages

# benchmark -> the metric the paper reports for it (§5), as the report and figures label it
TASK_METRICS = {name: b.metric for name, b in BENCHMARKS.items()}
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
    """Per benchmark (plus the averages of `suite.AVERAGES`) the paper's metric with its stderr."""
    out = {task: Score(metrics[f"{task}_{m}"], metrics[f"{task}_{m}_stderr"]) for task, m in TASK_METRICS.items()}
    return out | averages(out, _mean)


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


# What the linear branch buys beyond the window (pipeline.probes): a model's probe score there against
# the window-only baseline's, signed so that a positive gain means the model does better.
PASSKEY_BIN = re.compile(r"passkey_acc_d(\d+)")  # accuracy at a target distance (tokens)
POSITION_BIN = re.compile(r"position_loss_(\d+)_(\d+)")  # loss per token at positions [start, end)
LINEAR_BRANCH_GAINS = {"linear_branch_gain": ("passkey_acc_beyond", 1),  # retrieval accuracy, higher is better
                       "linear_branch_gain_loss": ("position_loss_beyond", -1)}  # per-token loss, lower is better


def probe_bins(metrics: dict[str, float], pattern: re.Pattern) -> list[str]:
    """The probe metric keys of one kind (passkey distances or position bins), in numeric order."""
    keys = [k for k in metrics if pattern.fullmatch(k)]
    return sorted(keys, key=lambda k: tuple(map(int, pattern.fullmatch(k).groups())))


def reach(window_size: int) -> int:
    """Tokens back from which a key lies outside the softmax window of either kind (terrace sees up to 2w-1)."""
    return 2 * window_size


def _pooled(metrics: dict[str, float], keys: list[str]) -> Score:
    """The documents of several bins as one sample: their mean, and its stderr from the bins' stderrs."""
    docs = [metrics[f"{k}_docs"] for k in keys]
    total = sum(docs)
    value = sum(n * metrics[k] for n, k in zip(docs, keys)) / total
    return Score(value, math.sqrt(sum((n * metrics[f"{k}_stderr"]) ** 2 for n, k in zip(docs, keys))) / total)


def beyond_window(metrics: dict[str, float], window_size: int) -> dict[str, Score]:
    """passkey_acc_beyond and position_loss_beyond: the bins whose key, or whose first position, lies at
    least `reach(window_size)` tokens back, pooled (check-params makes sure there are such bins)."""
    far = reach(window_size)
    passkey = [k for k in probe_bins(metrics, PASSKEY_BIN) if int(PASSKEY_BIN.fullmatch(k)[1]) >= far]
    position = [k for k in probe_bins(metrics, POSITION_BIN) if int(POSITION_BIN.fullmatch(k)[1]) >= far]
    if not passkey or not position:
        raise ValueError(f"no probe lies {far} tokens back (2 x attention.window_size); "
                         "raise prepare-probes.distances or position_bins")
    return {"passkey_acc_beyond": _pooled(metrics, passkey), "position_loss_beyond": _pooled(metrics, position)}


def linear_branch_gains(model: dict[str, Score], window_only: dict[str, Score]) -> dict[str, Score]:
    """Per gain, sign x (model − window_only) of their `beyond_window` scores. The stderrs add in
    quadrature, as for independent samples; both models score the same documents, so this errs wide."""
    gains = {}
    for name, (key, sign) in LINEAR_BRANCH_GAINS.items():
        difference = model[key] - window_only[key]
        gains[name] = Score(sign * difference.value, difference.stderr)
    return gains
