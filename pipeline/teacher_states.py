"""The teacher's residual stream entering each transfer block, cached on disk (lolcats.md §2, §4).

Attention transfer trains each block of `block_size` consecutive layers on its own, so it only needs
the hidden states entering the block: running the teacher once here makes every later transfer
(and every ablation of transfer settings) independent of the layers before the block.
We store the raw residual h (not RMSNorm(h), upstream's quirk in §4) and apply the norm inside.

Layout of the folder: `manifest.json` (config, blocks, chunk counts; written last, so its presence
means complete) and shards `{split}-{shard:04d}.safetensors`, each holding `block_{b}` tensors of
[n, T, hidden] for up to CHUNKS_PER_SHARD chunks. Shards are written atomically and a restarted
run skips those already there, so a killed stage resumes. Reads are memory-mapped.

Under `torchrun --nproc-per-node N` shard i of each split is computed and written by rank i % N
(`World.items`), each rank skipping its shards already there; rank 0 alone starts or resumes the folder
(before any rank writes, by a barrier) and, once every rank is done, writes the manifest. With the
teacher sharded by FSDP2 (`distributed.shard_teacher`) each forward is a collective, so the ranks run
the same number of them, one with less work repeating a chunk. N = 1 runs as one process, as always.

`cache-teacher-attn.states: online` (or `auto` with a cache above `max_cache_gb`) writes no shards:
the manifest then says so, and attention-transfer trains every layer as one joint block from the
token embeddings, with the teacher's attention run on the fly inside each layer (upstream's joint
recipe; a paper-scale cache would need ~345 GB for SmolLM2-135M at block_size 1). Nothing is split
then: rank 0 runs the validation forwards (the teacher's perplexity) and writes the manifest.
"""
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import DatasetDict
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm
from transformers import PreTrainedModel

from .config import CacheTeacherAttnConfig
from .data import chunk_length
from .distributed import World
from .io import DataFileError, atomic_write, atomic_write_json
from .params import ConfigError
from .perplexity import response_nll
from .throughput import throughput_metrics

log = logging.getLogger(__name__)

CHUNKS_PER_SHARD = 16  # bounds memory while writing: 16 x T x hidden x blocks values
MANIFEST = "manifest.json"
DISK, ONLINE = "disk", "online"  # where transfer's block inputs come from (`cache-teacher-attn.states`)
PROGRESS = "progress.json"  # the config being written; a different one wipes partial shards
SPLITS = ("train", "validation")


def transfer_blocks(num_layers: int, block_size: int) -> list[range]:
    """Consecutive layer ranges; the last block may be shorter."""
    return [range(start, min(start + block_size, num_layers)) for start in range(0, num_layers, block_size)]


def shard_path(folder: Path, split: str, shard: int) -> Path:
    return folder / f"{split}-{shard:04d}.safetensors"


def cache_bytes(num_tokens: int, hidden_size: int, num_blocks: int, dtype: torch.dtype) -> int:
    return num_tokens * hidden_size * num_blocks * torch.finfo(dtype).bits // 8


