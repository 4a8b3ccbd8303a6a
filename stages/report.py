"""DVC stage `report`: tables, gap closure, perplexities, cost and figures in reports/, logged to MLflow.

../shared/design/lolcats.md §5-§6. Closes this execution's MLflow parent run, which then carries the
headline metrics beside every param of params.yaml.
Usage: python -m stages.report METRICS_DIR PLOTS_DIR REPORT_DIR METRICS_JSON
"""
import argparse
from pathlib import Path

from pipeline import tracking
from pipeline.config import LmEvalConfig, TrackingConfig
from pipeline.report import write_report
from pipeline.stage import load_blocks, run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name in ("metrics_dir", "plots_dir", "out", "metrics"):
        parser.add_argument(name)
    args = parser.parse_args()
    lm_eval, track = load_blocks(LmEvalConfig, TrackingConfig)

    with tracking.stage_run("report", [lm_eval], track, closes_pipeline=True) as run:
        headline, files = write_report(Path(args.metrics_dir), Path(args.plots_dir), Path(args.out),
                                       lm_eval.limit.to_dict())
        run.log_metrics(headline, args.metrics)
        run.log_pipeline_metrics(headline)
        for path in files:
            run.log_artifact(path)


if __name__ == "__main__":
    run_stage(main)
