"""The long-context probes through lm-eval, binned by distance and position (`pipeline.probes`).

lm-eval scores the two tasks as it scores any loglikelihood task; with `log_samples` it also returns
each document's score beside the document, which is what the bins need: passkey accuracy per target
distance, loss per position bin. Each bin's stderr is lm-eval's `mean_stderr` of its documents'
scores (NaN for a bin of one document). Which bins lie beyond the window is the report's reading.
"""
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable

import torch
from lm_eval import simple_evaluate
from lm_eval.api.metrics import mean_stderr
from lm_eval.tasks import TaskManager

from ..config import LmEvalConfig
from ..io import DataFileError
from ..probes import PASSKEY_FILE, POSITION_LOSS_FILE, PROBES_DIR
from .lm_model import LolcatsLM
from .suite import TASKS_DIR

PASSKEY_TASK, POSITION_LOSS_TASK = "lolcats_passkey", "lolcats_position_loss"


def _mean(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (mean_stderr(values) if len(values) > 1 else math.nan)


def binned(samples: list[dict], score: str, prefix: str, key: Callable[[dict], str]) -> dict[str, float]:
    """`<prefix>_<bin>`, its `_stderr` and `_docs` per bin of `key(doc)`, bins in first-seen order."""
    bins: dict[str, list[float]] = defaultdict(list)
    for sample in samples:
        bins[key(sample["doc"])].append(float(sample[score]))
    out = {}
    for name, values in bins.items():
        value, stderr = _mean(values)
        out |= {f"{prefix}_{name}": value, f"{prefix}_{name}_stderr": stderr, f"{prefix}_{name}_docs": float(len(values))}
    return out


def probe_metrics(samples: dict[str, list[dict]]) -> dict[str, float]:
    """The binned probe metrics (keys as `pipeline.comparison.PASSKEY_BIN` / `POSITION_BIN` read them) from
    lm-eval's per-document samples of both tasks."""
    passkey = binned(samples[PASSKEY_TASK], "acc", "passkey_acc", lambda doc: f"d{doc['target_distance']}")
    position = binned(samples[POSITION_LOSS_TASK], "loss", "position_loss", lambda doc: f"{doc['start']}_{doc['end']}")
    return passkey | position


def _longest_probe() -> int:
    """Tokens of the longest probe request: a prompt and its key (a space and one token per digit at
    most), or an article up to a bin's end."""
    docs = {name: [json.loads(line) for line in open(PROBES_DIR / name)] for name in (PASSKEY_FILE, POSITION_LOSS_FILE)}
    return max([d["context_tokens"] + len(d["key"]) + 1 for d in docs[PASSKEY_FILE]]
               + [d["end"] for d in docs[POSITION_LOSS_FILE]])


def evaluate_probes(model: torch.nn.Module, tokenizer, cfg: LmEvalConfig) -> dict[str, float]:
    for name in (PASSKEY_FILE, POSITION_LOSS_FILE):
        if not (PROBES_DIR / name).is_file():
            raise DataFileError(f"{PROBES_DIR / name}: missing; run `dvc repro prepare-probes`")
    lm = LolcatsLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    longest = _longest_probe()
    if longest > lm.max_length:  # lm-eval would cut the context's start, and the key with it
        raise ValueError(f"prepare-probes: a probe of {longest} tokens exceeds the model's {lm.max_length} "
                         "positions; lower prepare-probes.context_lengths or position_bins")
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    results = simple_evaluate(lm, tasks=[PASSKEY_TASK, POSITION_LOSS_TASK], task_manager=manager, log_samples=True,
                              random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed)
    return probe_metrics(results["samples"])
