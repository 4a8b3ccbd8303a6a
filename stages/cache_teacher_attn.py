"""DVC stage `cache-teacher-attn`: the teacher's hidden states entering each transfer block.

../shared/design/lolcats.md §4. Usage: python -m stages.cache_teacher_attn DATA_DIR OUT_DIR METRICS_JSON
Several processes: `torchrun --nproc-per-node N -m stages.cache_teacher_attn ...` (the same arguments):
rank i writes the state shards i, i + N, ... of each split; rank 0 alone logs to MLflow and writes the
manifest and the metrics, which cover every rank's work (pipeline/teacher_states.py). Each rank holds
the whole teacher, or, with `distributed.shard_teacher`, 1/N of it (FSDP2; the states are the same).
"""
import argparse
import contextlib
import logging

from pipeline import distributed, tracking
from pipeline.config import CacheTeacherAttnConfig, ComputeConfig, DistributedConfig, TeacherConfig, TrackingConfig
from pipeline.data import load_prepared
from pipeline.stage import load_blocks, run_stage
from pipeline.teacher import load_teacher
from pipeline.teacher_states import shard_teacher, write_teacher_states

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", help="prepare-data's DatasetDict")
    parser.add_argument("out", help="folder for the state shards")
    parser.add_argument("metrics", help="DVC metrics JSON")
    args = parser.parse_args()
    teacher, compute, cfg, track, processes = load_blocks(TeacherConfig, ComputeConfig, CacheTeacherAttnConfig,
                                                          TrackingConfig, DistributedConfig)

    with distributed.world(compute.torch_device) as world:
        stage_run = (tracking.stage_run("cache-teacher-attn", [teacher, compute, cfg], track)
                     if world.main else contextlib.nullcontext())
        with stage_run as run:
            model = load_teacher(teacher.source, compute.torch_dtype, world.device(compute.torch_device))
            if processes.shard_teacher and world.size == 1:
                log.info("distributed.shard_teacher: one process, so the teacher is not sharded")
            elif processes.shard_teacher:
                shard_teacher(model, world)
            metrics = write_teacher_states(model, load_prepared(args.data), cfg, args.out, world)
            if world.main:
                run.set_tag("world_size", str(world.size))
                run.log_metrics(metrics, args.metrics)


if __name__ == "__main__":
    run_stage(main)
