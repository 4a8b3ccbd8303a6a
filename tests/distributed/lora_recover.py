"""Run by tests/test_distributed_lora.py, under torchrun or as one plain process: lora-recover of a saved
stories260K transfer, as the stage runs it; rank 0 saves the student (unsharded) and the results.
Usage: [torchrun --nproc-per-node N] tests/distributed/lora_recover.py STORIES TRANSFER DATA CHECKPOINTS OUT
KILL_AT=RANK:UPDATE kills that rank (SIGKILL, as an out-of-memory kill would) once it has run that update.
"""
import logging
import os
import signal
import sys
from pathlib import Path

import torch

from pipeline.config import LoraRecoverConfig
from pipeline.data import load_prepared
from pipeline.distributed import world
from pipeline.lora import recover, student_to_train
from pipeline.sharded_training import gathered
from pipeline.student import save_student

# 6 train chunks, 4 per update in 2 forwards: updates of 4, 2, 4, 2 chunks (the short ones leave rank 1 a
# forward that counts 0), validation after updates 2 and 4; SSD's window dropout exercises the RNG
CFG = LoraRecoverConfig(lr=1e-2, epochs=2, grad_accum=4, batch_size=2, max_updates=None, eval_every=2)
WINDOW_DROPOUT = 0.5

stories, transfer, data, checkpoints, out = sys.argv[1:]
logging.basicConfig(level=logging.INFO)  # the test reads the resume line
kill_rank, kill_update = map(int, os.environ.get("KILL_AT", "-1:0").split(":"))
with world(torch.device("cpu")) as ranks:
    def student() -> torch.nn.Module:  # as the stage builds it, in fp32 on the CPU
        return student_to_train(transfer, stories, torch.float32, "cpu", CFG, train_feature_maps=False)

    def log_metrics(metrics: dict, step: int) -> None:
        if ranks.rank == kill_rank and step >= kill_update:
            os.kill(os.getpid(), signal.SIGKILL)

    model = student()
    outcome = recover(model, load_prepared(data), CFG, Path(checkpoints), log_metrics, WINDOW_DROPOUT, ranks)
    if ranks.size > 1:
        model = gathered(model, student() if ranks.main else None)
    if ranks.main:
        save_student(model, Path(out) / "student", stories)
        torch.save({"lora": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                    "rows": outcome.curve_rows(), "updates": outcome.fit.updates,
                    "items_seen": outcome.fit.items_seen, "ranks": ranks.size}, Path(out) / "result.pt")
