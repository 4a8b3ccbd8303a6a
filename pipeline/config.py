"""One dataclass per params.yaml block (defaults equal params.yaml; a test checks that).

Blocks shared by several stages (`teacher`, `compute`, `distributed`, `attention`, `tracking`) come first, then one block per
stage in pipeline order. Reading and checking rules live in `params.py`.
"""
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch

from .comparison import reach
from .hybrid.config import HybridConfig
from .io import DataFileError
from .params import ConfigError, ParamsBlock, build_block, build_entry

# Every dtype a params block or `lm_eval --model_args dtype=` names (the Literals below repeat them: a test checks)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TeacherConfig(ParamsBlock):
    BLOCK = "teacher"

    # "SmolLM2-135M-Instruct" (the embedded GGUF, offline), a local HF folder, or a hub id
    source: str = "SmolLM2-135M-Instruct"

    def __post_init__(self) -> None:
        self.require(bool(self.source.strip()), "source", "must name a model")


@dataclass
class ComputeConfig(ParamsBlock):
    """Where every stage that runs a model runs it, and in which precision.

    `auto` needs no edit between machines: CUDA when torch sees a GPU, else the CPU; bf16 weights on
    CUDA, fp32 on the CPU. Trainable weights (feature maps, window factors, LoRA) stay fp32 masters
    whatever `dtype` says, and so does their optimizer state.
    """

    BLOCK = "compute"

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # the frozen weights and activations

    def __post_init__(self) -> None:
        self.require(self.device == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is not None,
                     "device", "must be auto, cpu, cuda or cuda:N")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"compute.device: {self.device!r} asked for, but torch sees no CUDA device; "
                              "use auto or cpu")
        return device

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]


@dataclass
class DistributedConfig(ParamsBlock):
    """How many processes each model stage runs as: `torchrun --nproc-per-node N` in dvc.yaml's commands.

    One process per GPU (NCCL), or N processes on the CPU (gloo). N = 1 runs the stages as one process,
    exactly as without torchrun. attention-transfer deals its blocks over the processes,
    cache-teacher-attn its state shards, lora-recover its micro-batches (the model sharded by FSDP2);
    lm-eval stays one process (`pipeline.distributed`).
    """

    BLOCK = "distributed"

    nproc_per_node: int = 1
    # FSDP2 over the processes for the frozen teacher in cache-teacher-attn: each holds 1/N of its
    # weights, for a teacher too large for one GPU; the states are the same either way
    shard_teacher: bool = False

    def __post_init__(self) -> None:
        self.require(self.nproc_per_node >= 1, "nproc_per_node", "must be at least 1")


@dataclass
class TrackingConfig(ParamsBlock):
    """Where runs are recorded; changes no result, so no DVC stage lists it under `params`."""

    BLOCK = "tracking"

    experiment: str = "lolcats"  # MLflow experiment holding one parent run per pipeline execution
    # relative to the repo root (the stages' cwd); env MLFLOW_TRACKING_URI, when set, wins
    tracking_uri: str = "sqlite:///mlflow.db"

    def __post_init__(self) -> None:
        self.require(bool(self.experiment.strip()), "experiment", "must name an MLflow experiment")
        self.require(bool(self.tracking_uri.strip()), "tracking_uri", "must be an MLflow tracking URI")


@dataclass
class PrepareDataConfig(ParamsBlock):
    """Alpaca → packed train/validation chunks (../shared/design/lolcats.md §2 Data)."""

    BLOCK = "prepare-data"

    # a local .jsonl (instruction/input/output rows) relative to the repo root, or a hub id
    # (`yahma/alpaca-cleaned`, the paper's data, read with datasets.load_dataset(id, split="train"))
    source: str = "../shared/data/alpaca/train.jsonl"
    seq_len: int = 1024  # tokens per packed chunk (paper: 1024)
    val_rows: int = 200  # rows 0..val_rows-1 → validation, the rest → train (paper: 200)
    # train tokens kept: the first floor(max_train_tokens / seq_len) chunks; null = every row.
    # Paper: all ~10M tokens of alpaca-cleaned, 2 epochs per stage; this keeps CPU runs small.
    max_train_tokens: int | None = 16384
    max_val_tokens: int | None = 2048  # the same cap for validation (paper: all 200 rows)

    def __post_init__(self) -> None:
        self.require(bool(self.source.strip()), "source", "must be a .jsonl path or a hub dataset id")
        self.require(self.seq_len >= 2, "seq_len", "must be at least 2 tokens")
        self.require(self.val_rows >= 1, "val_rows", "must be at least 1 row")
        for name in ("max_train_tokens", "max_val_tokens"):
            cap = getattr(self, name)
            self.require(cap is None or cap >= self.seq_len, name,
                         f"must be null or at least seq_len ({self.seq_len}) tokens")


