"""Attention transfer (../shared/design/lolcats.md §2, §4): each block trained from cached teacher states.

Every block of consecutive layers is an independent problem: its inputs are the teacher's hidden
states entering it (`teacher_states.py`), inside it each hybrid layer returns the teacher's attention
output so the next layer sees teacher states, and the loss is mse_factor x the mean over the
block's layers of the per-head output MSE (+ xent_factor x attention cross-entropy). Only feature
maps and window factors train. With online teacher states the one block spans every layer and
starts at the token embeddings (`teacher_states.TeacherStates`). `train_block` is a function of
(block, cache, params) so blocks can later run on several devices at once; here they run one after
another.
"""
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from .config import AttentionTransferConfig
from .hybrid.attention import TransferLosses
from .training import FitResult, LogFn, TrainingFailure, WindowDropoutSchedule, fit
from .distributed import World
from .teacher_states import TeacherStates
from .throughput import throughput_metrics

log = logging.getLogger(__name__)


class NoImprovementError(TrainingFailure):
    """Too many trained blocks ended at their initial weights (best validation loss = initial)."""


@dataclass
class BlockResult:
    block: int
    layers: list[int]
    fit: FitResult
    mse_before: dict[int, float]  # validation MSE per layer before and after transfer
    mse_after: dict[int, float]
    trainable_params: int  # of the block's feature maps and window factors

    def summary(self) -> str:
        """One line: the block's mean validation MSE before and after, and its worst layer after."""
        def mean(mse: dict[int, float]) -> float:
            return sum(mse.values()) / len(mse)
        worst = max(self.layers, key=lambda i: self.mse_after[i])
        return (f"block {self.block} (layers {self.layers[0]}-{self.layers[-1]}): val MSE mean "
                f"{mean(self.mse_before):.4g} -> {mean(self.mse_after):.4g} over {self.fit.updates} updates; "
                f"worst layer {worst}: {self.mse_before[worst]:.4g} -> {self.mse_after[worst]:.4g}")


@contextlib.contextmanager
def transfer_mode(model: PreTrainedModel, layers: range, with_xent: bool) -> Iterator[list[TransferLosses]]:
    """Switch the hybrid modules of `layers` into transfer mode; yields their loss holders."""
    modules = [model.model.layers[i].self_attn.hybrid for i in layers]
    holders = [TransferLosses(with_xent=with_xent) for _ in modules]
    for module, holder in zip(modules, holders):
        module.transfer = holder
    try:
        yield holders
    finally:
        for module in modules:
            module.transfer = None


def block_forward(model: PreTrainedModel, layers: range, hidden: torch.Tensor) -> None:
    """Run the block on its input states [B,T,hidden]; losses land in the transfer holders.

    Layers before the last run whole (their hybrid returns the teacher output, so the residual stream
    stays the teacher's); the last runs only its norm and attention: its MLP feeds no loss.
    """
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
    position_embeddings = model.model.rotary_emb(hidden, position_ids=positions)
    for i in layers:
        layer = model.model.layers[i]
        if i == layers[-1]:
            layer.self_attn(hidden_states=layer.input_layernorm(hidden),
                            position_embeddings=position_embeddings, attention_mask=None)
        else:
            hidden = layer(hidden, position_embeddings=position_embeddings, attention_mask=None)


def train_block(block: int, states: TeacherStates, model: PreTrainedModel, cfg: AttentionTransferConfig,
                checkpoint: Path, log_metrics: LogFn, window_dropout: float = 0.0) -> BlockResult:
    """Transfer one block of `model` (already linearized) from the cached states.

    `window_dropout`: SSD's start probability over this block's updates (`WindowDropoutSchedule`); 0 = off."""
    layers = states.blocks[block]
    weight = next(model.parameters())
    named_params = {n: p for n, p in model.named_parameters() if p.requires_grad and _in_block(n, layers)}

    with (transfer_mode(model, layers, with_xent=cfg.xent_factor > 0) as holders,
          WindowDropoutSchedule(model, window_dropout, cfg.seed) as dropout):
        def losses(split: str, indices: list[int]) -> dict[str, torch.Tensor]:
            block_forward(model, layers, states.read(block, split, indices).to(weight.device, weight.dtype))
            parts = {f"mse_layer_{i}": h.mse for i, h in zip(layers, holders)}
            mse = torch.stack([h.mse for h in holders]).mean()
            total = cfg.mse_factor * mse
            if cfg.xent_factor > 0:
                total = total + cfg.xent_factor * torch.stack([h.xent for h in holders]).mean()
            return dict(parts, loss=total)

        @torch.no_grad()
        def evaluate() -> dict[str, float]:
            n = states.num_chunks("validation")
            sums: dict[str, float] = {}
            for first in range(0, n, cfg.batch_size):
                indices = list(range(first, min(first + cfg.batch_size, n)))
                for key, value in losses("validation", indices).items():
                    sums[key] = sums.get(key, 0.0) + value.item() * len(indices) / n
            return sums

        result = fit(named_params, lambda indices: losses("train", indices), range(states.num_chunks("train")),
                     dropout.evaluating(evaluate), cfg, checkpoint,
                     f"block {block} (layers {layers.start}-{layers.stop - 1})", log_metrics, dropout.before_update)
    return BlockResult(block, list(layers), result,
                       mse_before={i: result.initial[f"mse_layer_{i}"] for i in layers},
                       mse_after={i: result.best[f"mse_layer_{i}"] for i in layers},
                       trainable_params=sum(p.numel() for p in named_params.values()))