@dataclass
class TeacherStates:
    """Read side of the cache: `read(block, split, indices)` -> [len(indices), T, hidden].

    In online mode (`manifest["mode"] == "online"`) nothing was written but the manifest: the one
    block spans every layer, its input is the token embedding, computed here from the prepared
    chunks by `embed` (the model being trained), and the model in transfer mode runs the teacher's
    attention itself, layer after layer (`transfer.block_forward`).
    """

    folder: Path
    manifest: dict
    chunks: DatasetDict | None = None  # prepared data, online mode only
    embed: torch.nn.Module | None = None
    join: int = 1  # consecutive cached chunks read as one sequence (`with_seq_len`)

    @classmethod
    def open(cls, folder: str | Path, chunks: DatasetDict | None = None,
             embed: torch.nn.Module | None = None) -> "TeacherStates":
        folder = Path(folder)
        if not (folder / MANIFEST).exists():
            raise FileNotFoundError(f"{folder} holds no complete teacher-state cache (no {MANIFEST}); run cache-teacher-attn")
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest["mode"] == ONLINE and (chunks is None or embed is None):
            raise ValueError(f"{folder}: online teacher states need the prepared chunks and the model's embedding")
        states = cls(folder, manifest, chunks, embed)
        if manifest["mode"] == DISK:
            states._check_shards()
        return states

    def _check_shards(self) -> None:
        """Open every shard's header now (cheap, memory-mapped), so that a truncated or missing shard
        fails before any training, naming the file, rather than as a bare SafetensorError mid-run."""
        expected = {f"block_{b}" for b in range(len(self.blocks))}
        for split in SPLITS:
            for shard in range(-(-self.manifest["chunks"][split] // CHUNKS_PER_SHARD)):
                path = shard_path(self.folder, split, shard)
                try:
                    with safe_open(str(path), framework="pt") as f:
                        missing = sorted(expected - set(f.keys()))
                except (SafetensorError, OSError) as e:
                    raise DataFileError(f"{path}: unreadable teacher-state shard ({e}); "
                                        "`dvc repro -f cache-teacher-attn` writes the cache anew") from None
                if missing:
                    raise DataFileError(f"{path}: teacher-state shard without {missing}; "
                                        "`dvc repro -f cache-teacher-attn` writes the cache anew")

    @property
    def blocks(self) -> list[range]:
        return [range(start, stop) for start, stop in self.manifest["blocks"]]

    @property
    def seq_len(self) -> int:
        """Tokens per sequence `read` returns."""
        return self.manifest["seq_len"] * self.join

    def with_seq_len(self, seq_len: int | None, max_positions: int) -> "TeacherStates":
        """These states read as sequences of `seq_len` tokens, each `seq_len / chunk` consecutive chunks
        joined (`variants.*.transfer_seq_len`; None: the chunks as cached).

        Prepared chunks are cut from one stream of rows in order, so consecutive chunks are consecutive
        text. Joining is exact only where a block's input does not depend on the tokens before it, the
        token embeddings: one block from layer 0 (online states, or block_size >= the layer count).
        Cached states of a later layer saw only their own chunk, so those are refused."""
        chunk = self.manifest["seq_len"]
        if seq_len is None or seq_len == chunk:
            return self
        if seq_len % chunk:
            raise ValueError(f"transfer_seq_len {seq_len} is not a multiple of the cached chunks' {chunk} tokens")
        key = "variants.*.transfer_seq_len"
        if seq_len > max_positions:
            raise ConfigError(f"{key}: {seq_len} tokens exceed the teacher's {max_positions} positions; lower it")
        if any(block.start != 0 for block in self.blocks):
            raise ConfigError(
                f"{key}: joining chunks into {seq_len}-token sequences needs every layer in one transfer block "
                f"(the cached states of layers after the first saw only their own {chunk}-token chunk), but "
                f"{self.folder} holds {len(self.blocks)} blocks; set cache-teacher-attn.states: online, or a "
                f"block_size of at least the teacher's {self.manifest['num_layers']} layers")
        join = seq_len // chunk
        short = [split for split in SPLITS if self.manifest["chunks"][split] < join]
        if short:
            raise ConfigError(f"{key}: {seq_len} tokens join {join} chunks, but the {short[0]} split has only "
                              f"{self.manifest['chunks'][short[0]]}; lower it or raise prepare-data's token caps")
        return dataclasses.replace(self, join=join)

    def num_chunks(self, split: str) -> int:
        """Sequences of `seq_len` tokens in `split` (a remainder of fewer than `join` chunks is dropped)."""
        return self.manifest["chunks"][split] // self.join

    def read(self, block: int, split: str, indices: list[int]) -> torch.Tensor:
        """[len(indices), seq_len, hidden]: the input states of `block` for these sequences."""
        chunks = [index * self.join + j for index in indices for j in range(self.join)]
        if self.manifest["mode"] == ONLINE:
            device = self.embed.weight.device
            with torch.no_grad():
                states = self.embed(torch.tensor(self.chunks[split][chunks]["input_ids"], device=device))
        else:
            states = torch.cat([self._read_one(block, split, index) for index in chunks])
        return states.reshape(len(indices), self.seq_len, -1)  # rows of one sequence are consecutive

    def _read_one(self, block: int, split: str, index: int) -> torch.Tensor:
        shard, row = divmod(index, CHUNKS_PER_SHARD)
        with safe_open(str(shard_path(self.folder, split, shard)), framework="pt") as f:
            return f.get_slice(f"block_{block}")[row:row + 1]


def storage_mode(cfg: CacheTeacherAttnConfig, size: int, describe: str) -> str:
    """disk or online for `states` and a cache of `size` bytes (`describe` says what it holds)."""
    if cfg.states == ONLINE:
        return ONLINE
    if size <= cfg.max_cache_gb * 2**30:
        return DISK
    if cfg.states == "auto":
        log.warning("cache-teacher-attn.states auto: online, since the cache would need %.2f GiB (%s), more "
                    "than max_cache_gb %s; attention-transfer trains all layers as one joint block",
                    size / 2**30, describe, cfg.max_cache_gb)
        return ONLINE
    raise ConfigError(
        f"cache-teacher-attn.max_cache_gb: the cache needs {size / 2**30:.2f} GiB ({describe}), more than "
        f"{cfg.max_cache_gb}; raise it, raise block_size (fewer blocks), lower prepare-data.max_train_tokens, "
        "or set states: online (nothing on disk)")


def shard_teacher(model: PreTrainedModel, world: World) -> None:
    """FSDP2 over the ranks for the frozen teacher (`distributed.shard_teacher`): each decoder layer, the
    classes HF names in `_no_split_modules`, is one unit whose weights are gathered in turn."""
    world.fully_shard(model, model._no_split_modules)


@torch.no_grad()
def write_teacher_states(model: PreTrainedModel, data: DatasetDict, cfg: CacheTeacherAttnConfig,
                         folder: str | Path, world: World = World()) -> dict[str, float]:
    """Run the teacher over every chunk, this rank's shards of them (`world`); returns the whole job's
    metrics (size, tokens, teacher validation perplexity) on every rank."""
    folder = Path(folder)
    num_layers = model.config.num_hidden_layers
    if cfg.block_size > num_layers:
        raise ConfigError(f"cache-teacher-attn.block_size: must be at most the teacher's {num_layers} layers, "
                          f"got {cfg.block_size}")
    blocks = transfer_blocks(num_layers, cfg.block_size)
    seq_len = chunk_length(data)
    chunks = {split: len(data[split]) for split in SPLITS}
    size = cache_bytes(sum(chunks.values()) * seq_len, model.config.hidden_size, len(blocks), cfg.torch_dtype)
    mode = storage_mode(cfg, size, f"{sum(chunks.values())} chunks x {seq_len} tokens x hidden "
                                   f"{model.config.hidden_size} x {len(blocks)} blocks x {cfg.torch_dtype}")
    if mode == ONLINE:
        blocks, size = [range(0, num_layers)], 0
    device = next(model.parameters()).device

    progress = {"config": cfg.to_dict(), "chunks": chunks, "seq_len": seq_len, "mode": mode}
    if world.main:
        _start_or_resume(folder, progress)
    world.barrier()  # no rank looks for its shards before rank 0 has kept or wiped the folder
    start = time.perf_counter()
    todo = _shards_to_run(folder, chunks, mode, world)
    forwards = sum(-(-min(CHUNKS_PER_SHARD, chunks[split] - shard * CHUNKS_PER_SHARD) // cfg.batch_size)
                   for split, shard, _ in todo)
    # FSDP2 all-gathers each layer's weights from every rank in every forward, so a rank with fewer
    # forwards to run than another must still join the other's: it repeats a chunk, discarding the result
    spare = max(world.all_gather(forwards)) - forwards if isinstance(model, FSDPModule) else 0
    forward_tokens, val_nll = 0, {}  # val_nll: validation shard -> (nll, tokens) of each batch
    desc = "teacher states" if world.size == 1 else f"teacher states (rank {world.rank})"
    for split, shard, need_states in tqdm(todo, desc=desc, unit="shard"):
        first = shard * CHUNKS_PER_SHARD
        rows = data[split][first:first + CHUNKS_PER_SHARD]
        ids, labels = torch.tensor(rows["input_ids"]), torch.tensor(rows["labels"])
        states: dict[str, list[torch.Tensor]] = {f"block_{b}": [] for b in range(len(blocks))}
        for i in range(0, len(ids), cfg.batch_size):
            batch = ids[i:i + cfg.batch_size].to(device)
            out = model(batch, output_hidden_states=need_states)
            forward_tokens += batch.numel()
            if split == "validation":  # the teacher's perplexity, reported beside the students'
                loss, n = response_nll(out.logits, labels[i:i + cfg.batch_size].to(device))
                val_nll.setdefault(shard, []).append((loss.item(), n))
            if need_states:
                for b, block in enumerate(blocks):  # hidden_states[l] enters layer l
                    states[f"block_{b}"].append(out.hidden_states[block.start].to(cfg.torch_dtype).cpu())
        if need_states:
            tensors = {name: torch.cat(parts).contiguous() for name, parts in states.items()}
            atomic_write(shard_path(folder, split, shard), lambda tmp: save_file(tensors, tmp))
    for _ in range(spare):
        model(torch.tensor(data["train"][0:1]["input_ids"], device=device))
    # each rank's own time: the job took its slowest rank's, from the barrier above to its last forward
    done = world.all_gather((forward_tokens, time.perf_counter() - start, val_nll))
    if world.main:  # every shard is written now: the manifest says the cache is complete
        manifest = dict(progress, blocks=[[b.start, b.stop] for b in blocks], num_layers=num_layers,
                        hidden_size=model.config.hidden_size)
        atomic_write_json(folder / MANIFEST, manifest)
        (folder / PROGRESS).unlink()
    # summed in shard and batch order whatever the process count, so the float sum is bitwise the same
    val_nll = {shard: nll for _, _, rank_nll in done for shard, nll in rank_nll.items()}
    val_loss, val_tokens = 0.0, 0
    for shard in sorted(val_nll):
        for loss, n in val_nll[shard]:
            val_loss, val_tokens = val_loss + loss, val_tokens + n
    return dict({
        "cache_gib": size / 2**30, "cache_tokens": sum(chunks.values()) * seq_len, "blocks": len(blocks),
        "online": float(mode == ONLINE),
        "teacher_val_loss": val_loss / val_tokens, "teacher_val_ppl": float(torch.tensor(val_loss / val_tokens).exp()),
    }, **throughput_metrics(sum(tokens for tokens, _, _ in done), max(wall for _, wall, _ in done), device))


def _shards_to_run(folder: Path, chunks: dict[str, int], mode: str, world: World) -> list[tuple[str, int, bool]]:
    """(split, shard, whether its states are to be written) of each shard this rank runs the teacher on:
    its own shards not yet on disk, and its validation shards in any case (for the perplexity). Online,
    rank 0 runs every validation shard: there are no states to split."""
    todo = []
    for split in SPLITS:
        count = -(-chunks[split] // CHUNKS_PER_SHARD)
        mine = world.items(count) if mode == DISK else range(count if world.main else 0)
        for shard in mine:
            need_states = mode == DISK and not shard_path(folder, split, shard).exists()
            if need_states or split == "validation":
                todo.append((split, shard, need_states))
    return todo


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
