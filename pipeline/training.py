"""The optimisation loop both training stages share (../shared/design/lolcats.md §2, §3).

AdamW; one update per `grad_accum` chunks, `batch_size` of them per forward; a validation pass every
`eval_every` updates (and before the first one) steps ReduceLROnPlateau and keeps the best weights,
which are restored at the end ("early stopping" is best-checkpoint selection, as upstream). A caller's
`before_update` hook runs before each update; `WindowDropoutSchedule` is one (SSD). Robustness is part of the loop:
  * a checkpoint (trainable tensors, optimizer, schedule, position, best weights, history) is written
    atomically after every validation pass; a restarted run continues from it and, since the data
    order is a function of (seed, epoch) alone, reaches the same weights as an uninterrupted run;
  * a non-finite loss part, gradient or validation metric stops training with a `NonFiniteError`
    naming it and the update.
"""
import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .config import TrainingConfig
from .hybrid.attention import HybridAttention
from .io import atomic_write

log = logging.getLogger(__name__)

# train items of one forward -> {"loss": their mean total, part: value, ...}
LossFn = Callable[[list[int]], Mapping[str, torch.Tensor]]
EvalFn = Callable[[], Mapping[str, float]]  # -> {"loss": validation loss, part: value, ...}
LogFn = Callable[[Mapping[str, float], int], None]  # (step metrics, update)


def no_log(metrics: Mapping[str, float], step: int) -> None:
    """A LogFn that records nothing: what ranks other than 0 pass (rank 0 alone logs to MLflow)."""
# (update about to run, from 0; updates this fit runs in all) -> step metrics logged with that update
UpdateHook = Callable[[int, int], Mapping[str, float]]


class TrainingFailure(RuntimeError):
    """Training ran to a result that cannot be used; the same params would fail the same way again."""


class NonFiniteError(TrainingFailure):
    """Training produced NaN or Inf; the message names the loss part or parameter and the update."""


@dataclass
class FitResult:
    initial: dict[str, float]  # validation metrics before any update
    best: dict[str, float]  # validation metrics of the restored (best) weights
    updates: int
    items_seen: int  # train items (chunks) consumed
    wall_time_s: float
    history: list[dict[str, float]] = field(default_factory=list)  # one row per validation pass
    train_curve: list[dict[str, float]] = field(default_factory=list)  # one row per update

    def curve_rows(self) -> list[dict[str, float | None]]:
        """Train loss at each update and validation loss where there was a pass (update 0: before any)."""
        val = {row["update"]: row["loss"] for row in self.history}
        train = {row["update"]: row["loss"] for row in self.train_curve}
        return [{"update": u, "train_loss": train.get(u), "val_loss": val.get(u)} for u in sorted(set(val) | set(train))]