@dataclass
class TransferOutcome:
    blocks: list[BlockResult]
    seq_len: int  # tokens per train sequence (`TeacherStates.seq_len`: chunks joined by transfer_seq_len)

    @property
    def unimproved_blocks(self) -> list[int]:
        """Trained blocks whose best validation loss is the initial one: `fit` put their starting weights
        back, so they learned nothing (divergence, e.g. too high an lr). Untrained blocks do not count."""
        return [b.block for b in self.blocks if b.fit.updates > 0 and b.fit.best["loss"] >= b.fit.initial["loss"]]

    def check_improvement(self, max_unimproved_frac: float, checkpoints: Path) -> None:
        """A warning naming the unimproved blocks; a `NoImprovementError` when they are more than
        `max_unimproved_frac` of the trained blocks."""
        trained = sum(b.fit.updates > 0 for b in self.blocks)
        unimproved = self.unimproved_blocks
        if unimproved:
            log.warning("attention-transfer: blocks %s never beat their initial validation loss and keep their "
                        "initial weights (diverged? lower attention-transfer.lr)", unimproved)
        if trained and len(unimproved) / trained > max_unimproved_frac:
            raise NoImprovementError(
                f"attention-transfer: {len(unimproved)} of {trained} trained blocks never beat their initial "
                f"validation loss (blocks {unimproved}), more than max_unimproved_frac {max_unimproved_frac}; "
                f"lower attention-transfer.lr (checkpoints in {checkpoints} are removed)")

    def per_layer_rows(self) -> list[dict[str, float]]:
        """Validation MSE per layer before and after (a dvc plot and a report table)."""
        return [{"layer": i, "mse_before": b.mse_before[i], "mse_after": b.mse_after[i]}
                for b in self.blocks for i in b.layers]

    def curve_rows(self) -> list[dict[str, float]]:
        """Train loss of each block at each update, validation loss where there was a pass."""
        return [dict(row, block=b.block) for b in self.blocks for row in b.fit.curve_rows()]

    def metrics(self, device: torch.device) -> dict[str, float]:
        """Headline figures; `tokens` counts train tokens through every block (a chunk once per block),
        `trainable_params` the weights of the blocks that ran an update (none for `transfer: false`)."""
        rows = self.per_layer_rows()
        ratios = sorted(r["mse_after"] / r["mse_before"] for r in rows)
        return {
            "val_mse_before_mean": sum(r["mse_before"] for r in rows) / len(rows),
            "val_mse_after_mean": sum(r["mse_after"] for r in rows) / len(rows),
            "val_mse_ratio_median": ratios[len(ratios) // 2],
            "updates_per_block": max(b.fit.updates for b in self.blocks),
            "unimproved_blocks": len(self.unimproved_blocks),
            "train_chunks_per_block": max(b.fit.items_seen for b in self.blocks),
            **throughput_metrics(sum(b.fit.items_seen for b in self.blocks) * self.seq_len,
                                 sum(b.fit.wall_time_s for b in self.blocks), device),
            "trainable_params": sum(b.trainable_params for b in self.blocks if b.fit.updates),
        }


def transfer_all_blocks(model: PreTrainedModel, states: TeacherStates, cfg: AttentionTransferConfig,
                        checkpoints: Path, log_metrics: LogFn, window_dropout: float = 0.0,
                        world: World = World()) -> TransferOutcome:
    """Train every block in order (each resumes from its own checkpoint under `checkpoints`); each block
    runs SSD's schedule over its own updates from `window_dropout` (0 = off).

    With several ranks (`world`) each trains the blocks it owns, then every block's weights are copied
    from its owner to every rank and the results gathered, so each rank returns the same outcome and
    holds the same model as one process training every block would: blocks share no weights, and each
    block's data order comes from `cfg.seed` alone."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    results = []
    for block in range(len(states.blocks)):
        if not world.owns(block):
            continue
        def block_metrics(metrics, step, block=block):
            log_metrics({f"block_{block:02d}_{k}": v for k, v in metrics.items()}, step)
        results.append(train_block(block, states, model, cfg, checkpoints / f"block_{block:03d}.pt", block_metrics,
                                   window_dropout))
        log.info("%s", results[-1].summary())
    if world.size > 1:
        for block, layers in enumerate(states.blocks):
            world.share([p for n, p in model.named_parameters() if _in_block(n, layers)], world.owner(block))
        results = sorted((r for rank in world.all_gather(results) for r in rank), key=lambda r: r.block)
    return TransferOutcome(results, states.seq_len)


def _in_block(name: str, layers: range) -> bool:
    """A trainable hybrid weight (feature maps, window factors) of one of `layers`."""
    return any(f"layers.{i}.self_attn.hybrid." in name for i in layers)
