"""Chunked hybrid attention in Triton: fused forward and backward for training and prefill.

Same function as `naive.py` (../shared/design/lolcats.md §1.3); `parallel.py` is the reference it
is tested against. The sequence is cut into chunks of C tokens (C >= the window, a multiple of it
for terrace windows; `chunk_blocks.py`; the window rule is the registry's, `kernel_windows.py`), so
for query chunk n
  * window keys and the linear keys too close for the running state lie in chunks n-1 and n: two
    C x C score blocks, recomputed wherever needed instead of stored, and
  * every key in chunks <= n-2 is linear: S = sum fk^T v [F,D] and z = sum fk [F]. The scans of
    `chunk_state.py` store them for every STATE_EVERY-th chunk; chunk n reads the last stored
    state at or before it and adds the chunks in between as all-linear blocks.
With the stored states every kernel runs one program per (chunk, head) in parallel: the forward
here, `_fwd_kernel` (o, and per query the normaliser and the window max, what the backward needs
besides the inputs), and the backward's kernels in `chunk_bwd.py`.

Dots take operands in the input dtype (bf16/fp16 on GPU) and accumulate in fp32; normalisers,
maxima, z and dz are fp32. fp32 inputs use tf32 dots on GPU and exact ones in the interpreter.

D and F are tile dimensions, so the kernels take powers of two >= 16 (tl.arange, tl.dot); other
dims (head dims 8: stories260K, 80, 96: Phi-3, 160, 192) are zero-padded up to one by
`hybrid_attention_chunk`. Zero columns of q, k, fq, fk add nothing to any dot product and zero
columns of v give zero output columns, sliced away; the pad outside the autograd function slices
the gradients back. A padded D above 128 (256: Gemma-3) is split into tiles of 128 (`chunk_blocks`):
the forward runs one program per (chunk, head, D tile of v and o). F is never split.
"""
import torch
import torch.nn.functional as F_
import triton
import triton.language as tl

from ..strides import bht_strides
from .chunk_blocks import (check_dtype, chunk_grid, chunk_program, d_tiles, dot_rest, kernel_meta,
                           lead_tile, own_d_tile, pair_masks, triton_chunk_size)
from .chunk_bwd import hybrid_attention_chunk_bwd
from .chunk_state import chunk_states_fwd
from .naive import check_inputs

# Stored states: S, z of every STATE_EVERY-th chunk (forward and query side), dS, dz of every
# DSTATE_EVERY-th (key side). A 128 x 128 state per 64 tokens is twice the size of q: storing every
# chunk's made them most of the forward's memory traffic. Sparser spacings win some forwards but
# lose forward+backward (benchmarks/h100/README.md).
STATE_EVERY, DSTATE_EVERY = 2, 2


