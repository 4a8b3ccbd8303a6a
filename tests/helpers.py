"""Inputs that more than one test module builds: kernel inputs, Alpaca rows, lm-eval metrics.

Here rather than in one test module that the others import, so importing a helper never collects
(or depends on) another module's tests. The comparison itself is kernels.testing.assert_close.
"""
import json
from pathlib import Path

import torch

from pipeline.comparison import TASK_METRICS


def make_inputs(B: int, H: int, Hkv: int, T: int, D: int, F: int, mode: str,
                dtype: torch.dtype = torch.float32) -> list[torch.Tensor | None]:
    """q, k, v, fq, fk, gamma of hybrid attention, each requiring grad; None where `mode` has no use for it."""
    q = torch.randn(B, H, T, D, dtype=dtype)
    k = torch.randn(B, Hkv, T, D, dtype=dtype)
    v = torch.randn(B, Hkv, T, D, dtype=dtype)
    # positive features, as every feature map produces
    fq = torch.rand(B, H, T, F, dtype=dtype) + 0.05 if mode != "window_only" else None
    fk = torch.rand(B, H, T, F, dtype=dtype) + 0.05 if mode != "window_only" else None
    # gamma only matters when both branches share the normaliser; it cancels in window-only
    gamma = torch.rand(H, dtype=dtype) * 0.8 + 0.1 if mode == "hybrid" else None
    return [t.requires_grad_() if t is not None else None for t in (q, k, v, fq, fk, gamma)]


def window_for(mode: str, window_size: int) -> int:
    """A linear-only layer has no window."""
    return 0 if mode == "linear_only" else window_size


def make_rows(n: int) -> list[dict[str, str]]:
    """n Alpaca rows, with and without an input, of outputs of three lengths."""
    return [{"instruction": f"Tell story {i}.", "input": "about a cat" if i % 2 else "",
             "output": "Once upon a time there was a dog. " * (1 + i % 3)} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def scored(value: float, stderr: float = 0.01, **overrides: float) -> dict[str, float]:
    """lm-eval stage metrics: every benchmark at `value` ± `stderr`, some overridden by name."""
    out = {}
    for task, metric in TASK_METRICS.items():
        out[f"{task}_{metric}"] = overrides.get(task, value)
        out[f"{task}_{metric}_stderr"] = stderr
    return out
