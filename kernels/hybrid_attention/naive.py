"""Quadratic hybrid attention: the numerics contract (../shared/design/lolcats.md §1.3).

Builds the full T x T masks, so its memory grows with T^2. Not only the tests' oracle
(`hybrid_attention_naive`): `hybrid_attention_weights` is also training code, the student's full
weight matrix in attention transfer's cross-entropy loss, gradients included, whenever that loss is
on (pipeline/hybrid/attention.py). `parallel.py` computes the same output in chunks and
`recurrent.py` token by token.

Shapes: B batch, H query heads, Hkv key/value heads (H % Hkv == 0), T length, D head dim,
F feature dim (the feature map's output, e.g. 2 x 64 for Hedgehog).

Per head h, with s_ij = scale * q_i . k_j, window set W(i), linear set Lin(i) = {j <= i} - W(i):
    m_i  = max_{j in W(i)} s_ij                      (stabiliser of the window part only)
    y_i  = (sum_W g_h e^{s_ij - m_i} v_j + sum_Lin fq_i . fk_j v_j)
           / (sum_W g_h e^{s_ij - m_i}   + sum_Lin fq_i . fk_j)
The linear terms are deliberately not scaled by e^{-m_i}: that is the model upstream trained.
Modes: ``window_size == 0`` is linear-only (W empty); ``fq is None`` is window-only (Lin ignored).
"""
import torch

from .windows import window_kind


def check_inputs(q, k, v, fq, fk, gamma, window_size: int) -> None:
    """Shared argument checks of every hybrid attention implementation."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B,H,T,D] and k, v [B,Hkv,T,D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D or H % k.shape[1]:
        raise ValueError(f"k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} (need Hkv dividing H)")
    if (fq is None) != (fk is None):
        raise ValueError("fq and fk must both be given (hybrid, linear-only) or both be None (window-only)")
    if fq is not None and (fq.shape[:3] != (B, H, T) or fk.shape != fq.shape):
        raise ValueError(f"expected fq, fk [B,H,T,F] with B,H,T={B},{H},{T}; got {tuple(fq.shape)}, {tuple(fk.shape)}")
    if window_size < 0 or (window_size == 0 and fq is None):
        raise ValueError(f"window_size must be > 0, or 0 with feature maps given (linear-only); got {window_size}")
    if gamma is not None and gamma.shape != (H,):
        raise ValueError(f"expected gamma [H]={H}; got {tuple(gamma.shape)}")


def repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B,Hkv,T,D] -> [B,H,T,D], each key/value head shared by H // Hkv consecutive query heads."""
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


def hybrid_attention_weights(
    q: torch.Tensor,  # [B,H,T,D]
    k: torch.Tensor,  # [B,Hkv,T,D]
    fq: torch.Tensor | None,  # [B,H,T,F] feature-mapped queries
    fk: torch.Tensor | None,  # [B,H,T,F] feature-mapped (GQA-repeated) keys
    gamma: torch.Tensor | None,  # [H] window weight sigmoid(w_h); None means 1
    window_size: int,
    window: str = "sliding",
    scale: float | None = None,
) -> torch.Tensor:  # [B,H,T,T] fp32: each row sums to 1 over the keys j <= i
    """The full matrix of hybrid attention weights (A + B) / (sum A + sum B)."""
    B, H, T, D = q.shape
    scale = D**-0.5 if scale is None else scale
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    causal = j <= i  # [T,T]
    in_window = causal & window_kind(window).contains(i, j, window_size) if window_size > 0 else torch.zeros_like(causal)

    weights = torch.zeros(B, H, T, T, device=q.device)
    if window_size > 0:
        s = scale * q.float() @ repeat_kv(k, H).float().transpose(-1, -2)  # [B,H,T,T]
        s = s.masked_fill(~in_window, float("-inf"))
        m = s.amax(dim=-1, keepdim=True)  # [B,H,T,1]
        g = torch.ones(H, device=q.device) if gamma is None else gamma.float()
        weights = weights + g[:, None, None] * torch.exp(s - m)  # zero outside the window
    if fq is not None:
        weights = weights + (fq.float() @ fk.float().transpose(-1, -2)) * (causal & ~in_window)
    return weights / weights.sum(-1, keepdim=True)


def hybrid_attention_naive(
    q: torch.Tensor,  # [B,H,T,D]
    k: torch.Tensor,  # [B,Hkv,T,D]
    v: torch.Tensor,  # [B,Hkv,T,D]
    fq: torch.Tensor | None,  # [B,H,T,F]
    fk: torch.Tensor | None,  # [B,H,T,F]
    gamma: torch.Tensor | None,  # [H]
    window_size: int,
    window: str = "sliding",
    scale: float | None = None,
) -> torch.Tensor:  # [B,H,T,D] in q's dtype
    check_inputs(q, k, v, fq, fk, gamma, window_size)
    weights = hybrid_attention_weights(q, k, fq, fk, gamma, window_size, window, scale)
    return (weights @ repeat_kv(v, q.shape[1]).float()).to(q.dtype)