@dataclass
class CacheTeacherAttnConfig(ParamsBlock):
    """The teacher's hidden states entering each transfer block (../shared/design/lolcats.md §4)."""

    BLOCK = "cache-teacher-attn"

    # layers per transfer block: 1 = every layer trained on its own inputs (cheapest per step);
    # the teacher's layer count = one block = upstream's joint 8B recipe (§2)
    block_size: int = 1
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # storage; bf16 halves disk, as upstream trains
    max_cache_gb: float = 4.0  # the largest cache written (GiB); `states: auto` goes online above it
    # disk: cache every block's input states; online: nothing on disk, attention-transfer runs the
    # teacher on the fly and trains all layers as one joint block (one teacher forward feeds every
    # layer's loss, upstream's recipe; block_size does not apply); auto: disk while the cache fits
    # max_cache_gb, online above it
    states: Literal["auto", "disk", "online"] = "auto"
    batch_size: int = 1  # chunks per teacher forward

    def __post_init__(self) -> None:
        self.require(self.block_size >= 1, "block_size", "must be at least 1 layer")
        self.require(self.max_cache_gb > 0, "max_cache_gb", "must be a positive size in GiB")
        self.require(self.batch_size >= 1, "batch_size", "must be at least 1 chunk")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class TrainingConfig(ParamsBlock):
    """Optimisation shared by attention-transfer and lora-recover (§2, §3): AdamW + plateau schedule."""

    lr: float = 1e-2
    weight_decay: float = 0.0
    epochs: int = 2  # passes over the train chunks (paper: 2)
    grad_accum: int = 8  # chunks per update (paper: micro-batch 1 x 8 = 8,192 tokens at seq_len 1024)
    batch_size: int = 1  # chunks per forward pass; divides grad_accum (a GPU wants several)
    max_updates: int | None = None  # stop early after this many updates (CPU budget); null = all epochs
    eval_every: int = 100  # updates between validation passes (paper: 100)
    plateau_patience: int = 10  # evaluations without improvement before the lr drops (paper: 10)
    plateau_factor: float = 0.1  # lr multiplier on a plateau (paper: 0.1)
    min_lr: float = 1e-5  # the plateau schedule's floor (paper: 1e-5)
    seed: int = 0  # data order; the same seed gives the same metrics on CPU

    def __post_init__(self) -> None:
        self.require(self.lr > 0, "lr", "must be positive")
        self.require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self.require(self.epochs >= 0, "epochs", "must be >= 0 (0 keeps the initial weights)")
        self.require(self.grad_accum >= 1, "grad_accum", "must be at least 1 chunk")
        self.require(self.batch_size >= 1 and self.grad_accum % self.batch_size == 0, "batch_size",
                     f"must be at least 1 and divide grad_accum ({self.grad_accum})")
        self.require(self.max_updates is None or self.max_updates >= 0, "max_updates", "must be null or >= 0")
        self.require(self.eval_every >= 1, "eval_every", "must be at least 1 update")
        self.require(self.plateau_patience >= 0, "plateau_patience", "must be >= 0")
        self.require(0 < self.plateau_factor < 1, "plateau_factor", "must lie strictly between 0 and 1")
        self.require(0 <= self.min_lr <= self.lr, "min_lr", f"must lie in [0, lr={self.lr}]")


@dataclass
class AttentionTransferConfig(TrainingConfig):
    """Stage 1: train feature maps and window factors to match each layer's softmax output (§2)."""

    BLOCK = "attention-transfer"

    lr: float = 1e-2  # paper: 1e-2
    grad_accum: int = 1  # CPU default; paper: 8
    eval_every: int = 8  # CPU default; paper: 100
    mse_factor: float = 1000.0  # x MSE of per-head outputs before o_proj (paper: 1000)
    xent_factor: float = 0.0  # x attention-weight cross-entropy; quadratic memory (8B paper: 0)
    # the stage fails when more than this fraction of the trained blocks never beats its initial
    # validation loss (they keep their initial weights); fewer are a warning, a metric and a tag
    max_unimproved_frac: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(0 <= self.max_unimproved_frac <= 1, "max_unimproved_frac", "must lie in [0, 1]")
        self.require(self.mse_factor >= 0, "mse_factor", "must be >= 0")
        self.require(self.xent_factor >= 0, "xent_factor", "must be >= 0")
        self.require(self.mse_factor + self.xent_factor > 0, "mse_factor", "and xent_factor cannot both be 0")