def fit(named_params: Mapping[str, torch.nn.Parameter], loss_fn: LossFn, train_items: Sequence[int],
        evaluate: EvalFn, cfg: TrainingConfig, checkpoint: Path, name: str, log_metrics: LogFn,
        before_update: UpdateHook | None = None, processes: "SingleProcess | None" = None) -> FitResult:
    """Train `named_params` in place; `name` (e.g. "layer 3") prefixes progress and error messages.

    `before_update` runs before each update's forwards (a resumed run calls it from where it resumes).
    `processes`: who runs the update's forwards and keeps the checkpoint; None = this process alone,
    `pipeline.sharded_training.DataParallel` = torchrun's ranks."""
    processes = processes or SingleProcess()
    params = list(named_params.values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr)
    updates_per_epoch = math.ceil(len(train_items) / cfg.grad_accum)
    total_updates = updates_per_epoch * cfg.epochs
    if cfg.max_updates is not None:
        total_updates = min(total_updates, cfg.max_updates)
    state = processes.resume(checkpoint, named_params, optimizer, schedule)
    if state is None:
        initial = _checked(evaluate(), name, 0)
        state = {"update": 0, "items_seen": 0, "elapsed": 0.0, "initial": initial, "best": initial,
                 "best_params": _snapshot(named_params), "history": [dict(initial, update=0)], "train_curve": []}
        log_metrics({f"val_{k}": v for k, v in initial.items()}, 0)
    else:
        log.info("%s: resuming at update %d of %d", name, state["update"], total_updates)

    start = time.perf_counter() - state["elapsed"]
    progress = tqdm(total=total_updates, initial=state["update"], desc=name, unit="update", leave=False,
                    disable=not processes.main)
    while state["update"] < total_updates:
        update = state["update"]
        epoch, step = divmod(update, updates_per_epoch)
        order = _epoch_order(len(train_items), cfg.seed, epoch)
        batch = [train_items[i] for i in order[step * cfg.grad_accum:(step + 1) * cfg.grad_accum]]
        hook_metrics = before_update(update, total_updates) if before_update is not None else {}
        totals: dict[str, float] = {}
        for micro, counted in processes.micro_batches(batch, cfg.batch_size):
            parts = loss_fn(micro)  # one forward; its loss is the mean over it
            # its share of the update's mean, summed over the processes' forwards of this round (so a
            # non-finite part on any of them stops all of them, before the backward)
            shares = processes.sum({part: value.item() * counted / len(batch) for part, value in parts.items()})
            for part, value in shares.items():
                if not math.isfinite(value):
                    raise NonFiniteError(f"{name}: non-finite {part} ({value}) at update {update + 1}")
                totals[part] = totals.get(part, 0.0) + value
            (parts["loss"] * counted / len(batch)).backward()
        bad = processes.nonfinite_gradient(named_params)
        if bad is not None:
            raise NonFiniteError(f"{name}: non-finite gradient of {bad} at update {update + 1}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["update"], state["items_seen"] = update + 1, state["items_seen"] + len(batch)
        state["train_curve"].append(dict(totals, update=state["update"]))
        log_metrics(dict({f"train_{k}": v for k, v in totals.items()}, lr=optimizer.param_groups[0]["lr"],
                         **hook_metrics), state["update"])
        progress.set_postfix(loss=f"{totals['loss']:.4g}", lr=f"{optimizer.param_groups[0]['lr']:.2g}", refresh=False)
        progress.update()
        if state["update"] % cfg.eval_every == 0 or state["update"] == total_updates:
            metrics = _checked(evaluate(), name, state["update"])
            schedule.step(metrics["loss"])
            state["history"].append(dict(metrics, update=state["update"]))
            log_metrics({f"val_{k}": v for k, v in metrics.items()}, state["update"])
            if metrics["loss"] < state["best"]["loss"]:
                state["best"], state["best_params"] = metrics, _snapshot(named_params)
            state["elapsed"] = time.perf_counter() - start
            processes.save(checkpoint, state, named_params, optimizer, schedule)
    progress.close()
    with torch.no_grad():  # restore the best validation weights
        for key, p in named_params.items():
            p.copy_(state["best_params"][key])
    best_at = min(state["history"], key=lambda row: row["loss"])["update"]
    log.info("%s: %d updates in %.0f s; val loss %.4g -> %.4g (best at update %d)", name, state["update"],
             time.perf_counter() - start, state["initial"]["loss"], state["best"]["loss"], best_at)
    return FitResult(state["initial"], state["best"], state["update"], state["items_seen"],
                     time.perf_counter() - start, state["history"], state["train_curve"])


class SingleProcess:
    """`fit` as this one process: every forward of an update runs here, the checkpoint is read and
    written here. `pipeline.sharded_training.DataParallel` runs the same loop over torchrun's ranks."""

    main = True  # shows the progress bar

    def micro_batches(self, batch: list[int], size: int) -> Iterator[tuple[list[int], int]]:
        """The forwards of an update's `batch` this process runs: (items, how many of them count)."""
        for first in range(0, len(batch), size):
            micro = batch[first:first + size]
            yield micro, len(micro)

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """`values` summed over the processes that ran a forward of the same round: here, itself."""
        return values

    def nonfinite_gradient(self, named_params: Mapping[str, torch.nn.Parameter]) -> str | None:
        """The first parameter with a NaN or Inf in its gradient, or None."""
        return next((key for key, p in named_params.items()
                     if p.grad is not None and not torch.isfinite(p.grad).all()), None)

    def resume(self, path: Path, named_params: Mapping[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
               schedule: torch.optim.lr_scheduler.ReduceLROnPlateau) -> dict | None:
        """The checkpoint's loop state with its weights, optimizer and schedule loaded, or None (none to resume)."""
        state = _load(path)
        if state is not None:
            with torch.no_grad():
                for key, p in named_params.items():
                    p.copy_(state["params"][key])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
        return state

    def save(self, path: Path, state: dict, named_params: Mapping[str, torch.nn.Parameter],
             optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.ReduceLROnPlateau) -> None:
        _save(path, state, named_params, optimizer, schedule)


def _checked(metrics: Mapping[str, float], name: str, update: int) -> dict[str, float]:
    """Validation metrics, or a NonFiniteError: a NaN loss never compares as best, so without this
    a diverged run would quietly keep its initial weights."""
    for part, value in metrics.items():
        if not math.isfinite(value):
            raise NonFiniteError(f"{name}: non-finite validation {part} ({value}) at update {update}")
    return dict(metrics)


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A shuffle that depends on (seed, epoch) only, so a resumed run sees the same order."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def _snapshot(named_params: Mapping[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {key: p.detach().clone() for key, p in named_params.items()}


def _save(path: Path, state: dict, named_params, optimizer, schedule) -> None:
    payload = dict(state, params=_snapshot(named_params), optimizer=optimizer.state_dict(),
                   schedule=schedule.state_dict())
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _load(path: Path) -> dict | None:
    """The checkpoint at `path`, or None; one that cannot be read is renamed aside, so every rerun
    (`dvc repro -f` included) starts that training afresh instead of failing on it again."""
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # what torch.load raises on a truncated file
        aside = path.with_name(f"{path.name}.corrupt")
        os.replace(path, aside)
        log.warning("%s: unreadable checkpoint (%s: %s), set aside as %s; training starts afresh",
                    path, type(e).__name__, str(e).split(". ")[0], aside)
        return None


def window_dropout_at(start: float, update: int, total: int) -> float:
    """SSD's probability at update `update` (from 0) of `total`: start * (1 - update / (total - 1)).

    `start` at the first update, linearly down to exactly 0 at the last (update total - 1); a fit of one
    update runs it at `start`."""
    return start * (1 - update / max(total - 1, 1))


class WindowDropoutSchedule:
    """Scheduled sliding-window dropout (SSD, arXiv 2510.05901) over one `fit` of `model`.

    Before each update `before_update` sets every hybrid layer's `window_dropout` to `window_dropout_at`
    and re-seeds torch's default RNG from (seed, update), so the drops of an update do not depend on
    what ran before: a resumed run drops what an uninterrupted one does. Layers draw only in training
    mode, whatever mode the model around them is in (the teacher loads in eval mode; the hybrid layers
    `linearize` adds start in training mode), so `before_update` puts the hybrid layers, and only them
    (the teacher's own dropout stays off), in training mode, and `evaluating` wraps validation passes
    to run them in eval mode, never dropped. Leaving the context puts p = 0 and the layers' modes back.
    With start 0 it changes nothing at all: no mode switch, no seeding, no metric.
    """

    def __init__(self, model: torch.nn.Module, start: float, seed: int):
        self.start, self.seed = start, seed
        self.layers = [m for m in model.modules() if isinstance(m, HybridAttention)]
        self.modes = [layer.training for layer in self.layers]
        self.probability = 0.0  # this update's

    def __enter__(self) -> "WindowDropoutSchedule":
        return self

    def __exit__(self, *exc) -> None:
        for layer, mode in zip(self.layers, self.modes):
            layer.window_dropout = 0.0
            layer.train(mode)

    def before_update(self, update: int, total: int) -> dict[str, float]:
        if self.start == 0:
            return {}
        self.probability = window_dropout_at(self.start, update, total)
        torch.manual_seed(self.seed * 1_000_003 + update)
        for layer in self.layers:
            layer.window_dropout = self.probability
            layer.train()
        return {"window_dropout": self.probability}

    def skip_forward(self) -> None:
        """Move torch's default RNG past one training forward's draws (a coin per hybrid layer, when
        p > 0) without running it: a rank that leaves a micro-batch of the update to another rank then
        draws for its own micro-batches the coins one process draws for them."""
        if self.probability > 0:
            for _ in self.layers:
                torch.rand(())

    def evaluating(self, evaluate: EvalFn) -> EvalFn:
        if self.start == 0:
            return evaluate

        def in_eval_mode() -> Mapping[str, float]:
            for layer in self.layers:
                layer.eval()  # the next before_update switches them back
            return evaluate()
        return in_eval_mode


CHECKPOINT_ROOT = Path(".cache/checkpoints")


def checkpoint_dir(stage: str, name: str, identity: Mapping) -> Path:
    """Where a stage keeps resumable checkpoints: keyed by everything that shapes the result, so
    a changed param never resumes a stale run (see `resumable` for when it is deleted)."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return CHECKPOINT_ROOT / stage / f"{name}-{digest}"


@contextlib.contextmanager
def stage_checkpoints(stage: str, name: str, identity: Mapping, remove: bool = True) -> Iterator[Path]:
    """A training stage's checkpoint folder for `name` (its variant): `checkpoint_dir` held by `resumable`.
    Both training stages open theirs so and hand the folder to the library call, which names the files.
    `remove=False`: leave the folder to the process that removes it (rank 0 of several)."""
    with resumable(checkpoint_dir(stage, name, identity), remove) as folder:
        yield folder


@contextlib.contextmanager
def resumable(folder: Path, remove: bool = True) -> Iterator[Path]:
    """`folder` created for a stage's checkpoints and deleted when the body succeeds or training fails
    (`TrainingFailure`: resuming would fail again); any other end (a kill, an interrupt, out of
    memory) keeps it for the rerun to resume from, and the log says where it is."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except TrainingFailure:
        if remove:
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed the checkpoints of the failed training in %s", folder)
        raise
    except BaseException:
        log.warning("checkpoints kept in %s: a rerun with the same params resumes from them", folder)
        raise
    if remove:
        shutil.rmtree(folder, ignore_errors=True)
