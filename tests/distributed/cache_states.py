"""Run under torchrun by tests/test_distributed_cache.py: the teacher-state cache of stories260K, its shards
dealt over the ranks (with SHARD_TEACHER=1 the teacher sharded over them by FSDP2); rank 0 writes the
metrics as JSON.
Usage: torchrun --nproc-per-node N tests/distributed/cache_states.py STORIES PREPARED OUT METRICS_JSON
"""
import json
import logging
import os
import sys
from pathlib import Path

import torch

from pipeline.config import CacheTeacherAttnConfig
from pipeline.data import load_prepared
from pipeline.distributed import world
from pipeline.teacher import load_teacher
from pipeline.teacher_states import shard_teacher, write_teacher_states

stories, prepared, out, metrics_json = sys.argv[1:]
logging.basicConfig(level=logging.INFO)
with world(torch.device("cpu")) as ranks:
    model = load_teacher(stories)
    if os.environ.get("SHARD_TEACHER") == "1":
        shard_teacher(model, ranks)
    metrics = write_teacher_states(model, load_prepared(prepared), CacheTeacherAttnConfig(block_size=2), out, ranks)
    if ranks.main:
        Path(metrics_json).write_text(json.dumps(metrics))
