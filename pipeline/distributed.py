"""The processes of one model stage: N under `torchrun --nproc-per-node N`, or this one alone.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK and a rendezvous; `world()` joins it through
torch.distributed (NCCL on CUDA, gloo on the CPU) and leaves it at the end. Without torchrun (or with
N = 1) nothing is initialised and the stage runs as one process, exactly as it always has.
Attention transfer spreads its independent blocks over the ranks (`World.owns`); what each rank
trained is then shared, so that every rank, and rank 0 which writes the stage's outputs and is the
only one to log to MLflow, ends with the whole model. cache-teacher-attn deals its state shards the
same way (`World.items`) and can shard the frozen teacher over the ranks with FSDP2 (`World.fully_shard`).
"""
import contextlib
import os
import signal
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import fsdp


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: writes the outputs and logs to MLflow."""
        return self.rank == 0

    def owner(self, block: int) -> int:
        """The rank that trains `block`: blocks dealt round-robin, so each rank's share of the layers is even."""
        return block % self.size

    def owns(self, block: int) -> bool:
        return self.owner(block) == self.rank

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: its own GPU (LOCAL_RANK) on CUDA, the given one otherwise."""
        if device.type != "cuda" or self.size == 1:
            return device
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def all_gather(self, item: object) -> list:
        """Every rank's `item`, in rank order (picklable objects)."""
        if self.size == 1:
            return [item]
        items: list = [None] * self.size
        dist.all_gather_object(items, item)
        return items

    def share(self, tensors: Iterable[torch.Tensor], owner: int) -> None:
        """Overwrite `tensors` on every rank with the owner's values, in place (bitwise copies)."""
        if self.size > 1:
            for tensor in tensors:
                dist.broadcast(tensor.data, src=owner)

    def items(self, count: int) -> range:
        """The indices among `count` items this rank takes: dealt round-robin, as `owner` deals blocks."""
        return range(self.rank, count, self.size)

    def barrier(self) -> None:
        """Wait until every rank gets here (e.g. until rank 0 has prepared an output folder)."""
        if self.size > 1:
            dist.barrier()

    def fully_shard(self, model: torch.nn.Module, unit_classes: Collection[str]) -> None:
        """FSDP2 over the ranks, in place: each module of `model` whose class is named in `unit_classes`
        (HF's `_no_split_modules`: the decoder layers), then the rest of `model`, holds 1/N of its weights
        on each rank; a forward all-gathers each layer's exact weights just before using it, so it
        computes what the unsharded model does, but every forward is a collective of all ranks."""
        for layer in [m for m in model.modules() if type(m).__name__ in unit_classes]:
            fsdp.fully_shard(layer)
        fsdp.fully_shard(model)


@contextlib.contextmanager
def world(device: torch.device) -> Iterator[World]:
    """This stage's processes: a torchrun rendezvous when WORLD_SIZE > 1, else this process alone."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        yield World()
        return
    # torchrun stops the other ranks with SIGTERM when one fails; raised as an exception here, it unwinds
    # the stage, whose MLflow run (rank 0's) is then marked FAILED instead of being left RUNNING
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    finally:
        dist.destroy_process_group()
        signal.signal(signal.SIGTERM, previous)


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum} (SIGTERM): torchrun stops every rank when one of them fails")
