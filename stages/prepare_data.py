"""DVC stage `prepare-data`: Alpaca rows → packed train/validation chunks on disk.

../shared/design/lolcats.md §2 Data. Usage: python -m stages.prepare_data OUT_DIR METRICS_JSON
"""
import argparse

from pipeline import tracking
from pipeline.config import PrepareDataConfig, TeacherConfig, TrackingConfig
from pipeline.data import prepare_alpaca, read_alpaca_rows, save_prepared
from pipeline.stage import load_blocks, run_stage
from pipeline.teacher import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", help="folder for the DatasetDict (train, validation)")
    parser.add_argument("metrics", help="DVC metrics JSON")
    args = parser.parse_args()
    teacher, cfg, track = load_blocks(TeacherConfig, PrepareDataConfig, TrackingConfig)
    rows = read_alpaca_rows(cfg.source)  # a missing local file fails here, before the tokenizer loads
    tokenizer = load_tokenizer(teacher.source)  # and an unusable teacher.source before MLflow records a run

    with tracking.stage_run("prepare-data", [teacher, cfg], track) as run:
        prepared = prepare_alpaca(rows, tokenizer, cfg)
        save_prepared(prepared.dataset, args.out)
        run.log_metrics(prepared.metrics, args.metrics)


if __name__ == "__main__":
    run_stage(main)
