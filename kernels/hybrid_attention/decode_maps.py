"""The Hedgehog feature maps of the decode step's new token, in Triton (`fused_recurrent.py` runs them).

phi(x) = max([softmax(x W_h), softmax(-x W_h)], eps) for the query and the new key of each head, from
the weights W_q, W_k [H,D,F/2] of `pipeline.hybrid.feature_maps.HedgehogFeatureMap`, in one of two places:
  `_hedgehog_rows_kernel`  a launch of its own before the window kernel, (head, 16 rows) a program,
                           which reads each head's weights once per 16 rows (batches);
  `_hedgehog_of_heads`     inside a window program, for that program's heads and row
                           (`StepTiles.maps_in_window`): no launch, but each row reads its heads' weights.
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


@triton.jit
def _hedgehog_halves(u, first, mask, eps):
    """[softmax(u), softmax(-u)] clamped at eps, from u [BG,BF] whose columns hold each half's u side by
    side (`first`: the columns of the first half; `mask`: the real (head, column) pairs, others 0)."""
    x = tl.where(mask, tl.where(first, u, -u), float("-inf"))
    m = tl.where(first, tl.max(tl.where(first, x, float("-inf")), axis=1)[:, None],
                 tl.max(tl.where(first, float("-inf"), x), axis=1)[:, None])
    e = tl.where(mask, tl.exp(x - m), 0.0)
    total = tl.where(first, tl.sum(tl.where(first, e, 0.0), axis=1)[:, None],
                     tl.sum(tl.where(first, 0.0, e), axis=1)[:, None])
    return tl.where(mask, tl.maximum(e / total, eps), 0.0)


@triton.jit
def _hedgehog_of_heads(q_ptr, k_row, wq_ptr, wk_ptr, eps, heads, head, mask_g,
                       D: tl.constexpr, F: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, BG: tl.constexpr):
    """phi_q, phi_k [BG,BF] of the new token for a window program's heads (`heads` flat (row, head),
    `head` the head index of each): what `_hedgehog_rows_kernel` computes, where the step's maps run
    in the window kernel (`StepTiles.maps_in_window`). Each W_h [D,F/2] is read twice side by side,
    once per half of phi, so that phi comes out in the state's column order."""
    half: tl.constexpr = F // 2
    offs_f = tl.arange(0, BF)
    first = (offs_f < half)[None, :]
    columns = tl.where(offs_f < half, offs_f, offs_f - half)
    mask_f = offs_f < F
    u_q = tl.zeros([BG, BF], dtype=tl.float32)
    u_k = tl.zeros([BG, BF], dtype=tl.float32)
    for d0 in range(0, D, BV):
        offs_d = d0 + tl.arange(0, BV)
        mask_d = offs_d < D
        x_q = tl.load(q_ptr + heads[:, None] * D + offs_d[None, :], mask=mask_g[:, None] & mask_d[None, :],
                      other=0.0).to(tl.float32)  # [BG,BV]
        x_k = tl.load(k_row + offs_d, mask=mask_d, other=0.0).to(tl.float32)  # [BV]: the group's key
        w_offsets = (head[:, None, None] * D + offs_d[None, :, None]) * half + columns[None, None, :]
        w_mask = mask_g[:, None, None] & mask_d[None, :, None] & mask_f[None, None, :]
        w_q = tl.load(wq_ptr + w_offsets, mask=w_mask, other=0.0).to(tl.float32)  # [BG,BV,BF]
        w_k = tl.load(wk_ptr + w_offsets, mask=w_mask, other=0.0).to(tl.float32)
        u_q += tl.sum(x_q[:, :, None] * w_q, axis=1)
        u_k += tl.sum(x_k[None, :, None] * w_k, axis=1)
    mask = mask_g[:, None] & mask_f[None, :]
    return _hedgehog_halves(u_q, first, mask, eps), _hedgehog_halves(u_k, first, mask, eps)
