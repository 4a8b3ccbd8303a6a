"""DVC stage `report`: tables, gap closure, perplexities, cost and figures in reports/, logged to MLflow.

../shared/design/lolcats.md §5-§6. Closes this execution's MLflow parent run, which then carries the
headline metrics beside every param of params.yaml, the report and its figures as artifacts, and the
tags `gap_closure_undetermined` (the benchmarks whose teacher and baseline are indistinguishable) and
`linear_branch_gain_undetermined` (the models whose gain over window_only is inside its noise).
Usage: python -m stages.report METRICS_DIR PLOTS_DIR REPORT_DIR METRICS_JSON [GPU_STEPS_JSON]
(GPU_STEPS_JSON: a benchmarks.gpu_stage_steps result, for the projected cost at 8B / 70B / 405B.)
"""
import argparse
from pathlib import Path

from pipeline import tracking
from pipeline.config import HybridConfig, LmEvalConfig, TrackingConfig
from pipeline.report import undetermined_gaps, undetermined_linear_branch_gains, write_report
from pipeline.stage import load_blocks, run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name in ("metrics_dir", "plots_dir", "out", "metrics"):
        parser.add_argument(name)
    parser.add_argument("gpu_steps", nargs="?", type=Path)
    args = parser.parse_args()
    lm_eval, attention, track = load_blocks(LmEvalConfig, HybridConfig, TrackingConfig)

    with tracking.stage_run("report", [lm_eval], track, closes_pipeline=True) as run:
        headline, files = write_report(Path(args.metrics_dir), Path(args.plots_dir), Path(args.out),
                                       lm_eval.limit.to_dict(), attention.window_size, args.gpu_steps)
        run.log_metrics(headline, args.metrics)
        run.log_pipeline_metrics(headline)
        # a reader of the parent run sees why a gap closure is missing
        run.set_pipeline_tag("gap_closure_undetermined", ", ".join(undetermined_gaps(headline)) or "none")
        run.set_pipeline_tag("linear_branch_gain_undetermined",
                             ", ".join(undetermined_linear_branch_gains(headline)) or "none")
        for path in files:
            folder = path.parent.relative_to(args.out).as_posix()  # figures/ stays a folder
            for log in (run.log_artifact, run.log_pipeline_artifact):
                log(path, None if folder == "." else folder)


if __name__ == "__main__":
    run_stage(main)
