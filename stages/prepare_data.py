"""DVC stage `prepare-data`: Alpaca rows → packed train/validation chunks on disk.

../shared/design/lolcats.md §2 Data. SOURCE_JSON is resolve-source's pin of `prepare-data.source`
(sha256 or hub revision): the revision read, and tags of the MLflow run.
Usage: python -m stages.prepare_data SOURCE_JSON OUT_DIR METRICS_JSON
"""
import argparse

from pipeline import tracking
from pipeline.config import PrepareDataConfig, TeacherConfig, TrackingConfig
from pipeline.data import prepare_alpaca, read_alpaca_rows, save_prepared
from pipeline.source import read_identity
from pipeline.stage import load_blocks, run_stage
from pipeline.teacher import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source", help="data/source.json, written by the resolve-source stage")
    parser.add_argument("out", help="folder for the DatasetDict (train, validation)")
    parser.add_argument("metrics", help="DVC metrics JSON")
    args = parser.parse_args()
    teacher, cfg, track = load_blocks(TeacherConfig, PrepareDataConfig, TrackingConfig)
    identity = read_identity(args.source, cfg.source)
    rows = read_alpaca_rows(cfg.source, identity.get("revision"))  # a missing file fails here, before the tokenizer
    tokenizer = load_tokenizer(teacher.source)  # and an unusable teacher.source before MLflow records a run

    with tracking.stage_run("prepare-data", [teacher, cfg], track) as run:
        for key in ("sha256", "revision"):
            if key in identity:
                run.set_tag(f"source_{key}", identity[key])
        prepared = prepare_alpaca(rows, tokenizer, cfg)
        save_prepared(prepared.dataset, args.out)
        run.log_metrics(prepared.metrics, args.metrics)


if __name__ == "__main__":
    run_stage(main)
