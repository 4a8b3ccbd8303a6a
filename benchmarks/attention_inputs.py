"""Layer shapes and random hybrid-attention inputs shared by the GPU benchmark and check scripts.

Shapes: B batch, H query heads, Hkv key/value heads, T length, D head dim, F = 2 x feature_dim
(Hedgehog's phi). Feature inputs are Hedgehog features of the random q and GQA-repeated k through
randomly initialised maps, so they are positive and their normalisers look like a real layer's.
"""
import os
from dataclasses import dataclass

import torch

from kernels.hybrid_attention import BACKENDS
from pipeline.hybrid.attention import HybridAttention
from pipeline.hybrid.config import HybridConfig
from pipeline.hybrid.feature_maps import FEATURE_MAPS


@dataclass(frozen=True)
class AttentionShape:
    heads: int  # H
    kv_heads: int  # Hkv
    head_dim: int  # D
    feature_dim: int  # F' of each Hedgehog map; phi has F = 2 F' values

    @property
    def features(self) -> int:
        return 2 * self.feature_dim


SHAPES: dict[str, AttentionShape] = {
    "llama3-8b": AttentionShape(heads=32, kv_heads=8, head_dim=128, feature_dim=64),
    "smollm2-135m": AttentionShape(heads=9, kv_heads=3, head_dim=64, feature_dim=64),  # the default teacher
    "phi3-mini": AttentionShape(heads=32, kv_heads=32, head_dim=96, feature_dim=64),  # D not a power of two
    "gemma3-4b": AttentionShape(heads=8, kv_heads=4, head_dim=256, feature_dim=64),  # D tiled by 128
}
SMOKE_SHAPES: dict[str, AttentionShape] = {"tiny": AttentionShape(heads=4, kv_heads=2, head_dim=16, feature_dim=8)}

WINDOW_SIZE = 64  # the hybrid layer's softmax window (params.yaml attention.window_size)


def triton_runs_on(device: torch.device) -> bool:
    """Our Triton backend runs on CUDA, and on CPU only through the interpreter (TRITON_INTERPRET=1)."""
    return "triton" in BACKENDS and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


@dataclass
class HybridInputs:
    q: torch.Tensor  # [B,H,T,D]
    k: torch.Tensor  # [B,Hkv,T,D], post-RoPE in a real layer
    v: torch.Tensor  # [B,Hkv,T,D]
    fq: torch.Tensor  # [B,H,T,F] phi_q(q)
    fk: torch.Tensor  # [B,H,T,F] phi_k(repeat_kv(k))
    gamma: torch.Tensor  # [H] fp32, sigmoid of the window factors

    @property
    def scale(self) -> float:
        return self.q.shape[-1] ** -0.5

    def leaves(self) -> list[torch.Tensor]:
        """Every input, in the order of the hybrid attention signature (grads are taken w.r.t. these)."""
        return [self.q, self.k, self.v, self.fq, self.fk, self.gamma]

    def converted(self, dtype: torch.dtype) -> "HybridInputs":
        """Detached copies in `dtype` (gamma stays fp32), each requiring grad."""
        def leaf(x: torch.Tensor, to: torch.dtype) -> torch.Tensor:
            return x.detach().to(to).requires_grad_()
        return HybridInputs(*(leaf(x, dtype) for x in self.leaves()[:5]), leaf(self.gamma, torch.float32))


def random_inputs(shape: AttentionShape, batch: int, length: int, dtype: torch.dtype,
                  device: torch.device) -> HybridInputs:
    """Fresh inputs from the global RNG (seed it first); each one a leaf that requires grad."""
    H, Hkv, D = shape.heads, shape.kv_heads, shape.head_dim
    q = torch.randn(batch, H, length, D, device=device)
    k = torch.randn(batch, Hkv, length, D, device=device)
    v = torch.randn(batch, Hkv, length, D, device=device)
    feature_map = FEATURE_MAPS["hedgehog"]
    with torch.no_grad():
        phi_q = feature_map(H, D, shape.feature_dim, "kaiming").to(device)
        phi_k = feature_map(H, D, shape.feature_dim, "kaiming").to(device)
        fq = phi_q(q)  # [B,H,T,F] fp32
        fk = phi_k(k.repeat_interleave(H // Hkv, dim=1))  # [B,H,T,F] fp32
    gamma = torch.sigmoid(-2 + 0.5 * torch.randn(H, device=device))  # around the init 0.1
    return HybridInputs(q, k, v, fq, fk, gamma).converted(dtype)


def hybrid_module(shape: AttentionShape, window: str, backend: str, device: torch.device) -> HybridAttention:
    """The pipeline's hybrid layer (fp32 master weights, as `linearize` makes them), random feature maps."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not registered; known: {sorted(BACKENDS)}")
    config = HybridConfig(window=window, window_size=WINDOW_SIZE, feature_dim=shape.feature_dim,
                          feature_init="kaiming", backend=backend)
    return HybridAttention(config, shape.heads, shape.head_dim).to(device=device, dtype=torch.float32)
