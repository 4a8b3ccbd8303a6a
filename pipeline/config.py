"""One dataclass per params.yaml block (defaults equal params.yaml; a test checks that).

Blocks shared by several stages (`teacher`, `attention`, `tracking`) come first, then one block per
stage in pipeline order. Reading and checking rules live in `params.py`.
"""
from dataclasses import dataclass
from typing import Literal

import torch

from .hybrid.config import HybridConfig
from .params import ParamsBlock


@dataclass
class TeacherConfig(ParamsBlock):
    BLOCK = "teacher"

    # "SmolLM2-135M-Instruct" (the embedded GGUF, offline), a local HF folder, or a hub id
    source: str = "SmolLM2-135M-Instruct"
    dtype: Literal["float32", "bfloat16"] = "float32"  # fp32 on CPU; bf16 halves memory on GPU

    def __post_init__(self) -> None:
        self.require(bool(self.source.strip()), "source", "must name a model")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


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
    max_train_tokens: int | None = 131072
    max_val_tokens: int | None = 16384  # the same cap for validation (paper: all 200 rows)

    def __post_init__(self) -> None:
        self.require(bool(self.source.strip()), "source", "must be a .jsonl path or a hub dataset id")
        self.require(self.seq_len >= 2, "seq_len", "must be at least 2 tokens")
        self.require(self.val_rows >= 1, "val_rows", "must be at least 1 row")
        for name in ("max_train_tokens", "max_val_tokens"):
            cap = getattr(self, name)
            self.require(cap is None or cap >= self.seq_len, name,
                         f"must be null or at least seq_len ({self.seq_len}) tokens")


__all__ = ["HybridConfig", "PrepareDataConfig", "TeacherConfig", "TrackingConfig"]
