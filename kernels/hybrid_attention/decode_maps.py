"""The Hedgehog feature maps of the decode step's new token, in Triton (`fused_recurrent.py` runs them).

phi(x) = max([softmax(x W_h), softmax(-x W_h)], eps) for the query and the new key of each head, from
the weights W_q, W_k [H,D,F/2] of `pipeline.hybrid.feature_maps.HedgehogFeatureMap`, by
`_hedgehog_rows_kernel`, a launch of its own before the window kernel, (head, 16 rows) a program, which
reads each head's weights once per 16 rows. The window kernel's programs computing their own heads'
maps instead (one launch a layer fewer, but each row reading its heads' weights) was measured slower
in the whole step: 1,036 against 819 us of our kernels a step at batch 1, 3,530 against 3,311 at batch
64 (H100, Llama-3-8B shape; benchmarks/h100/generate/2026-12-07e), so it was removed.
Math is fp32 (the weights read as fp32 whatever their dtype), with exact ("ieee") dots.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

MAP_ROWS = 16  # rows per `_hedgehog_rows_kernel` program: tl.dot's smallest M


class HedgehogMaps(NamedTuple):
    """Query and key Hedgehog maps the step applies itself: W [H,D,F/2] each (the hybrid's fp32
    masters, or a model cast whole to bf16; read as fp32), and their clamp."""
    weight_q: torch.Tensor
    weight_k: torch.Tensor
    eps: float


@triton.jit
def _hedgehog_rows_kernel(
    q_ptr, k_ptr, wq_ptr, wk_ptr, features_ptr, B, eps,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr, BV: tl.constexpr,
):
    """phi_q and phi_k of the new token for BB rows of one head: features[b, h] = [phi_q, phi_k], each
    [F] fp32. One program reads its head's W_q, W_k [D,F/2] once for all its rows (a dot per D tile);
    one program per (row, head) would read them B times."""
    h = tl.program_id(0)
    rows = tl.program_id(1) * BB + tl.arange(0, BB)
    mask_rows = rows < B
    hk = h // (H // HKV)
    half = F // 2
    offs_j = tl.arange(0, BH)
    mask_j = offs_j < half
    u_q = tl.zeros([BB, BH], dtype=tl.float32)
    u_k = tl.zeros([BB, BH], dtype=tl.float32)
    for d0 in tl.static_range(0, D, BV):
        offs_d = d0 + tl.arange(0, BV)
        mask_d = offs_d < D
        mask_x = mask_rows[:, None] & mask_d[None, :]
        mask_w = mask_d[:, None] & mask_j[None, :]
        x_q = tl.load(q_ptr + (rows[:, None] * H + h) * D + offs_d[None, :], mask=mask_x, other=0.0).to(tl.float32)
        x_k = tl.load(k_ptr + (rows[:, None] * HKV + hk) * D + offs_d[None, :], mask=mask_x, other=0.0).to(tl.float32)
        w_q = tl.load(wq_ptr + h * D * half + offs_d[:, None] * half + offs_j[None, :], mask=mask_w, other=0.0)
        w_k = tl.load(wk_ptr + h * D * half + offs_d[:, None] * half + offs_j[None, :], mask=mask_w, other=0.0)
        u_q += tl.dot(x_q, w_q.to(tl.float32), input_precision="ieee")
        u_k += tl.dot(x_k, w_k.to(tl.float32), input_precision="ieee")
    out = features_ptr + (rows[:, None] * H + h) * 2 * F + offs_j[None, :]
    mask_out = mask_rows[:, None] & mask_j[None, :]
    for which in tl.static_range(2):  # 0: phi_q, 1: phi_k
        u = u_q if which == 0 else u_k
        for sign in tl.static_range(2):  # the softmax of u, then of -u, each clamped at eps
            x = tl.where(mask_j[None, :], u if sign == 0 else -u, float("-inf"))
            e = tl.exp(x - tl.max(x, axis=1)[:, None])
            tl.store(out + which * F + sign * half, tl.maximum(e / tl.sum(e, axis=1)[:, None], eps), mask=mask_out)