@dataclass
class LoraRecoverConfig(TrainingConfig):
    """Stage 2: LoRA on q/k/v/o with next-token loss on response tokens (§3)."""

    BLOCK = "lora-recover"

    lr: float = 1e-4  # paper: 1e-4 (the plateau floor stays 1e-5, as upstream)
    epochs: int = 1  # CPU default; paper: 2
    grad_accum: int = 1  # CPU default; paper: 8
    max_updates: int | None = 8  # CPU default; paper: null
    eval_every: int = 4  # CPU default; paper: 100
    rank: int = 8  # LoRA r (paper: 8)
    alpha: int = 16  # LoRA alpha, scale alpha / r (paper: 16)
    dropout: float = 0.0  # LoRA dropout (paper: 0)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # recompute each decoder layer's activations in the backward pass (transformers' gradient
    # checkpointing): less memory for one more forward; the same gradients
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(self.rank >= 1, "rank", "must be at least 1")
        self.require(self.alpha > 0, "alpha", "must be positive")
        self.require(0 <= self.dropout < 1, "dropout", "must lie in [0, 1)")
        self.require(len(self.target_modules) > 0, "target_modules", "must name at least one projection")

    def check_processes(self, processes: int) -> None:
        """A ConfigError unless `processes` ranks get as many of an update's forwards each: under FSDP2
        every forward is a collective of all ranks (pipeline/sharded_training.py)."""
        forwards = self.grad_accum // self.batch_size
        if forwards % processes:
            raise ConfigError(
                f"{self.BLOCK}.grad_accum: {self.grad_accum} chunks per update are {forwards} forwards of batch_size "
                f"{self.batch_size}, which {processes} processes (distributed.nproc_per_node) cannot share evenly; "
                f"make grad_accum / batch_size a multiple of {processes} (e.g. grad_accum "
                f"{self.batch_size * processes * -(-forwards // processes)}) or set distributed.nproc_per_node "
                f"to a divisor of {forwards}")


@dataclass
class WindowDropout(ParamsBlock):
    """Scheduled sliding-window dropout (SSD, arXiv 2510.05901) of one variant, per training stage.

    Each training forward of a hybrid layer runs linear-only with this probability at the stage's first
    update, decaying linearly to 0 at its last, so the linear branch cannot leave the work to the window.
    """

    BLOCK = "variants.window_dropout"

    transfer: float = 0.0  # start probability in attention-transfer; 0 = off
    lora: float = 0.0  # start probability in lora-recover; 0 = off

    def __post_init__(self) -> None:
        for f in fields(self):
            self.require(0 <= getattr(self, f.name) <= 1, f.name, "must lie in [0, 1]")

    @property
    def active(self) -> bool:
        return self.transfer > 0 or self.lora > 0


@dataclass
class VariantConfig(ParamsBlock):
    """One entry of the `variants` block: a trained model the evaluation compares (§5, Table 6)."""

    BLOCK = "variants"

    # the hybrid's mode for this variant; null = attention.mode
    mode: Literal["hybrid", "window_only", "linear_only"] | None = None
    # false: the paper's no-transfer baseline, feature maps + window factors trained with LoRA instead
    transfer: bool = True
    window_dropout: WindowDropout = field(default_factory=WindowDropout)  # off unless set
    # tokens per attention-transfer sequence; null = prepare-data.seq_len. A multiple k of it joins k
    # consecutive chunks, so the linear branch learns from a context k times longer; exact only with
    # every layer in one transfer block (`TeacherStates.with_seq_len`)
    transfer_seq_len: int | None = None

    def __post_init__(self) -> None:
        if self.mode is not None:  # null: check_params checks attention.mode
            self.check_window_dropout(self.mode, "mode")
        if self.transfer_seq_len is not None:
            self.require(self.transfer_seq_len >= 1, "transfer_seq_len", "must be a positive number of tokens")
            self.require(self.transfer, "transfer_seq_len",
                         "is read by attention-transfer, which trains nothing when transfer is false; remove it")
        if self.window_dropout.transfer > 0 and not self.transfer:
            raise ConfigError(f"{self.BLOCK}.window_dropout.transfer: attention-transfer trains nothing when "
                              f"transfer is false; set it to 0 (window_dropout.lora still applies), "
                              f"got {self.window_dropout.transfer!r}")

    def check_window_dropout(self, mode: str, mode_key: str) -> None:
        """Refuse dropping the window of a layer that is not a hybrid: it has no second branch to carry it."""
        if self.window_dropout.active and mode != "hybrid":
            raise ConfigError(f"{self.BLOCK}.window_dropout: needs a hybrid layer, but {mode_key} is {mode}; "
                              f"set transfer and lora to 0 or use mode hybrid, got {self.window_dropout.to_dict()}")


