"""DVC stage `lora-recover@VARIANT`: LoRA on q/k/v/o over the transferred model (../shared/design/lolcats.md §3).

For a variant with `transfer: false` the feature maps and window factors train here too (§4 baseline).
Several processes: `torchrun --nproc-per-node N -m stages.lora_recover ...` (the same arguments). Each
rank loads the model, which is then sharded over the ranks with FSDP2, and runs 1/N of every update's
forwards (grad_accum / batch_size must be a multiple of N); every rank evaluates the whole validation
split. Rank 0 alone logs to MLflow, writes the checkpoints and gathers the trained weights into an
ordinary (unsharded) student that it saves, with the plots and metrics (pipeline/sharded_training.py).
`lora-recover.activation_checkpointing` recomputes each decoder layer's activations in the backward
pass instead of keeping them (at any N): less memory, the same gradients.
Usage: python -m stages.lora_recover VARIANT DATA_DIR TRANSFER_DIR OUT_DIR METRICS_JSON PLOTS_DIR
"""
import argparse
import contextlib
import functools
from pathlib import Path

from pipeline import distributed, tracking
from pipeline.config import ComputeConfig, LoraRecoverConfig, TeacherConfig, TrackingConfig, VariantConfig
from pipeline.data import load_prepared
from pipeline.hybrid import linearized_digest
from pipeline.io import atomic_write_csv
from pipeline.lora import recover, student_to_train
from pipeline.sharded_training import gathered
from pipeline.student import save_student
from pipeline.stage import load_blocks, load_entry, run_stage
from pipeline.training import no_log, stage_checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name in ("variant", "data", "transfer", "out", "metrics", "plots"):
        parser.add_argument(name)
    args = parser.parse_args()
    teacher, compute, cfg, track = load_blocks(TeacherConfig, ComputeConfig, LoraRecoverConfig, TrackingConfig)
    variant = load_entry(VariantConfig, args.variant)

    with distributed.world(compute.torch_device) as world:
        cfg.check_processes(world.size)  # before any work: every rank must get as many forwards
        stage_run = (tracking.stage_run(f"lora-recover@{args.variant}", [teacher, compute, cfg, variant], track)
                     if world.main else contextlib.nullcontext())
        with stage_run as run:
            data = load_prepared(args.data)
            device = world.device(compute.torch_device)
            student = functools.partial(student_to_train, args.transfer, teacher.source, compute.torch_dtype,
                                        cfg=cfg, train_feature_maps=not variant.transfer)  # (device) -> PeftModel
            model = student(device)
            identity = {"blocks": [teacher.to_dict(), compute.to_dict(), cfg.to_dict(), variant.to_dict()],
                        "transfer": linearized_digest(args.transfer)}
            if world.size > 1:  # another summation order, and another checkpoint layout: not resumed by N = 1
                identity["processes"] = world.size
            with stage_checkpoints("lora-recover", args.variant, identity, remove=world.main) as checkpoints:
                outcome = recover(model, data, cfg, checkpoints, run.log_step_metrics if world.main else no_log,
                                  variant.window_dropout.lora, world)
                if world.size > 1:  # the sharded weights gathered into an ordinary student on rank 0
                    model = gathered(model, student("cpu") if world.main else None)
                if not world.main:
                    return
                run.set_tag("world_size", str(world.size))
                save_student(model, args.out, teacher.source)
                atomic_write_csv(Path(args.plots) / "loss.csv", outcome.curve_rows())
                run.log_metrics(outcome.metrics(device), args.metrics)


if __name__ == "__main__":
    run_stage(main)
