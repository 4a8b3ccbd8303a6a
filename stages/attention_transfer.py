"""DVC stage `attention-transfer@VARIANT`: feature maps and window factors fitted to the teacher.

../shared/design/lolcats.md §2. A variant with `transfer: false` (the no-transfer baseline) trains
nothing here: it only measures the swap's per-layer MSE and saves the initial weights.
Usage: python -m stages.attention_transfer VARIANT STATES_DIR OUT_DIR METRICS_JSON PLOTS_DIR
"""
import argparse
import dataclasses
import shutil
from pathlib import Path

from pipeline import tracking
from pipeline.config import AttentionTransferConfig, HybridConfig, TeacherConfig, TrackingConfig, VariantConfig
from pipeline.hybrid import hybrid_state_dict, linearize, save_linearized
from pipeline.io import atomic_write_csv
from pipeline.stage import load_blocks, load_entry, run_stage
from pipeline.teacher import load_teacher
from pipeline.teacher_states import TeacherStates
from pipeline.training import checkpoint_dir
from pipeline.transfer import transfer_all_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name in ("variant", "states", "out", "metrics", "plots"):
        parser.add_argument(name)
    args = parser.parse_args()
    teacher, attention, cfg, track = load_blocks(TeacherConfig, HybridConfig, AttentionTransferConfig, TrackingConfig)
    variant = load_entry(VariantConfig, args.variant)
    attention = dataclasses.replace(attention, mode=variant.mode or attention.mode)
    if not variant.transfer:
        cfg = dataclasses.replace(cfg, epochs=0)

    with tracking.stage_run(f"attention-transfer@{args.variant}", [teacher, attention, cfg, variant], track) as run:
        model = linearize(load_teacher(teacher.source, teacher.torch_dtype), attention)
        states = TeacherStates.open(args.states)
        checkpoints = checkpoint_dir("attention-transfer", args.variant, {
            "blocks": [teacher.to_dict(), attention.to_dict(), cfg.to_dict()], "states": states.manifest})
        outcome = transfer_all_blocks(model, states, cfg, checkpoints, run.log_step_metrics)

        save_linearized(model, args.out, teacher.source)
        atomic_write_csv(Path(args.plots) / "per_layer_mse.csv", outcome.per_layer_rows())
        atomic_write_csv(Path(args.plots) / "loss.csv", outcome.curve_rows())
        trainable = sum(p.numel() for p in hybrid_state_dict(model).values()) if variant.transfer else 0
        run.log_metrics(dict(outcome.metrics(), trainable_params=trainable), args.metrics)
        shutil.rmtree(checkpoints, ignore_errors=True)


if __name__ == "__main__":
    run_stage(main)
