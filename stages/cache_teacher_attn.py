"""DVC stage `cache-teacher-attn`: the teacher's hidden states entering each transfer block.

../shared/design/lolcats.md §4. Usage: python -m stages.cache_teacher_attn DATA_DIR OUT_DIR METRICS_JSON
"""
import argparse

from pipeline import tracking
from pipeline.config import CacheTeacherAttnConfig, ComputeConfig, TeacherConfig, TrackingConfig
from pipeline.data import load_prepared
from pipeline.stage import load_blocks, run_stage
from pipeline.teacher import load_teacher
from pipeline.teacher_states import write_teacher_states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", help="prepare-data's DatasetDict")
    parser.add_argument("out", help="folder for the state shards")
    parser.add_argument("metrics", help="DVC metrics JSON")
    args = parser.parse_args()
    teacher, compute, cfg, track = load_blocks(TeacherConfig, ComputeConfig, CacheTeacherAttnConfig, TrackingConfig)

    with tracking.stage_run("cache-teacher-attn", [teacher, compute, cfg], track) as run:
        model = load_teacher(teacher.source, compute.torch_dtype, compute.torch_device)
        metrics = write_teacher_states(model, load_prepared(args.data), cfg, args.out)
        run.log_metrics(metrics, args.metrics)


if __name__ == "__main__":
    run_stage(main)
