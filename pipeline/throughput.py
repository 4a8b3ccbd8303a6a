"""What every stage that runs a model reports about its speed: tokens/s, wall time, peak GPU memory.

One definition, so the stages' metrics JSONs and MLflow runs carry the same names: `tokens` (through
the model), `tokens_per_s`, `wall_time_s` and, on CUDA, `peak_gpu_memory_gib` (torch's allocator
peak in this process: each stage is a process of its own).
"""
import contextlib
from collections.abc import Iterator

import torch


def memory_metrics(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def throughput_metrics(tokens: int, wall_time_s: float, device: torch.device) -> dict[str, float]:
    return {"tokens": float(tokens), "tokens_per_s": tokens / wall_time_s if wall_time_s > 0 else 0.0,
            "wall_time_s": wall_time_s, **memory_metrics(device)}


@contextlib.contextmanager
def counted_tokens(model: torch.nn.Module) -> Iterator[list[int]]:
    """Counts the input tokens of every forward of `model` (padding included) into the yielded [n]."""
    count = [0]

    def add(module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            count[0] += ids.numel()

    handle = model.register_forward_pre_hook(add, with_kwargs=True)
    try:
        yield count
    finally:
        handle.remove()
