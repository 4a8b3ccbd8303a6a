"""DVC stage `lora-recover@VARIANT`: LoRA on q/k/v/o over the transferred model (../shared/design/lolcats.md §3).

For a variant with `transfer: false` the feature maps and window factors train here too (§4 baseline).
Usage: python -m stages.lora_recover VARIANT DATA_DIR TRANSFER_DIR OUT_DIR METRICS_JSON PLOTS_DIR
"""
import argparse
from pathlib import Path

from pipeline import tracking
from pipeline.config import ComputeConfig, LoraRecoverConfig, TeacherConfig, TrackingConfig, VariantConfig
from pipeline.data import load_prepared
from pipeline.hybrid import linearized_digest, load_linearized
from pipeline.io import atomic_write_csv
from pipeline.lora import add_lora, recover
from pipeline.student import save_student
from pipeline.stage import load_blocks, load_entry, run_stage
from pipeline.training import stage_checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name in ("variant", "data", "transfer", "out", "metrics", "plots"):
        parser.add_argument(name)
    args = parser.parse_args()
    teacher, compute, cfg, track = load_blocks(TeacherConfig, ComputeConfig, LoraRecoverConfig, TrackingConfig)
    variant = load_entry(VariantConfig, args.variant)

    with tracking.stage_run(f"lora-recover@{args.variant}", [teacher, compute, cfg, variant], track) as run:
        data = load_prepared(args.data)
        device = compute.torch_device
        model = add_lora(load_linearized(args.transfer, teacher.source, compute.torch_dtype, device), cfg,
                         train_feature_maps=not variant.transfer)
        with stage_checkpoints("lora-recover", args.variant, {
                "blocks": [teacher.to_dict(), compute.to_dict(), cfg.to_dict(), variant.to_dict()],
                "transfer": linearized_digest(args.transfer)}) as checkpoints:
            outcome = recover(model, data, cfg, checkpoints, run.log_step_metrics, variant.window_dropout.lora)
            save_student(model, args.out, teacher.source)
            atomic_write_csv(Path(args.plots) / "loss.csv", outcome.curve_rows())
            run.log_metrics(outcome.metrics(device), args.metrics)


if __name__ == "__main__":
    run_stage(main)
