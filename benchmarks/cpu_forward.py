"""Forward time of the teacher vs the swapped model on this CPU, side by side in one process.

Usage (from the repo root): python -m benchmarks.cpu_forward [--tokens 1024] [--repeats 7]
Writes benchmarks/results/cpu_forward.json with the command, the machine, every timing and the
medians. Teacher and student are the same model object: only the attention implementation is
switched between runs, alternating, so drift on a noisy machine hits both alike.
"""
import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from pipeline.config import HybridConfig, TeacherConfig
from pipeline.hybrid import ATTN_IMPLEMENTATION, linearize
from pipeline.teacher import load_teacher

RESULT = Path(__file__).parent / "results" / "cpu_forward.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    torch.manual_seed(0)
    teacher = TeacherConfig()
    model = linearize(load_teacher(teacher.source), HybridConfig())
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens))
    implementations = {"teacher_sdpa": "sdpa", "student_hybrid": ATTN_IMPLEMENTATION}
    times: dict[str, list[float]] = {name: [] for name in implementations}
    with torch.no_grad():
        for repeat in range(args.repeats + 1):  # the first round warms up and is dropped
            for name, implementation in implementations.items():
                model.set_attn_implementation(implementation)
                start = time.perf_counter()
                model(ids)
                if repeat:
                    times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "command": "python -m benchmarks.cpu_forward " + " ".join(sys.argv[1:]),
        "model": teacher.source, "tokens": args.tokens, "batch": 1, "dtype": "float32",
        "attention": HybridConfig().to_dict(),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "times_s": times, "median_s": medians,
        "student_over_teacher": medians["student_hybrid"] / medians["teacher_sdpa"],
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    json.dump({k: result[k] for k in ("median_s", "student_over_teacher")}, sys.stdout, indent=2)


if __name__ == "__main__":
    main()
