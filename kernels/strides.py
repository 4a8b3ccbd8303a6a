"""Strides the Triton launchers pass for [B,H,T,X] tensors read in place (views included)."""
import torch


def bht_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, time) strides of a [B,H,T,X] tensor whose last dim is contiguous."""
    assert x.stride(-1) == 1, "the last dim must be contiguous"
    return x.stride(0), x.stride(1), x.stride(2)