@triton.jit
def _fwd_kernel(
    Q, K, V, FQ, FK, STATES, ZS, GAMMA, O, DEN, MAX,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sfb, sfh, sft,
    T, scale,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
    C: tl.constexpr, WINDOW: tl.constexpr, KIND: tl.constexpr,
    HAS_LINEAR: tl.constexpr, HAS_GAMMA: tl.constexpr, EVERY: tl.constexpr, LIN_FROM: tl.constexpr,
    BD: tl.constexpr, ND: tl.constexpr,
):
    """Program (chunk, (b, h), D tile t): columns d of o; the scores run over all of D in every tile's
    program, and tile 0's stores the normaliser and the max."""
    n, pid_bh, b, h = chunk_program(H, GROUP)
    hk = h // GROUP
    q_ptr = Q + b * sqb + h * sqh
    k_ptr = K + b * skb + hk * skh
    v_ptr = V + b * svb + hk * svh
    o_ptr = O + b * sob + h * soh
    fq_ptr = FQ + b * sfb + h * sfh
    fk_ptr = FK + b * sfb + h * sfh
    stat = pid_bh.to(tl.int64) * T
    stored = n // EVERY  # the state of chunk stored*EVERY: key chunks <= stored*EVERY-2
    state = pid_bh.to(tl.int64) * tl.cdiv(tl.cdiv(T, C), EVERY) + stored
    DT = Q.dtype.element_ty

    r = tl.arange(0, C)
    t, d = own_d_tile(BD, ND)  # this program's columns of v and o
    d0 = tl.arange(0, BD)  # D tile 0 (all of D when ND == 1), where each contraction over D starts
    f = tl.arange(0, F)
    g = tl.load(GAMMA + h).to(tl.float32) if HAS_GAMMA else 1.0
    i = n * C + r  # query positions, also the keys of this chunk
    jp = i - C  # keys of the previous chunk
    q_ok, p_ok = i < T, jp >= 0
    v_cur = tl.load(v_ptr + i[:, None] * svt + d[None, :], mask=q_ok[:, None], other=0.0)
    v_prev = tl.load(v_ptr + jp[:, None] * svt + d[None, :], mask=p_ok[:, None], other=0.0)
    win_c, lin_c = pair_masks(i[:, None], i[None, :], q_ok[:, None] & q_ok[None, :], WINDOW, KIND)
    win_p, lin_p = pair_masks(i[:, None], jp[None, :], q_ok[:, None] & p_ok[None, :], WINDOW, KIND)
    p_cur = tl.zeros([C, C], dtype=tl.float32)
    p_prev = tl.zeros([C, C], dtype=tl.float32)
    m = tl.zeros([C], dtype=tl.float32)
    if WINDOW > 0:
        qt = tl.load(q_ptr + i[:, None] * sqt + d0[None, :], mask=q_ok[:, None], other=0.0)
        k_cur = tl.load(k_ptr + i[:, None] * skt + d0[None, :], mask=q_ok[:, None], other=0.0)
        k_prev = tl.load(k_ptr + jp[:, None] * skt + d0[None, :], mask=p_ok[:, None], other=0.0)
        qk_c = dot_rest(tl.dot(qt, tl.trans(k_cur)), q_ptr, i, q_ok, sqt, k_ptr, i, q_ok, skt, BD, ND)
        s_c = tl.where(win_c, qk_c * scale, float("-inf"))
        qk_p = dot_rest(tl.dot(qt, tl.trans(k_prev)), q_ptr, i, q_ok, sqt, k_ptr, jp, p_ok, skt, BD, ND)
        s_p = tl.where(win_p, qk_p * scale, float("-inf"))
        m = tl.maximum(tl.max(s_c, 1), tl.max(s_p, 1))
        m = tl.where(m > float("-inf"), m, 0.0)  # padded queries see no key
        p_cur = g * tl.exp(s_c - m[:, None])
        p_prev = g * tl.exp(s_p - m[:, None])
    if HAS_LINEAR:
        fq = tl.load(fq_ptr + i[:, None] * sft + f[None, :], mask=q_ok[:, None], other=0.0)
        if LIN_FROM == 0:
            fk_cur = tl.load(fk_ptr + i[:, None] * sft + f[None, :], mask=q_ok[:, None], other=0.0)
            p_cur += tl.where(lin_c, tl.dot(fq.to(DT), tl.trans(fk_cur.to(DT))), 0.0)
        if LIN_FROM <= 1:
            fk_prev = tl.load(fk_ptr + jp[:, None] * sft + f[None, :], mask=p_ok[:, None], other=0.0)
            p_prev += tl.where(lin_p, tl.dot(fq.to(DT), tl.trans(fk_prev.to(DT))), 0.0)
    num = tl.dot(p_cur.to(DT), v_cur) + tl.dot(p_prev.to(DT), v_prev)
    den = tl.sum(p_cur, 1) + tl.sum(p_prev, 1)
    if HAS_LINEAR:
        S = tl.load(STATES + state * F * D + f[:, None] * D + d[None, :])
        z = tl.load(ZS + state * F + f)
        num += tl.dot(fq.to(DT), S)
        den += tl.sum(fq.to(tl.float32) * z[None, :], 1)
        if EVERY > 1:  # key chunks between the stored state and chunk n-1: all linear
            for gap in range(tl.maximum(stored * EVERY - 1, 0), n - 1):
                jg = gap * C + r
                fk_g = tl.load(fk_ptr + jg[:, None] * sft + f[None, :])
                l_g = tl.dot(fq.to(DT), tl.trans(fk_g.to(DT)))
                num += tl.dot(l_g.to(DT), tl.load(v_ptr + jg[:, None] * svt + d[None, :]))
                den += tl.sum(l_g, 1)
    den = tl.where(q_ok, den, 1.0)
    tl.store(o_ptr + i[:, None] * sot + d[None, :], (num / den[:, None]).to(O.dtype.element_ty), mask=q_ok[:, None])
    tl.store(DEN + stat + i, den, mask=lead_tile(q_ok, t, ND))
    tl.store(MAX + stat + i, m, mask=lead_tile(q_ok, t, ND))


def hybrid_attention_chunk_fwd(q, k, v, fq, fk, gamma, window_size: int, window: str, scale: float, chunk: int,
                               every: int):
    """-> o [B,H,T,D] in q's dtype; per query the fp32 normaliser and window max [B,H,T]; and the
    linear states S, z of every `every`-th chunk from `chunk_states_fwd` (None without a linear branch)."""
    B, H, T, D = q.shape
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    den = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    max_ = torch.empty_like(den)
    states, zs = chunk_states_fwd(fk, v, q.dtype, chunk, every) if fq is not None else (None, None)
    feats = (fq, fk) if fq is not None else (q, q)
    _fwd_kernel[chunk_grid(triton.cdiv(T, chunk), B, H, k.shape[1], d_tiles(D)[1])](
        q, k, v, *feats, states if states is not None else den, zs if zs is not None else den,
        gamma if gamma is not None else den, o, den, max_,
        *bht_strides(q), *bht_strides(k), *bht_strides(v), *bht_strides(o), *bht_strides(feats[0]),
        T, scale, EVERY=every, **kernel_meta(q, k, fq, gamma, window_size, window, chunk))
    return o, den, max_, states, zs


class HybridAttentionChunkFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, fq, fk, gamma, window_size: int, window: str, scale: float, chunk: int):
        o, den, max_, states, zs = hybrid_attention_chunk_fwd(q, k, v, fq, fk, gamma, window_size, window,
                                                              scale, chunk, STATE_EVERY)
        ctx.save_for_backward(q, k, v, fq, fk, gamma, o, den, max_, states, zs)
        ctx.args = (window_size, window, scale, chunk, STATE_EVERY, DSTATE_EVERY)
        return o

    @staticmethod
    def backward(ctx, do):
        grads = hybrid_attention_chunk_bwd(*ctx.saved_tensors, do, *ctx.args)
        return (*grads, None, None, None, None)


# Largest D and F. D is padded to a power of two and, above 128, split into D tiles of 128 (so a
# program holds the [C, 128] and [F, 128] tiles it holds at D 128); 256 is the widest head dim in use
# (Gemma-3) and the widest the tests run. F is padded but never split: its fp32 [C, F] tiles must fit
# in registers whole.
MAX_HEAD_DIM, MAX_FEATURE_DIM = 256, 256
DIM_LIMITS = {"head dim": "split into tiles of 128 above 128",
              "feature dim": "not tiled: its fp32 tiles must fit in registers"}


def chunk_refusal(head_dim: int, feature_dim: int | None, window_size: int, window: str,
                  device: torch.device, dtype: torch.dtype) -> str | None:
    """Why these kernels cannot take a layer of this shape, or None when they can.

    `attention.backend: auto` asks this before choosing Triton (and falls back to PyTorch, saying
    why); an explicit `triton` raises with the same words."""
    for name, dim, top in (("head dim", head_dim, MAX_HEAD_DIM), ("feature dim", feature_dim or 1, MAX_FEATURE_DIM)):
        if not 1 <= dim <= top:
            return (f"the triton backend needs the {name} to be in [1, {top}] (padded to a power of two, "
                    f"{DIM_LIMITS[name]}); got {dim}")
    try:
        check_dtype(device, dtype)
        triton_chunk_size(window_size, window)
    except ValueError as e:
        return str(e)
    return None


def _padded(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x with its last dim zero-padded to `dim`; x itself where it has that size already (no copy)."""
    return x if x.shape[-1] == dim else F_.pad(x, (0, dim - x.shape[-1]))


def _tile_dim(dim: int) -> int:
    """The power of two >= 16 a dim is padded to: tl.arange needs powers of two, tl.dot at least 16."""
    return max(16, triton.next_power_of_2(dim))


def hybrid_attention_chunk(
    q: torch.Tensor,  # [B,H,T,D]
    k: torch.Tensor,  # [B,Hkv,T,D]
    v: torch.Tensor,  # [B,Hkv,T,D]
    fq: torch.Tensor | None,  # [B,H,T,F] feature-mapped queries (None: window-only)
    fk: torch.Tensor | None,  # [B,H,T,F] feature-mapped, GQA-repeated keys
    gamma: torch.Tensor | None,  # [H] window weight; None means 1
    window_size: int,
    window: str = "sliding",
    scale: float | None = None,
) -> torch.Tensor:  # [B,H,T,D] in q's dtype
    """Hybrid attention through the Triton kernels, differentiable in q, k, v, fq, fk and gamma.

    D and F up to 256, zero-padded to powers of two >= 16 where they are not (a copy of the inputs),
    D above 128 then split into tiles of 128 inside the kernels; window kinds as in `triton_chunk_size`.
    """
    check_inputs(q, k, v, fq, fk, gamma, window_size)
    D = q.shape[-1]
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    refusal = chunk_refusal(D, fq.shape[-1] if fq is not None else None, window_size, window, q.device, q.dtype)
    if refusal is not None:
        raise ValueError(f"{refusal}: use attention.backend: torch")
    chunk = triton_chunk_size(window_size, window)
    scale = D**-0.5 if scale is None else scale  # of the model's head dim, not the padded one
    q, k, v = (_padded(x, _tile_dim(D)) for x in (q, k, v))
    if fq is not None:
        F = _tile_dim(fq.shape[-1])
        fq, fk = _padded(fq, F).contiguous(), _padded(fk, F).contiguous()
    o = HybridAttentionChunkFunction.apply(q, k, v, fq, fk, gamma, window_size, window, scale, chunk)
    return o if o.shape[-1] == D else o[..., :D]
