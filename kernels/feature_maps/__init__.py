"""Fused feature maps phi of the linear branch (../shared/design/lolcats.md §1.2).

The PyTorch maps in `pipeline/hybrid/feature_maps.py` are the numerics contract; `hedgehog.py`
fuses the Hedgehog map (per-head matmul, two softmaxes, clamp) into one Triton kernel each way.
"""
from .hedgehog import hedgehog_feature_map, hedgehog_kernel_takes

__all__ = ["hedgehog_feature_map", "hedgehog_kernel_takes"]
