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


__all__ = ["HybridConfig", "TeacherConfig"]
