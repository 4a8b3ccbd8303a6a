"""Chunked hybrid attention in plain PyTorch: the CPU path and the reference for fast kernels.

Same function as `naive.py` (../shared/design/lolcats.md §1.3) without any T x T tensor. The
sequence is cut into chunks of C tokens, C >= the window and a multiple of it, so every key a
query of chunk n reaches through softmax lies in chunk n-1 or n, and every key in chunks <= n-2
is linear for all of chunk n. Chunk n therefore needs
  * a C x 2C block of scores against chunks n-1 and n (window keys, and the linear keys that are
    too close to sit in the running state), and
  * the linear state of chunks <= n-2: S = sum fk^T v [F,D] and z = sum fk [F], by prefix sums.
Memory is O(T * 2C) for scores plus O(T / C * F * D) for the per-chunk states.
"""
import math

import torch
import torch.nn.functional as F_

from .naive import check_inputs, repeat_kv
from .windows import window_kind

# Smallest chunk of this form (the Triton kernels have their own, `chunk_blocks.triton_chunk_size`): below
# this the per-chunk state tensors cost more than the scores they save.
MIN_TORCH_CHUNK = 64


def torch_chunk_size(window_size: int, seq_len: int) -> int:
    """C: a multiple of the window (terrace blocks must not straddle chunks), at least MIN_TORCH_CHUNK.

    A window as long as the sequence gives one chunk of exactly T tokens (no padding).
    """
    if window_size == 0:
        c = MIN_TORCH_CHUNK
    else:
        c = window_size * math.ceil(MIN_TORCH_CHUNK / window_size)
    return seq_len if c >= seq_len else c


def hybrid_attention_parallel(
    q: torch.Tensor,  # [B,H,T,D]
    k: torch.Tensor,  # [B,Hkv,T,D]
    v: torch.Tensor,  # [B,Hkv,T,D]
    fq: torch.Tensor | None,  # [B,H,T,F]
    fk: torch.Tensor | None,  # [B,H,T,F]
    gamma: torch.Tensor | None,  # [H]
    window_size: int,
    window: str = "sliding",
    scale: float | None = None,
) -> torch.Tensor:  # [B,H,T,D]
    check_inputs(q, k, v, fq, fk, gamma, window_size)
    B, H, T, D = q.shape
    scale = D**-0.5 if scale is None else scale
    C = torch_chunk_size(window_size, T)
    N = math.ceil(T / C)
    pad = N * C - T

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [B,H,T,X] -> [B,H,N,C,X] fp32, zero-padded at the end
        return F_.pad(x.float(), (0, 0, 0, pad)).view(B, H, N, C, x.shape[-1])

    def with_previous(x: torch.Tensor) -> torch.Tensor:  # [B,H,N,C,X] -> [B,H,N,2C,X]: chunk n-1 then n
        prev = F_.pad(x, (0, 0, 0, 0, 1, 0))[:, :, :N]
        return torch.cat([prev, x], dim=3)

    qc = chunks(q)
    kc2 = with_previous(chunks(repeat_kv(k, H)))  # [B,H,N,2C,D]
    vc = chunks(repeat_kv(v, H))
    vc2 = with_previous(vc)

    # Absolute positions: query i = nC + a, key j = (n-1)C + b; keys before 0 are padding.
    n = torch.arange(N, device=q.device)[:, None, None]
    i = n * C + torch.arange(C, device=q.device)[None, :, None]  # [N,C,1]
    j = (n - 1) * C + torch.arange(2 * C, device=q.device)[None, None, :]  # [N,1,2C]
    visible = (j >= 0) & (j <= i)  # [N,C,2C]
    if window_size > 0:
        in_window = visible & window_kind(window).contains(i, j, window_size)
    else:
        in_window = torch.zeros_like(visible)

    num = torch.zeros_like(qc)  # [B,H,N,C,D]
    den = torch.zeros(B, H, N, C, 1, device=q.device)
    if window_size > 0:
        s = scale * torch.einsum("bhncd,bhnkd->bhnck", qc, kc2)  # [B,H,N,C,2C]
        s = s.masked_fill(~in_window, float("-inf"))
        m = s.amax(dim=-1, keepdim=True)  # [B,H,N,C,1]
        g = torch.ones(H, device=q.device) if gamma is None else gamma.float()
        a = g[:, None, None, None] * torch.exp(s - m)
        num = num + torch.einsum("bhnck,bhnkd->bhncd", a, vc2)
        den = den + a.sum(-1, keepdim=True)
    if fq is not None:
        fqc, fkc = chunks(fq), chunks(fk)  # [B,H,N,C,F]
        # Linear keys in chunks n-1 and n: those outside the window.
        b = torch.einsum("bhncf,bhnkf->bhnck", fqc, with_previous(fkc)) * (visible & ~in_window)
        num = num + torch.einsum("bhnck,bhnkd->bhncd", b, vc2)
        den = den + b.sum(-1, keepdim=True)
        # Chunks <= n-2 through the running state: exclusive prefix sums shifted by one more chunk.
        kv = torch.einsum("bhncf,bhncd->bhnfd", fkc, vc)  # [B,H,N,F,D]
        state = F_.pad(kv.cumsum(dim=2), (0, 0, 0, 0, 2, 0))[:, :, :N]  # S of chunks <= n-2
        k_sum = F_.pad(fkc.sum(dim=3).cumsum(dim=2), (0, 0, 2, 0))[:, :, :N]  # [B,H,N,F], z likewise
        num = num + torch.einsum("bhncf,bhnfd->bhncd", fqc, state)
        den = den + torch.einsum("bhncf,bhnf->bhnc", fqc, k_sum)[..., None]
    # Padded queries are dropped before dividing: in linear-only mode their normaliser is 0.
    num, den = num.reshape(B, H, N * C, D)[:, :, :T], den.reshape(B, H, N * C, 1)[:, :, :T]
    return (num / den).to(q.dtype)
