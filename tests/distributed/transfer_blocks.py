"""Run under torchrun by tests/test_distributed.py: attention transfer of stories260K from a teacher-state
cache, its blocks spread over the ranks; rank 0 saves the trained hybrid weights and per-layer results.
Usage: torchrun --nproc-per-node N tests/distributed/transfer_blocks.py STORIES STATES CHECKPOINTS OUT
KILL_AT=RANK:UPDATE kills that rank (SIGKILL, as an out-of-memory kill would) once its training logs that update.
"""
import logging
import os
import signal
import sys
from pathlib import Path

import torch

from pipeline.config import AttentionTransferConfig, HybridConfig
from pipeline.distributed import world
from pipeline.hybrid import hybrid_state_dict, linearize
from pipeline.teacher import load_teacher
from pipeline.teacher_states import TeacherStates
from pipeline.transfer import transfer_all_blocks

stories, states, checkpoints, out = sys.argv[1:]
logging.basicConfig(level=logging.INFO)  # the test reads the resume lines
kill_rank, kill_update = map(int, os.environ.get("KILL_AT", "-1:0").split(":"))
with world(torch.device("cpu")) as ranks:
    def log_metrics(metrics: dict, step: int) -> None:
        if ranks.rank == kill_rank and step >= kill_update:
            os.kill(os.getpid(), signal.SIGKILL)

    model = linearize(load_teacher(stories), HybridConfig(window_size=16))
    outcome = transfer_all_blocks(model, TeacherStates.open(states), AttentionTransferConfig(epochs=1, eval_every=2),
                                  Path(checkpoints), log_metrics, world=ranks)
    if ranks.main:
        torch.save({"weights": hybrid_state_dict(model), "rows": outcome.per_layer_rows(),
                    "updates": [b.fit.updates for b in outcome.blocks], "ranks": ranks.size}, out)
