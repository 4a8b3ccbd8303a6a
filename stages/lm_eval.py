"""DVC stages `lm-eval-teacher`, `lm-eval-window-only` and `lm-eval@VARIANT`: one model scored.

../shared/design/lolcats.md §5. STAGE is the DVC stage's own name, which its MLflow run takes; SOURCE is
`teacher`, an attention config that check-params wrote (the untrained swap: the window-only baseline)
or a saved student folder. The teacher has its own stage, so DVC keeps its scores when only student
params change.
Usage: python -m stages.lm_eval STAGE SOURCE DATA_DIR METRICS_JSON
"""
import argparse
import time

from pipeline import tracking
from pipeline.config import ComputeConfig, LmEvalConfig, TeacherConfig, TrackingConfig, read_scoped_attention
from pipeline.data import load_prepared
from pipeline.evaluation.harness import evaluate_model
from pipeline.evaluation.models import evaluated_model
from pipeline.stage import load_blocks, run_stage
from pipeline.throughput import counted_tokens, throughput_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name in ("stage", "source", "data", "metrics"):
        parser.add_argument(name)
    args = parser.parse_args()
    teacher, compute, cfg, track = load_blocks(TeacherConfig, ComputeConfig, LmEvalConfig, TrackingConfig)
    swap = [read_scoped_attention(args.source)] if args.source.endswith(".json") else []

    with tracking.stage_run(args.stage, [teacher, compute, *swap, cfg], track) as run:
        start = time.perf_counter()
        model, tokenizer = evaluated_model(args.source, teacher, compute)
        with counted_tokens(model) as tokens:
            metrics = evaluate_model(model, tokenizer, cfg, load_prepared(args.data)["validation"])
        run.log_metrics(dict(metrics, **throughput_metrics(tokens[0], time.perf_counter() - start,
                                                           compute.torch_device)), args.metrics)


if __name__ == "__main__":
    run_stage(main)
