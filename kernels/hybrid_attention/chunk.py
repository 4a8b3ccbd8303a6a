"""Chunked hybrid attention in Triton: fused forward and backward for training and prefill.

Same function as `naive.py` (../shared/design/lolcats.md §1.3); `parallel.py` is the reference it
is tested against. The sequence is cut into chunks of C tokens (C >= the window, a multiple of it
for terrace windows), so for query chunk n
  * window keys and the linear keys too close for the running state lie in chunks n-1 and n: two
    C x C score blocks, recomputed wherever needed instead of stored, and
  * every key in chunks <= n-2 is linear: S = sum fk^T v [F,D] and z = sum fk [F], which the scans
    of `chunk_state.py` store per chunk. With them every kernel here runs one program per chunk.

Kernels, in the order one training step runs them (after the state scans):
  _fwd_kernel       program (chunk, b, h): o, and per query the normaliser and the window max
                    (what the backward needs besides the inputs).
  _bwd_query_kernel program (chunk, b, h): dq, dfq, a dgamma partial, and the window-max gradient
                    dm with its argmax; needs delta = do . o and the forward's S, z.
  _bwd_key_kernel   program (chunk, b, kv head): dk, dv summed over the group's query heads in
                    registers, and dfk per head; needs dS = sum fq^T do/den, dz = sum fq delta/den
                    over the query chunks beyond the local blocks.
The max m_i stabilises the window part only and the linear part is not scaled by it, so the output
depends on m_i: its gradient dm_i = -sum_j A_ij dp_ij flows to the argmax key, as through the
reference's amax (ties, which random data never produce, go to one key instead of being split).

Dots take operands in the input dtype (bf16/fp16 on GPU) and accumulate in fp32; normalisers,
maxima, z and dz are fp32. fp32 inputs use tf32 dots on GPU and exact ones in the interpreter.
"""
import torch
import triton
import triton.language as tl

from ..strides import bht_strides
from .chunk_state import chunk_delta, chunk_states_bwd, chunk_states_fwd
from .naive import check_inputs

# Chunk length: the score blocks are C x C; 64 keeps them in registers with head dim 128.
MIN_CHUNK = 64
MAX_CHUNK = 128


def chunk_size(window_size: int, window: str) -> int:
    """C for a window: the smallest power of two >= MIN_CHUNK, >= w, and a multiple of w (terrace)."""
    if window_size == 0:
        return MIN_CHUNK
    c = max(MIN_CHUNK, triton.next_power_of_2(window_size))
    if c > MAX_CHUNK or (window == "terrace" and c % window_size):
        raise ValueError(f"the triton backend supports sliding windows up to {MAX_CHUNK} and terrace windows "
                         f"that are powers of two up to {MAX_CHUNK}; got {window} {window_size}: "
                         "use attention.backend: torch")
    return c


