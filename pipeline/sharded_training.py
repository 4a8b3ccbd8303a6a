"""`fit` over torchrun's ranks (lora-recover): data parallel, the model sharded by FSDP2.

`shard` puts every decoder layer, then the rest of the model, under `fully_shard`: each rank holds 1/N
of every weight, and every forward and backward is a collective of all ranks. `DataParallel` is what
`fit` then asks of the processes (`pipeline.training.SingleProcess` is one process alone):
  * the forwards (micro-batches) of an update are dealt round-robin, rank r taking forwards r, r + N, ...
    (`LoraRecoverConfig.check_processes` refuses a grad_accum whose forwards N ranks cannot share); each backward carries
    its share of the update's mean and FSDP2 sums the shares, so the update is one process's up to
    float summation order. A round with fewer forwards left than ranks (an epoch's short last update)
    lets the ranks without one repeat a forward that counts 0, since every rank must join each one;
  * the validation split is evaluated whole by every rank, and rank 0's metrics are taken;
  * a non-finite loss part or gradient on any rank is every rank's `NonFiniteError`;
  * rank 0 writes the checkpoint (full tensors, gathered) and reads it back for everyone.
"""
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from peft import PeftModel
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule

from .distributed import World
from .io import atomic_write
from .training import EvalFn, SingleProcess, _load, _snapshot

# what a checkpoint or a saved student holds: whole tensors, gathered to rank 0's CPU (empty elsewhere)
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
_FULL_TRAINABLE = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
# rank 0's whole tensors (the others pass {}) sent to every rank and cut into its shards; strict=False:
# a checkpoint holds the trainable tensors only
_FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
_TENSORS = ("params", "best_params", "optimizer")  # what a checkpoint holds beside the loop's own state


def shard(model: PeftModel, world: World) -> None:
    """FSDP2 over the ranks, in place: each decoder layer (the classes HF names in `_no_split_modules`)
    one unit, then the root; gradients are summed over the ranks, not averaged (each rank's backward
    already carries its share of the update's mean)."""
    world.fully_shard(model, model.get_base_model()._no_split_modules)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # factor 1 with sum-only collectives: a plain sum, on NCCL and gloo alike
            module.set_force_sum_reduction_for_comms(True)
            module.set_gradient_divide_factor(1.0)


def gathered(model: PeftModel, plain: PeftModel | None) -> PeftModel | None:
    """The sharded `model`'s trained weights loaded into `plain`, an unsharded student of the same
    build on rank 0 (None elsewhere: every rank takes part in the gathers); returns `plain`.

    The frozen weights are not gathered: `plain` loaded the same ones from disk."""
    trained = get_model_state_dict(model, options=_FULL_TRAINABLE)
    if plain is None:
        return None
    unexpected = plain.load_state_dict(trained, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"the unsharded student lacks trained weights {unexpected[:3]}")
    return plain


class DataParallel(SingleProcess):
    """`fit` over the ranks of `world`, `model` sharded by `shard`.

    `skip_forward` moves torch's RNG as one training forward would (`WindowDropoutSchedule.skip_forward`):
    called for each forward of an update another rank runs, so every forward draws what it draws in one
    process."""

    def __init__(self, model: PeftModel, world: World, skip_forward: Callable[[], None]):
        self.model, self.world, self.skip_forward = model, world, skip_forward
        self.main = world.main

    def micro_batches(self, batch: list[int], size: int) -> Iterator[tuple[list[int], int]]:
        micros = [batch[first:first + size] for first in range(0, len(batch), size)]
        for start in range(0, len(micros), self.world.size):
            for rank, index in enumerate(range(start, start + self.world.size)):
                if rank == self.world.rank:
                    # no forward left for this rank in the round: join the others with one that counts 0
                    yield (micros[index], len(micros[index])) if index < len(micros) else (micros[-1], 0)
                elif index < len(micros):
                    self.skip_forward()

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        # summed in rank order, the same on every rank, so all of them raise on a non-finite part alike
        shares = self.world.all_gather(list(values.values()))
        return {part: sum(rank[i] for rank in shares) for i, part in enumerate(values)}

    def nonfinite_gradient(self, named_params: Mapping[str, torch.nn.Parameter]) -> str | None:
        # each rank sees only its shards (a DTensor's truth value is its local one); any rank's finding is
        # every rank's, so that all of them stop alike
        local = [key for key, p in named_params.items()
                 if p.grad is not None and not torch.isfinite(p.grad.to_local()).all()]
        found = {key for keys in self.world.all_gather(local) for key in keys}
        return next((key for key in named_params if key in found), None)

    def evaluating(self, evaluate: EvalFn) -> EvalFn:
        """`evaluate` on every rank, over the whole validation split: FSDP2 needs every rank in every
        forward, and the whole split on the same weights gives one process's metrics. Rank 0's are
        taken, so that every rank steps the schedule and keeps the best weights alike."""
        return lambda: self.world.all_gather(evaluate())[0]

    def resume(self, path: Path, named_params: Mapping[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
               schedule: torch.optim.lr_scheduler.ReduceLROnPlateau) -> dict | None:
        payload = _load(path) if self.world.main else None  # rank 0 alone reads (and sets aside a corrupt file)
        state = self.world.all_gather(None if payload is None else {
            key: value for key, value in payload.items() if key not in _TENSORS})[0]
        if state is None:
            return None
        tensors = payload or {key: {} for key in _TENSORS}
        set_model_state_dict(self.model, tensors["best_params"], options=_FROM_RANK0)
        state["best_params"] = _snapshot(named_params)  # this rank's shards of them
        set_model_state_dict(self.model, tensors["params"], options=_FROM_RANK0)
        set_optimizer_state_dict(self.model, optimizer, tensors["optimizer"], options=_FROM_RANK0)
        schedule.load_state_dict(state["schedule"])
        return state

    def save(self, path: Path, state: dict, named_params: Mapping[str, torch.nn.Parameter],
             optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.ReduceLROnPlateau) -> None:
        params = get_model_state_dict(self.model, options=_FULL_TRAINABLE)  # every rank joins the gathers
        best = {key: value.full_tensor().cpu() for key, value in state["best_params"].items()}
        optimizer_state = get_optimizer_state_dict(self.model, optimizer, options=_FULL)
        if self.world.main:
            payload = dict(state, params=params, best_params=best, optimizer=optimizer_state,
                           schedule=schedule.state_dict())
            atomic_write(path, lambda tmp: torch.save(payload, tmp))