@dataclass
class TaskLimits(ParamsBlock):
    """Documents scored per benchmark, one field each of `evaluation.suite.BENCHMARKS` in its order (a
    test checks); null = all of them (the paper)."""

    BLOCK = "lm-eval.limit"

    piqa: int | None = 20  # of 1838 validation questions
    arc_easy: int | None = 20  # of 2376 test questions
    arc_challenge: int | None = 20  # of 1172 test questions
    hellaswag: int | None = 10  # of 10042 validation contexts (4 long endings each: the dearest task)
    winogrande: int | None = 20  # of 1267 validation sentences
    mmlu: int | None = 1  # PER SUBJECT (57 subjects; 14042 test questions in all)

    def __post_init__(self) -> None:
        for f in fields(self):
            limit = getattr(self, f.name)
            self.require(limit is None or limit >= 1, f.name, "must be null (all documents) or at least 1")


@dataclass
class LmEvalConfig(ParamsBlock):
    """Benchmarks through lm-eval and perplexities of every evaluated model (lolcats.md §5)."""

    BLOCK = "lm-eval"

    limit: TaskLimits = field(default_factory=TaskLimits)  # a seeded random subset per task
    batch_size: int = 4  # loglikelihood requests per forward, right-padded (paper: 1); 4 was fastest on CPU
    # dev examples before each MMLU question (paper: 5; dev has 5 per subject). CPU default 0:
    # 5 shots make each prompt ~6x longer, 82 s for one question per subject on SmolLM2-135M
    mmlu_shots: int = 0
    ppl_seq_len: int = 1024  # tokens per non-overlapping WikiText-2 window
    # tokens scored per perplexity: the first WikiText-2 test tokens, and the Alpaca validation
    # chunks that hold this many; null = all of both
    ppl_max_tokens: int | None = 1024
    seed: int = 0  # picks the limited subsets and seeds lm-eval; the same seed, the same documents

    def __post_init__(self) -> None:
        self.require(self.batch_size >= 1, "batch_size", "must be at least 1")
        self.require(0 <= self.mmlu_shots <= 5, "mmlu_shots", "must lie in [0, 5] (the dev split has 5 per subject)")
        self.require(self.ppl_seq_len >= 2, "ppl_seq_len", "must be at least 2 tokens")
        self.require(self.ppl_max_tokens is None or self.ppl_max_tokens >= self.ppl_seq_len, "ppl_max_tokens",
                     f"must be null or at least ppl_seq_len ({self.ppl_seq_len}) tokens")


@dataclass
class ProbesConfig(ParamsBlock):
    """Long-context probes scored by every lm-eval stage: passkey retrieval and per-position loss.

    Documents are cut from WikiText-2 test articles with the teacher's tokenizer (`pipeline.probes`);
    lengths and distances are in those tokens. The CPU default is small (18 passkeys of 320 tokens,
    2 articles of 512): its figures show the mechanism, not a measurement to quote."""

    BLOCK = "prepare-probes"

    source: str = "../shared/data/wikitext2/test.jsonl"  # WikiText-2 test rows ({"text": ...} per line)
    context_lengths: list[int] = field(default_factory=lambda: [320])  # passkey prompts' tokens (at most)
    distances: list[int] = field(default_factory=lambda: [40, 160, 280])  # tokens from the key to the prompt's end
    docs_per_cell: int = 6  # passkeys per (context length, distance) with distance < context length
    key_digits: int = 5  # the pass key: a random number of this many digits
    position_bins: list[int] = field(default_factory=lambda: [0, 64, 256, 512])  # bin edges; the last = tokens per article
    position_docs: int = 2  # articles scored per bin (each at least the last edge long)
    seed: int = 0  # picks keys, filler spans and articles

    def __post_init__(self) -> None:
        self.require(bool(self.source.strip()), "source", "must name the WikiText-2 test .jsonl")
        for name in ("context_lengths", "distances", "position_bins"):
            values = getattr(self, name)
            self.require(len(values) > 0 and values == sorted(set(values)), name,
                         "must be a non-empty list in increasing order without repeats")
        self.require(self.distances[0] >= 1, "distances", "must be at least 1 token")
        self.require(self.distances[0] < self.context_lengths[-1], "distances",
                     f"need one below the longest context length ({self.context_lengths[-1]})")
        self.require(self.docs_per_cell >= 2, "docs_per_cell", "must be at least 2 (a stderr needs two)")
        self.require(1 <= self.key_digits <= 12, "key_digits", "must lie in [1, 12]")
        self.require(self.position_bins[0] == 0 and len(self.position_bins) >= 2, "position_bins",
                     "must start at 0 and have at least two edges")
        self.require(self.position_docs >= 2, "position_docs", "must be at least 2 (a stderr needs two)")


