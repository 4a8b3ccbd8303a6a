"""The teacher's residual stream entering each transfer block, cached on disk (lolcats.md §2, §4).

Attention transfer trains each block of `block_size` consecutive layers on its own, so it only needs
the hidden states entering the block: running the teacher once here makes every later transfer
(and every ablation of transfer settings) independent of the layers before the block.
We store the raw residual h (not RMSNorm(h), upstream's quirk in §4) and apply the norm inside.

Layout of the folder: `manifest.json` (config, blocks, chunk counts; written last, so its presence
means complete) and shards `{split}-{shard:04d}.safetensors`, each holding `block_{b}` tensors of
[n, T, hidden] for up to CHUNKS_PER_SHARD chunks. Shards are written atomically and a restarted
run skips those already there, so a killed stage resumes. Reads are memory-mapped.
"""
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import DatasetDict
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import PreTrainedModel

from .config import CacheTeacherAttnConfig
from .io import atomic_write, atomic_write_json
from .params import ConfigError
from .perplexity import response_nll

log = logging.getLogger(__name__)

CHUNKS_PER_SHARD = 16  # bounds memory while writing: 16 x T x hidden x blocks values
MANIFEST = "manifest.json"
PROGRESS = "progress.json"  # the config being written; a different one wipes partial shards
SPLITS = ("train", "validation")


def transfer_blocks(num_layers: int, block_size: int) -> list[range]:
    """Consecutive layer ranges; the last block may be shorter."""
    return [range(start, min(start + block_size, num_layers)) for start in range(0, num_layers, block_size)]


def cache_bytes(num_tokens: int, hidden_size: int, num_blocks: int, dtype: torch.dtype) -> int:
    return num_tokens * hidden_size * num_blocks * torch.finfo(dtype).bits // 8


@dataclass
class TeacherStates:
    """Read side of the cache: `read(block, split, index)` -> [1, T, hidden]."""

    folder: Path
    manifest: dict

    @classmethod
    def open(cls, folder: str | Path) -> "TeacherStates":
        folder = Path(folder)
        if not (folder / MANIFEST).exists():
            raise FileNotFoundError(f"{folder} holds no complete teacher-state cache (no {MANIFEST}); run cache-teacher-attn")
        return cls(folder, json.loads((folder / MANIFEST).read_text()))

    @property
    def blocks(self) -> list[range]:
        return [range(start, stop) for start, stop in self.manifest["blocks"]]

    def num_chunks(self, split: str) -> int:
        return self.manifest["chunks"][split]

    def read(self, block: int, split: str, index: int) -> torch.Tensor:
        shard, row = divmod(index, CHUNKS_PER_SHARD)
        with safe_open(str(self.folder / f"{split}-{shard:04d}.safetensors"), framework="pt") as f:
            return f.get_slice(f"block_{block}")[row:row + 1]


@torch.no_grad()
def write_teacher_states(model: PreTrainedModel, data: DatasetDict, cfg: CacheTeacherAttnConfig,
                         folder: str | Path) -> dict[str, float]:
    """Run the teacher over every chunk; returns metrics (size, tokens, teacher validation perplexity)."""
    folder = Path(folder)
    num_layers = model.config.num_hidden_layers
    if cfg.block_size > num_layers:
        raise ConfigError(f"cache-teacher-attn.block_size: must be at most the teacher's {num_layers} layers, "
                          f"got {cfg.block_size}")
    blocks = transfer_blocks(num_layers, cfg.block_size)
    seq_len = len(data["train"][0]["input_ids"])
    chunks = {split: len(data[split]) for split in SPLITS}
    size = cache_bytes(sum(chunks.values()) * seq_len, model.config.hidden_size, len(blocks), cfg.torch_dtype)
    if size > cfg.max_cache_gb * 2**30:
        raise ConfigError(
            f"cache-teacher-attn.max_cache_gb: the cache needs {size / 2**30:.2f} GiB "
            f"({sum(chunks.values())} chunks x {seq_len} tokens x hidden {model.config.hidden_size} x "
            f"{len(blocks)} blocks x {cfg.torch_dtype}), more than {cfg.max_cache_gb}; raise it, raise "
            "block_size (fewer blocks), or lower prepare-data.max_train_tokens")

    progress = {"config": cfg.to_dict(), "chunks": chunks, "seq_len": seq_len}
    _start_or_resume(folder, progress)
    start = time.perf_counter()
    val_loss, val_tokens = 0.0, 0
    for split in SPLITS:
        for first in tqdm(range(0, chunks[split], CHUNKS_PER_SHARD), desc=f"teacher states ({split})", unit="shard"):
            shard = folder / f"{split}-{first // CHUNKS_PER_SHARD:04d}.safetensors"
            rows = data[split][first:first + CHUNKS_PER_SHARD]
            ids = torch.tensor(rows["input_ids"])
            need_states = not shard.exists()
            states: dict[str, list[torch.Tensor]] = {f"block_{b}": [] for b in range(len(blocks))}
            for i in range(len(ids)):
                if not need_states and split != "validation":
                    break
                out = model(ids[i:i + 1], output_hidden_states=need_states)
                if split == "validation":  # the teacher's perplexity, reported beside the students'
                    loss, n = response_nll(out.logits, torch.tensor(rows["labels"][i:i + 1]))
                    val_loss, val_tokens = val_loss + loss.item(), val_tokens + n
                if need_states:
                    for b, block in enumerate(blocks):  # hidden_states[l] enters layer l
                        states[f"block_{b}"].append(out.hidden_states[block.start].to(cfg.torch_dtype))
            if need_states:
                tensors = {name: torch.cat(parts).contiguous() for name, parts in states.items()}
                atomic_write(shard, lambda tmp: save_file(tensors, tmp))
    manifest = dict(progress, blocks=[[b.start, b.stop] for b in blocks], num_layers=num_layers,
                    hidden_size=model.config.hidden_size)
    atomic_write_json(folder / MANIFEST, manifest)
    (folder / PROGRESS).unlink()
    return {
        "cache_gib": size / 2**30, "cache_tokens": sum(chunks.values()) * seq_len, "blocks": len(blocks),
        "teacher_val_loss": val_loss / val_tokens, "teacher_val_ppl": float(torch.tensor(val_loss / val_tokens).exp()),
        "wall_time_s": time.perf_counter() - start,
    }


def _start_or_resume(folder: Path, progress: dict) -> None:
    """Keep shards written by an interrupted run of the same config; otherwise start empty."""
    marker = folder / PROGRESS
    if marker.exists() and json.loads(marker.read_text()) == progress:
        log.info("resuming the teacher-state cache in %s", folder)
        return
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    atomic_write_json(marker, progress)
