"""Learnable feature maps phi for the linear branch (../shared/design/lolcats.md §1.2, §1.5).

Each map holds one weight per query head, W [H,D,F'], applied as 'hdf,bhtd->bhtf' to post-RoPE,
GQA-repeated inputs [B,H,T,D]; `output_dim` is the width F of phi(x). Maps sit in `FEATURE_MAPS`
through `register_feature_map`; a new map is a new registered class, never a branch. A map may
name a fused kernel (`fused_kernel`, from kernels/feature_maps) that `grouped` runs when asked to.
"""
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.feature_maps import hedgehog_feature_map, hedgehog_kernel_takes

FEATURE_MAPS: dict[str, type["FeatureMap"]] = {}

# Upstream clamps phi at this value so the linear normaliser can never reach zero (§1.2).
PHI_EPS = 1e-12


def register_feature_map(name: str) -> Callable[[type["FeatureMap"]], type["FeatureMap"]]:
    def add(cls: type["FeatureMap"]) -> type["FeatureMap"]:
        FEATURE_MAPS[name] = cls
        return cls
    return add


class FeatureMap(nn.Module):
    """Per-head linear layer x W_h (+ b_h), then the map's nonlinearity in `activate`."""
    has_bias = False
    # The same map as one kernel: (x [B,Hx,T,D], weight [H,D,F'], eps) -> phi [B,H,T,F] in x's dtype,
    # query head h reading x head h // (H // Hx), so keys need no GQA repeat. None: PyTorch only.
    fused_kernel: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None
    # The fused decode kernel applies this map itself, given its weight and PHI_EPS
    # (kernels.hybrid_attention.decode_maps.HedgehogMaps); False: fq, fk are computed before it.
    in_decode_kernel = False

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int, init: str):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim))  # [H,D,F']
        self.bias = nn.Parameter(torch.zeros(num_heads, 1, feature_dim)) if self.has_bias else None
        if init == "identity":
            # Upstream's --lk_zero_init: W_h[i,i] = 1, so x W_h = the first F' coordinates of x.
            with torch.no_grad():
                self.weight.zero_()
                n = min(head_dim, feature_dim)
                self.weight[:, range(n), range(n)] = 1.0
        else:  # "kaiming": nn.Linear's default, per head
            for w in self.weight.data:
                nn.init.kaiming_uniform_(w.T, a=math.sqrt(5))

    @property
    def output_dim(self) -> int:
        return self.weight.shape[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,H,T,D] -> [B,H,T,F] fp32
        u = torch.einsum("hdf,bhtd->bhtf", self.weight.float(), x.float())
        if self.bias is not None:
            u = u + self.bias.float()
        return self.activate(u)

    def grouped(self, x: torch.Tensor, fused: bool) -> torch.Tensor:  # [B,Hx,T,D] -> [B,H,T,F]
        """phi of every query head h from x head h // (H // Hx): the fused kernel if `fused` and the
        map has one, else `forward` on repeat_kv(x)."""
        if fused and self.kernel_takes_shape():
            return self.fused_kernel(x, self.weight, PHI_EPS)
        group = self.weight.shape[0] // x.shape[1]
        return self(x if group == 1 else x.repeat_interleave(group, dim=1))  # [B,H,T,D]

    def kernel_takes_shape(self) -> bool:
        """Whether `fused_kernel` takes this map's D and F' (other shapes stay on PyTorch)."""
        return False

    def activate(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register_feature_map("hedgehog")
class HedgehogFeatureMap(FeatureMap):
    """phi(x) = [softmax(xW), softmax(-xW)], each half its own softmax, clamped at 1e-12.

    Not flash-linear-attention's HedgehogFeatureMap (one softmax over [2u, -2u], FLA #195).
    """
    fused_kernel = staticmethod(hedgehog_feature_map)
    in_decode_kernel = True

    def kernel_takes_shape(self) -> bool:
        return hedgehog_kernel_takes(*self.weight.shape[1:])

    @property
    def output_dim(self) -> int:
        return 2 * self.weight.shape[-1]

    def activate(self, u: torch.Tensor) -> torch.Tensor:
        return torch.cat([u.softmax(dim=-1), (-u).softmax(dim=-1)], dim=-1).clamp(min=PHI_EPS)


@register_feature_map("t2r")
class T2RFeatureMap(FeatureMap):
    """Transformer-to-RNN: phi(x) = ReLU(xW + b), with bias; clamped so the normaliser stays > 0."""
    has_bias = True

    def activate(self, u: torch.Tensor) -> torch.Tensor:
        return F.relu(u).clamp(min=PHI_EPS)


@register_feature_map("elu")
class EluFeatureMap(FeatureMap):
    """phi(x) = 1 + ELU(xW): the classic positive map of Katharopoulos et al."""

    def activate(self, u: torch.Tensor) -> torch.Tensor:
        return 1 + F.elu(u)
