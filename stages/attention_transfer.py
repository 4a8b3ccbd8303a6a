"""DVC stage `attention-transfer@VARIANT`: feature maps and window factors fitted to the teacher.

../shared/design/lolcats.md §2. A variant with `transfer: false` (the no-transfer baseline) trains
nothing here: it only measures the swap's per-layer MSE and saves the initial weights.
Several processes: `torchrun --nproc-per-node N -m stages.attention_transfer ...` (the same arguments).
Usage: python -m stages.attention_transfer VARIANT ATTENTION_JSON DATA_DIR STATES_DIR OUT_DIR METRICS_JSON PLOTS_DIR
(ATTENTION_JSON: the variant's attention config, written by check-params; DATA_DIR, prepare-data's
chunks, is read only with online teacher states.)
"""
import argparse
import contextlib
import dataclasses
import logging
from pathlib import Path

from pipeline import distributed, tracking
from pipeline.config import (AttentionTransferConfig, ComputeConfig, TeacherConfig, TrackingConfig, VariantConfig,
                             read_scoped_attention)
from pipeline.data import load_prepared
from pipeline.hybrid import linearize, save_linearized
from pipeline.io import atomic_write_csv
from pipeline.stage import load_blocks, load_entry, run_stage
from pipeline.teacher import load_teacher
from pipeline.teacher_states import TeacherStates
from pipeline.training import no_log, stage_checkpoints
from pipeline.transfer import transfer_all_blocks

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for name in ("variant", "attention", "data", "states", "out", "metrics", "plots"):
        parser.add_argument(name)
    args = parser.parse_args()
    teacher, compute, cfg, track = load_blocks(TeacherConfig, ComputeConfig, AttentionTransferConfig, TrackingConfig)
    variant = load_entry(VariantConfig, args.variant)
    attention = read_scoped_attention(args.attention)
    if not variant.transfer:
        cfg = dataclasses.replace(cfg, epochs=0)

    # under `torchrun --nproc-per-node N` the blocks are spread over N processes; rank 0 alone logs to
    # MLflow and writes the outputs (pipeline/distributed.py)
    with distributed.world(compute.torch_device) as world:
        stage_run = (tracking.stage_run(f"attention-transfer@{args.variant}", [teacher, compute, attention, cfg,
                                                                                variant], track)
                     if world.main else contextlib.nullcontext())
        with stage_run as run:
            device = world.device(compute.torch_device)
            model = linearize(load_teacher(teacher.source, compute.torch_dtype, device), attention)
            states = TeacherStates.open(args.states, load_prepared(args.data), model.get_input_embeddings()
                                        ).with_seq_len(variant.transfer_seq_len, model.config.max_position_embeddings)
            if world.main and world.size > len(states.blocks):
                log.warning("attention-transfer: %d processes for %d transfer blocks; %d of them train nothing",
                            world.size, len(states.blocks), world.size - len(states.blocks))
            with stage_checkpoints("attention-transfer", args.variant, {
                    "blocks": [teacher.to_dict(), compute.to_dict(), attention.to_dict(), cfg.to_dict()],
                    "window_dropout": variant.window_dropout.transfer, "seq_len": states.seq_len,
                    "states": states.manifest}, remove=world.main) as checkpoints:
                outcome = transfer_all_blocks(model, states, cfg, checkpoints,
                                              run.log_step_metrics if world.main else no_log,
                                              variant.window_dropout.transfer, world)
                if not world.main:
                    return
                run.set_tag("world_size", str(world.size))
                run.set_tag("unimproved_blocks", ",".join(map(str, outcome.unimproved_blocks)) or "none")
                outcome.check_improvement(cfg.max_unimproved_frac, checkpoints)

                save_linearized(model, args.out, teacher.source)
                atomic_write_csv(Path(args.plots) / "per_layer_mse.csv", outcome.per_layer_rows())
                atomic_write_csv(Path(args.plots) / "loss.csv", outcome.curve_rows())
                run.log_metrics(outcome.metrics(device), args.metrics)


if __name__ == "__main__":
    run_stage(main)