# Every block of params.yaml, in file order; `variants` holds named VariantConfig entries.
PARAMS_BLOCKS: tuple[type[ParamsBlock], ...] = (
    TeacherConfig, ComputeConfig, DistributedConfig, HybridConfig, TrackingConfig, PrepareDataConfig, CacheTeacherAttnConfig,
    AttentionTransferConfig, LoraRecoverConfig, ProbesConfig, LmEvalConfig)


# the models evaluated beside the variants, under these names (metrics/lm_eval/<name>.json, MLflow, the report)
TEACHER, WINDOW_ONLY = "teacher", "window_only"


def check_params(params: dict) -> list[str]:
    """Check every block of params.yaml at once (the `check-params` stage); returns the block names.

    A top-level key that names no block (a typo such as `atention`) is an error, not ignored.
    """
    known = {cls.BLOCK for cls in PARAMS_BLOCKS} | {VariantConfig.BLOCK}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown params block; valid blocks are {sorted(known)}")
    for cls in PARAMS_BLOCKS:
        build_block(cls, params)
    attention, chunk = build_block(HybridConfig, params), build_block(PrepareDataConfig, params).seq_len
    for name in params.get(VariantConfig.BLOCK) or {}:
        if name in (TEACHER, WINDOW_ONLY):
            raise ConfigError(f"{VariantConfig.BLOCK}.{name}: the name of a baseline the evaluation adds; rename it")
        variant = build_entry(VariantConfig, params, name)
        if variant.mode is None:  # the variant builds attention.mode, which only this function sees with it
            variant.check_window_dropout(attention.mode, "attention.mode")
        if variant.transfer_seq_len is not None and variant.transfer_seq_len % chunk:
            raise ConfigError(f"{VariantConfig.BLOCK}.{name}.transfer_seq_len: must be a multiple of prepare-data.seq_len "
                              f"({chunk}), since it joins whole chunks; got {variant.transfer_seq_len}")
    build_block(LoraRecoverConfig, params).check_processes(build_block(DistributedConfig, params).nproc_per_node)
    probes, far = build_block(ProbesConfig, params), reach(attention.window_size)
    if probes.distances[-1] < far or probes.position_bins[-2] < far:  # the report's gains need both
        raise ConfigError(f"{ProbesConfig.BLOCK}: no probe lies {far} tokens back (2 x attention.window_size "
                          f"{attention.window_size}); give distances and position_bins a bin from {far} on")
    return sorted(params)


def scoped_attention(params: dict) -> dict[str, HybridConfig]:
    """The attention each trained variant, and the window-only baseline, builds (`HybridConfig.for_mode`).

    check-params writes one file per model and the stages that build one read it (and depend on it)
    instead of the whole `attention` block, so a param a model does not read reruns nothing of it."""
    attention = build_block(HybridConfig, params)
    scoped = {name: attention.for_mode(build_entry(VariantConfig, params, name).mode)
              for name in params.get(VariantConfig.BLOCK) or {}}
    return scoped | {WINDOW_ONLY: attention.for_mode("window_only")}


def read_scoped_attention(path: str | Path) -> HybridConfig:
    """A file `scoped_attention` wrote (through check-params)."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: missing; run `dvc repro` (its check-params stage writes it)")
    return HybridConfig(**json.loads(path.read_text()))


__all__ = ["AttentionTransferConfig", "CacheTeacherAttnConfig", "ComputeConfig", "DistributedConfig", "HybridConfig", "LmEvalConfig", "LoraRecoverConfig",
           "PrepareDataConfig", "ProbesConfig", "TeacherConfig", "TrackingConfig", "TrainingConfig", "VariantConfig"]