@triton.jit
def _pair_masks(i, j, ok, WINDOW: tl.constexpr, TERRACE: tl.constexpr):
    """(window, linear) masks of a block of (query i, key j) pairs; i, j and ok (both exist) broadcast."""
    visible = (j <= i) & ok
    if WINDOW > 0:
        if TERRACE:
            inside = (i // WINDOW - j // WINDOW) <= 1
        else:
            inside = (i - j) < WINDOW
        win = visible & inside
    else:
        win = visible & False
    return win, visible & (~win)


@triton.jit
def _fwd_kernel(
    Q, K, V, FQ, FK, STATES, ZS, GAMMA, O, DEN, MAX,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sfb, sfh, sft,
    T, scale,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
    C: tl.constexpr, WINDOW: tl.constexpr, TERRACE: tl.constexpr,
    HAS_LINEAR: tl.constexpr, HAS_GAMMA: tl.constexpr,
):
    n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    q_ptr = Q + b * sqb + h * sqh
    k_ptr = K + b * skb + hk * skh
    v_ptr = V + b * svb + hk * svh
    o_ptr = O + b * sob + h * soh
    fq_ptr = FQ + b * sfb + h * sfh
    fk_ptr = FK + b * sfb + h * sfh
    stat = pid_bh.to(tl.int64) * T
    chunk = pid_bh.to(tl.int64) * tl.cdiv(T, C) + n  # index into the per-chunk states
    DT = Q.dtype.element_ty

    r = tl.arange(0, C)
    d = tl.arange(0, D)
    f = tl.arange(0, F)
    g = tl.load(GAMMA + h).to(tl.float32) if HAS_GAMMA else 1.0
    i = n * C + r  # query positions, also the keys of this chunk
    jp = i - C  # keys of the previous chunk
    q_ok, p_ok = i < T, jp >= 0
    v_cur = tl.load(v_ptr + i[:, None] * svt + d[None, :], mask=q_ok[:, None], other=0.0)
    v_prev = tl.load(v_ptr + jp[:, None] * svt + d[None, :], mask=p_ok[:, None], other=0.0)
    win_c, lin_c = _pair_masks(i[:, None], i[None, :], q_ok[:, None] & q_ok[None, :], WINDOW, TERRACE)
    win_p, lin_p = _pair_masks(i[:, None], jp[None, :], q_ok[:, None] & p_ok[None, :], WINDOW, TERRACE)
    p_cur = tl.zeros([C, C], dtype=tl.float32)
    p_prev = tl.zeros([C, C], dtype=tl.float32)
    m = tl.zeros([C], dtype=tl.float32)
    if WINDOW > 0:
        qt = tl.load(q_ptr + i[:, None] * sqt + d[None, :], mask=q_ok[:, None], other=0.0)
        k_cur = tl.load(k_ptr + i[:, None] * skt + d[None, :], mask=q_ok[:, None], other=0.0)
        k_prev = tl.load(k_ptr + jp[:, None] * skt + d[None, :], mask=p_ok[:, None], other=0.0)
        s_c = tl.where(win_c, tl.dot(qt, tl.trans(k_cur)) * scale, float("-inf"))
        s_p = tl.where(win_p, tl.dot(qt, tl.trans(k_prev)) * scale, float("-inf"))
        m = tl.maximum(tl.max(s_c, 1), tl.max(s_p, 1))
        m = tl.where(m > float("-inf"), m, 0.0)  # padded queries see no key
        p_cur = g * tl.exp(s_c - m[:, None])
        p_prev = g * tl.exp(s_p - m[:, None])
    if HAS_LINEAR:
        fq = tl.load(fq_ptr + i[:, None] * sft + f[None, :], mask=q_ok[:, None], other=0.0)
        fk_cur = tl.load(fk_ptr + i[:, None] * sft + f[None, :], mask=q_ok[:, None], other=0.0)
        fk_prev = tl.load(fk_ptr + jp[:, None] * sft + f[None, :], mask=p_ok[:, None], other=0.0)
        p_cur += tl.where(lin_c, tl.dot(fq.to(DT), tl.trans(fk_cur.to(DT))), 0.0)
        p_prev += tl.where(lin_p, tl.dot(fq.to(DT), tl.trans(fk_prev.to(DT))), 0.0)
    num = tl.dot(p_cur.to(DT), v_cur) + tl.dot(p_prev.to(DT), v_prev)
    den = tl.sum(p_cur, 1) + tl.sum(p_prev, 1)
    if HAS_LINEAR:
        S = tl.load(STATES + chunk * F * D + f[:, None] * D + d[None, :])  # key chunks <= n-2
        z = tl.load(ZS + chunk * F + f)
        num += tl.dot(fq.to(DT), S)
        den += tl.sum(fq.to(tl.float32) * z[None, :], 1)
    den = tl.where(q_ok, den, 1.0)
    tl.store(o_ptr + i[:, None] * sot + d[None, :], (num / den[:, None]).to(O.dtype.element_ty), mask=q_ok[:, None])
    tl.store(DEN + stat + i, den, mask=q_ok)
    tl.store(MAX + stat + i, m, mask=q_ok)


@triton.jit
def _bwd_query_kernel(
    Q, K, V, FQ, FK, STATES, ZS, GAMMA, DO, DEN, MAX, DELTA,
    DQ, DFQ, DMAX, ARGMAX, DGAMMA,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sfb, sfh, sft,
    T, scale,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
    C: tl.constexpr, WINDOW: tl.constexpr, TERRACE: tl.constexpr,
    HAS_LINEAR: tl.constexpr, HAS_GAMMA: tl.constexpr,
):
    """q and dq share strides, as do fq, fk and dfq; DGAMMA holds one partial per (b, h, chunk)."""
    n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    q_ptr = Q + b * sqb + h * sqh
    dq_ptr = DQ + b * sqb + h * sqh
    k_ptr = K + b * skb + hk * skh
    v_ptr = V + b * svb + hk * svh
    do_ptr = DO + b * sob + h * soh
    fq_ptr = FQ + b * sfb + h * sfh
    fk_ptr = FK + b * sfb + h * sfh
    dfq_ptr = DFQ + b * sfb + h * sfh
    stat = pid_bh.to(tl.int64) * T
    chunk = pid_bh.to(tl.int64) * tl.cdiv(T, C) + n
    DT = Q.dtype.element_ty

    r = tl.arange(0, C)
    d = tl.arange(0, D)
    f = tl.arange(0, F)
    g = tl.load(GAMMA + h).to(tl.float32) if HAS_GAMMA else 1.0
    i = n * C + r
    jp = i - C
    q_ok, p_ok = i < T, jp >= 0
    do = tl.load(do_ptr + i[:, None] * sot + d[None, :], mask=q_ok[:, None], other=0.0)
    rden = 1.0 / tl.load(DEN + stat + i, mask=q_ok, other=1.0)
    delta = tl.load(DELTA + stat + i, mask=q_ok, other=0.0)
    v_cur = tl.load(v_ptr + i[:, None] * svt + d[None, :], mask=q_ok[:, None], other=0.0)
    v_prev = tl.load(v_ptr + jp[:, None] * svt + d[None, :], mask=p_ok[:, None], other=0.0)
    # dL/dp_ij for every pair weight p_ij (window or linear) of the shared normaliser
    dov_c = tl.dot(do, tl.trans(v_cur))  # do_i . v_j
    dov_p = tl.dot(do, tl.trans(v_prev))
    dp_c = (dov_c - delta[:, None]) * rden[:, None]
    dp_p = (dov_p - delta[:, None]) * rden[:, None]
    win_c, lin_c = _pair_masks(i[:, None], i[None, :], q_ok[:, None] & q_ok[None, :], WINDOW, TERRACE)
    win_p, lin_p = _pair_masks(i[:, None], jp[None, :], q_ok[:, None] & p_ok[None, :], WINDOW, TERRACE)
    # For dgamma: do . (window numerator), do . (linear numerator) and the two normalisers.
    x_win = tl.zeros([C], dtype=tl.float32)
    x_lin = tl.zeros([C], dtype=tl.float32)
    den_win = tl.zeros([C], dtype=tl.float32)
    den_lin = tl.zeros([C], dtype=tl.float32)
    if WINDOW > 0:
        qt = tl.load(q_ptr + i[:, None] * sqt + d[None, :], mask=q_ok[:, None], other=0.0)
        k_cur = tl.load(k_ptr + i[:, None] * skt + d[None, :], mask=q_ok[:, None], other=0.0)
        k_prev = tl.load(k_ptr + jp[:, None] * skt + d[None, :], mask=p_ok[:, None], other=0.0)
        s_c = tl.where(win_c, tl.dot(qt, tl.trans(k_cur)) * scale, float("-inf"))
        s_p = tl.where(win_p, tl.dot(qt, tl.trans(k_prev)) * scale, float("-inf"))
        m = tl.load(MAX + stat + i, mask=q_ok, other=0.0)
        a_c = tl.where(win_c, g * tl.exp(s_c - m[:, None]), 0.0)
        a_p = tl.where(win_p, g * tl.exp(s_p - m[:, None]), 0.0)
        ds_c = a_c * dp_c
        ds_p = a_p * dp_p
        x_win = tl.sum(a_c * dov_c, 1) + tl.sum(a_p * dov_p, 1)
        den_win = tl.sum(a_c, 1) + tl.sum(a_p, 1)
        # the max's own gradient goes to its argmax key (to one of them on an exact tie)
        dm = -(tl.sum(ds_c, 1) + tl.sum(ds_p, 1))
        best_c, best_p = tl.max(s_c, 1), tl.max(s_p, 1)
        arg = tl.where(best_c >= best_p, n * C + tl.argmax(s_c, 1), (n - 1) * C + tl.argmax(s_p, 1))
        ds_c += tl.where(i[None, :] == arg[:, None], dm[:, None], 0.0)
        ds_p += tl.where(jp[None, :] == arg[:, None], dm[:, None], 0.0)
        dq = (tl.dot(ds_c.to(DT), k_cur) + tl.dot(ds_p.to(DT), k_prev)) * scale
        tl.store(dq_ptr + i[:, None] * sqt + d[None, :], dq.to(DQ.dtype.element_ty), mask=q_ok[:, None])
        tl.store(DMAX + stat + i, dm, mask=q_ok)
        tl.store(ARGMAX + stat + i, arg.to(tl.int32), mask=q_ok)
    if HAS_LINEAR:
        S = tl.load(STATES + chunk * F * D + f[:, None] * D + d[None, :])
        z = tl.load(ZS + chunk * F + f)
        fk_cur = tl.load(fk_ptr + i[:, None] * sft + f[None, :], mask=q_ok[:, None], other=0.0).to(DT)
        fk_prev = tl.load(fk_ptr + jp[:, None] * sft + f[None, :], mask=p_ok[:, None], other=0.0).to(DT)
        dl_c = tl.where(lin_c, dp_c, 0.0).to(DT)
        dl_p = tl.where(lin_p, dp_p, 0.0).to(DT)
        go = (do.to(tl.float32) * rden[:, None]).to(DT)  # do / den
        go_s = tl.dot(go, tl.trans(S))  # [C,F]
        dfq = tl.dot(dl_c, fk_cur) + tl.dot(dl_p, fk_prev) + go_s - (delta * rden)[:, None] * z[None, :]
        tl.store(dfq_ptr + i[:, None] * sft + f[None, :], dfq.to(DFQ.dtype.element_ty), mask=q_ok[:, None])
        if HAS_GAMMA:
            fq = tl.load(fq_ptr + i[:, None] * sft + f[None, :], mask=q_ok[:, None], other=0.0)
            l_c = tl.where(lin_c, tl.dot(fq.to(DT), tl.trans(fk_cur)), 0.0)
            l_p = tl.where(lin_p, tl.dot(fq.to(DT), tl.trans(fk_prev)), 0.0)
            fq32 = fq.to(tl.float32)
            x_lin = tl.sum(l_c * dov_c, 1) + tl.sum(l_p * dov_p, 1) + tl.sum(fq32 * go_s, 1) / rden
            den_lin = tl.sum(l_c, 1) + tl.sum(l_p, 1) + tl.sum(fq32 * z[None, :], 1)
    if HAS_GAMMA:
        # sum_W A_ij dp_ij without the rounded output: with delta = (x_win + x_lin) / den it is
        # (x_win den_lin - x_lin den_win) / den^2, free of the cancellation in x_win - delta den_win
        dg = (x_win * den_lin - x_lin * den_win) * rden * rden
        tl.store(DGAMMA + chunk, tl.sum(dg, 0) / g)


@triton.jit
def _bwd_key_kernel(
    Q, K, V, FQ, FK, DSTATES, DZS, GAMMA, DO, DEN, MAX, DELTA, DMAX, ARGMAX,
    DK, DV, DFK,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sfb, sfh, sft, sgb, sgh, sgt,
    T, scale,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
    C: tl.constexpr, WINDOW: tl.constexpr, TERRACE: tl.constexpr,
    HAS_LINEAR: tl.constexpr, HAS_GAMMA: tl.constexpr,
):
    """dk, dv per query head [B,H,T,D] (strides sg*; the caller sums each GQA group), dfk with fq's
    strides. Summing the group in registers instead ran slower on an H100: its accumulators spill."""
    mc, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    q_ptr = Q + b * sqb + h * sqh
    k_ptr = K + b * skb + hk * skh
    v_ptr = V + b * svb + hk * svh
    do_ptr = DO + b * sob + h * soh
    fq_ptr = FQ + b * sfb + h * sfh
    fk_ptr = FK + b * sfb + h * sfh
    dfk_ptr = DFK + b * sfb + h * sfh
    dk_ptr = DK + b * sgb + h * sgh
    dv_ptr = DV + b * sgb + h * sgh
    stat = pid_bh.to(tl.int64) * T
    chunk = pid_bh.to(tl.int64) * tl.cdiv(T, C) + mc
    DT = Q.dtype.element_ty

    r = tl.arange(0, C)
    d = tl.arange(0, D)
    f = tl.arange(0, F)
    g = tl.load(GAMMA + h).to(tl.float32) if HAS_GAMMA else 1.0
    j = mc * C + r  # this chunk's keys
    k_ok = j < T
    v_t = tl.load(v_ptr + j[:, None] * svt + d[None, :], mask=k_ok[:, None], other=0.0)
    if HAS_LINEAR:
        # every query chunk >= mc+2 sees these keys only through the state: dS, dz
        dS = tl.load(DSTATES + chunk * F * D + f[:, None] * D + d[None, :])
        dz = tl.load(DZS + chunk * F + f)
        fk_t = tl.load(fk_ptr + j[:, None] * sft + f[None, :], mask=k_ok[:, None], other=0.0).to(DT)
        dfk = tl.dot(v_t, tl.trans(dS)) - dz[None, :]
        dv = tl.dot(fk_t, dS)
    else:
        dfk = tl.zeros([C, F], dtype=tl.float32)
        dv = tl.zeros([C, D], dtype=tl.float32)
    dk = tl.zeros([C, D], dtype=tl.float32)
    if WINDOW > 0:
        k_t = tl.load(k_ptr + j[:, None] * skt + d[None, :], mask=k_ok[:, None], other=0.0)
    # the two query chunks whose local blocks hold these keys: chunk mc (i >= j) and chunk mc+1
    for near in tl.static_range(2):
        i = j + near * C
        q_ok = i < T
        do = tl.load(do_ptr + i[:, None] * sot + d[None, :], mask=q_ok[:, None], other=0.0)
        rden = 1.0 / tl.load(DEN + stat + i, mask=q_ok, other=1.0)
        delta = tl.load(DELTA + stat + i, mask=q_ok, other=0.0)
        go = (do.to(tl.float32) * rden[:, None]).to(DT)
        # key-major blocks [C keys, C queries]
        dpT = (tl.dot(v_t, tl.trans(do)) - delta[None, :]) * rden[None, :]
        winT, linT = _pair_masks(i[None, :], j[:, None], k_ok[:, None] & q_ok[None, :], WINDOW, TERRACE)
        if WINDOW > 0:
            qt = tl.load(q_ptr + i[:, None] * sqt + d[None, :], mask=q_ok[:, None], other=0.0)
            m = tl.load(MAX + stat + i, mask=q_ok, other=0.0)
            dm = tl.load(DMAX + stat + i, mask=q_ok, other=0.0)
            arg = tl.load(ARGMAX + stat + i, mask=q_ok, other=-1)
            sT = tl.dot(k_t, tl.trans(qt)) * scale
            aT = tl.where(winT, g * tl.exp(sT - m[None, :]), 0.0)
            dsT = aT * dpT + tl.where(j[:, None] == arg[None, :], dm[None, :], 0.0)
            dk += tl.dot(dsT.to(DT), qt) * scale
            dv += tl.dot(aT.to(DT), go)
        if HAS_LINEAR:
            fq = tl.load(fq_ptr + i[:, None] * sft + f[None, :], mask=q_ok[:, None], other=0.0).to(DT)
            lT = tl.where(linT, tl.dot(fk_t, tl.trans(fq)), 0.0)
            dv += tl.dot(lT.to(DT), go)
            dfk += tl.dot(tl.where(linT, dpT, 0.0).to(DT), fq)
    tl.store(dk_ptr + j[:, None] * sgt + d[None, :], dk.to(DK.dtype.element_ty), mask=k_ok[:, None])
    tl.store(dv_ptr + j[:, None] * sgt + d[None, :], dv.to(DV.dtype.element_ty), mask=k_ok[:, None])
    if HAS_LINEAR:
        tl.store(dfk_ptr + j[:, None] * sft + f[None, :], dfk.to(DFK.dtype.element_ty), mask=k_ok[:, None])


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    if device.type == "cuda" and dtype == torch.float32:
        # fp32 tiles hit illegal memory accesses in the earlier, sequential form of these kernels on an
        # H100 (triton 3.6); fp32 has not been run on a GPU since, so it stays on PyTorch there
        raise ValueError("the triton backend takes bf16 or fp16 on CUDA, not fp32: cast the model or "
                         "use attention.backend: torch")


# Four warps: one warpgroup, so Hopper's wgmma takes the 64-row tiles whole (eight warps split
# them and ran 1.6-2x slower on an H100, triton 3.6).
CHUNK_WARPS = 4


def _meta(q, fq, window_size: int, terrace: bool, chunk: int) -> dict:
    return dict(H=q.shape[1], D=q.shape[-1], F=fq.shape[-1] if fq is not None else 16, C=chunk,
                WINDOW=window_size, TERRACE=terrace, HAS_LINEAR=fq is not None, num_warps=CHUNK_WARPS, num_stages=1)


def hybrid_attention_chunk_fwd(q, k, v, fq, fk, gamma, window_size: int, terrace: bool, scale: float, chunk: int):
    """-> o [B,H,T,D] in q's dtype; per query the fp32 normaliser and window max [B,H,T]; and the
    per-chunk linear states S, z of `chunk_states_fwd` (None without a linear branch)."""
    B, H, T, D = q.shape
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    den = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    max_ = torch.empty_like(den)
    states, zs = chunk_states_fwd(fk, v, q.dtype, chunk) if fq is not None else (None, None)
    feats = (fq, fk) if fq is not None else (q, q)
    _fwd_kernel[(triton.cdiv(T, chunk), B * H)](
        q, k, v, *feats, states if states is not None else den, zs if zs is not None else den,
        gamma if gamma is not None else den, o, den, max_,
        *bht_strides(q), *bht_strides(k), *bht_strides(v), *bht_strides(o), *bht_strides(feats[0]),
        T, scale, GROUP=H // k.shape[1], HAS_GAMMA=gamma is not None, **_meta(q, fq, window_size, terrace, chunk))
    return o, den, max_, states, zs


def hybrid_attention_chunk_bwd(q, k, v, fq, fk, gamma, o, den, max_, states, zs, do, window_size: int,
                               terrace: bool, scale: float, chunk: int):
    """-> dq, dk, dv, dfq, dfk, dgamma (None where an input does not reach the output)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    N = triton.cdiv(T, chunk)
    do = do.contiguous()  # o's layout: the two share strides in the kernels
    meta = _meta(q, fq, window_size, terrace, chunk)
    feats = (fq, fk) if fq is not None else (q, q)
    dq = torch.empty_strided(q.shape, q.stride(), dtype=q.dtype, device=q.device) if window_size else None
    dfq = torch.empty_like(fq) if fq is not None else None
    dfk = torch.empty_like(fk) if fk is not None else None
    dmax = torch.empty_like(den)
    argmax = torch.empty(B, H, T, device=q.device, dtype=torch.int32)
    dgamma = torch.empty(B, H, N, device=q.device, dtype=torch.float32)  # a partial per chunk
    gamma_arg = gamma if gamma is not None else den
    delta = chunk_delta(o, do, chunk)
    dstates, dzs = chunk_states_bwd(fq, do, den, delta, chunk) if fq is not None else (den, den)
    _bwd_query_kernel[(N, B * H)](
        q, k, v, *feats, states if states is not None else den, zs if zs is not None else den, gamma_arg,
        do, den, max_, delta, dq if dq is not None else q, dfq if dfq is not None else q, dmax, argmax, dgamma,
        *bht_strides(q), *bht_strides(k), *bht_strides(v), *bht_strides(do), *bht_strides(feats[0]),
        T, scale, GROUP=H // Hkv, HAS_GAMMA=gamma is not None, **meta)
    # dk, dv per query head, then summed over each group of heads sharing a key/value head
    dk_heads = torch.empty(B, H, T, D, device=q.device, dtype=q.dtype)
    dv_heads = torch.empty_like(dk_heads)
    _bwd_key_kernel[(N, B * H)](
        q, k, v, *feats, dstates, dzs, gamma_arg, do, den, max_, delta, dmax, argmax,
        dk_heads, dv_heads, dfk if dfk is not None else q,
        *bht_strides(q), *bht_strides(k), *bht_strides(v), *bht_strides(do), *bht_strides(feats[0]),
        *bht_strides(dk_heads), T, scale, GROUP=H // Hkv, HAS_GAMMA=gamma is not None, **meta)
    dk = dk_heads.view(B, Hkv, H // Hkv, T, D).sum(2, dtype=torch.float32).to(k.dtype) if window_size else None
    dv = dv_heads.view(B, Hkv, H // Hkv, T, D).sum(2, dtype=torch.float32).to(v.dtype)
    dgamma = dgamma.sum((0, 2)).to(gamma.dtype) if gamma is not None else None
    return dq, dk, dv, dfq, dfk, dgamma


class HybridAttentionChunkFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, fq, fk, gamma, window_size: int, terrace: bool, scale: float, chunk: int):
        o, den, max_, states, zs = hybrid_attention_chunk_fwd(q, k, v, fq, fk, gamma, window_size, terrace,
                                                              scale, chunk)
        ctx.save_for_backward(q, k, v, fq, fk, gamma, o, den, max_, states, zs)
        ctx.args = (window_size, terrace, scale, chunk)
        return o

    @staticmethod
    def backward(ctx, do):
        grads = hybrid_attention_chunk_bwd(*ctx.saved_tensors, do, *ctx.args)
        return (*grads, None, None, None, None)


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

    D and F must be powers of two >= 16 (D up to 128); window kinds as in `chunk_size`.
    """
    check_inputs(q, k, v, fq, fk, gamma, window_size)
    D = q.shape[-1]
    F = fq.shape[-1] if fq is not None else 16
    for name, dim, top in (("head dim", D, 128), ("feature dim", F, 256)):
        if dim < 16 or dim > top or dim & (dim - 1):
            raise ValueError(f"the triton backend needs the {name} to be a power of two in [16, {top}]; got {dim}: "
                             "use attention.backend: torch")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    check_dtype(q.device, q.dtype)
    chunk = chunk_size(window_size, window)
    scale = D**-0.5 if scale is None else scale
    if fq is not None:
        fq, fk = fq.contiguous(), fk.contiguous()
    return HybridAttentionChunkFunction.apply(q, k, v, fq, fk, gamma, window_size, window == "terrace",
                                              scale, chunk)
