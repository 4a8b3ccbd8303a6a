"""The backward of the chunked hybrid attention (`chunk.py`): one step's gradient kernels.

The launches, each one program per (chunk, head) in parallel unless said otherwise:
  _bwd_query_kernel SIDE 1   window side of query chunk n: delta = do . o, dq, the window-max
                             gradient, dgamma's window sums, and this head's shares of dk for the
                             keys of chunks n and n-1 (ds^T q: the window scores' gradient ds is
                             already in registers here);
  (chunk_state.py)           the gradient states dS = sum fq^T do/den, dz = sum fq delta/den of
                             every DSTATE_EVERY-th key chunk (a scan; delta from its own pass
                             when there is no window side);
  _bwd_query_kernel SIDE 2   linear side: dfq (local blocks, the forward's S, z, and the chunks
                             between a stored state and n-1) and dgamma's partial;
  _bwd_value_kernel          one query head's share of dv of one key chunk;
  (group_sum.py)             in the two launches above, the last program to write a share of a key
                             chunk sums the GQA group's shares into dk, dv;
  _bwd_key_feature_kernel    dfk of one key chunk of one query head (dS, dz, local blocks, and the
                             query chunks between chunk m+1 and the stored dS).
Every program holds one [C,D] or [C,F] accumulator: with more in one program the kernels spilled
registers and ran slower on an H100 (all of a side together: 1.15-1.2x; dk with dv at head dim
128: 1.25x). Local blocks without linear pairs (`chunk_blocks.linear_from`: none at all for the
default terrace window of 64) skip their feature dots. Measured there (Llama-3-8B layer, T 1K):
delta on the window side instead of in a pass of its own, which re-read do, saved 0.07 ms; dk
from the window side's ds (two dots and two [C,D] share writes there, eight shares per key in the
GQA sum) instead of a key-side launch that recomputed the scores and their gradient for every
key chunk: 0.87 + 0.21 ms against 0.69 + 0.63 + 0.11 (fp32 atomics into one dk per kv head instead
of the shares: as fast at T 1K, slower at 32K).
The max m_i stabilises the window part only and the linear part is not scaled by it, so the output
depends on m_i: its gradient dm_i = -sum_j A_ij dp_ij flows to the argmax key, as through the
reference's amax (ties, which random data never produce, go to one key instead of being split).
"""
import torch
import triton
import triton.language as tl

from ..strides import bht_strides
from .chunk_blocks import chunk_grid, chunk_program, kernel_meta, pair_masks
from .chunk_state import chunk_delta, chunk_states_bwd
from .group_sum import sum_group_shares

# Register cap of the dfk launch: at 168 three programs fit an SM instead of two. H100, triton 3.6:
# 0.32 -> 0.30 ms (Llama-3-8B layer, T 1K), 0.081 -> 0.076 (SmolLM2); the same cap slowed the dv
# launch (0.63 -> 0.65) and the query sides (1.4x and more, spilling), so they run uncapped.
KEY_FEATURE_MAXNREG = 168


@triton.jit
def _bwd_query_kernel(
    Q, K, V, FQ, FK, STATES, ZS, GAMMA, DO, O, DEN, MAX, DELTA,
    DQ, DK_SHARES, DK, COUNTS, DFQ, DGAMMA, WIN_SUMS,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sfb, sfh, sft, sgb, sgh, sgt,
    T, scale,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
    C: tl.constexpr, WINDOW: tl.constexpr, TERRACE: tl.constexpr,
    HAS_LINEAR: tl.constexpr, HAS_GAMMA: tl.constexpr, EVERY: tl.constexpr, SIDE: tl.constexpr,
    LIN_FROM: tl.constexpr,
):
    """q and dq share strides, as do fq, fk and dfq, and o and do; DGAMMA holds one partial per (b,
    h, chunk). SIDE 1: the window side (delta, written for the launches after it, dq, and dk shares
    into DK_SHARES [B,2H,T,D], strides sg*, summed into DK [B,Hkv,T,D] by the program that completes
    a key chunk's count in COUNTS [B*Hkv*N]); SIDE 2, launched after it (or alone without a window):
    the linear side (dfq, dgamma). The window side hands dgamma's window sums to the linear side
    through WIN_SUMS [2,B,H,T]."""
    n, pid_bh, b, h = chunk_program(H, GROUP)
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
    n_stat = (tl.num_programs(1) * GROUP).to(tl.int64) * T  # offset of WIN_SUMS' second half: B*H*T
    N = tl.cdiv(T, C)
    chunk = pid_bh.to(tl.int64) * N + n
    stored = n // EVERY
    state = pid_bh.to(tl.int64) * tl.cdiv(N, EVERY) + stored
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
    if SIDE == 1:  # delta_i = do_i . o_i, for the launches after this one
        o = tl.load(O + b * sob + h * soh + i[:, None] * sot + d[None, :], mask=q_ok[:, None], other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + stat + i, delta, mask=q_ok)
    else:
        delta = tl.load(DELTA + stat + i, mask=q_ok, other=0.0)
    v_cur = tl.load(v_ptr + i[:, None] * svt + d[None, :], mask=q_ok[:, None], other=0.0)
    v_prev = tl.load(v_ptr + jp[:, None] * svt + d[None, :], mask=p_ok[:, None], other=0.0)
    # dL/dp_ij for every pair weight p_ij (window or linear) of the shared normaliser
    dov_c = tl.dot(do, tl.trans(v_cur))  # do_i . v_j
    dov_p = tl.dot(do, tl.trans(v_prev))
    dp_c = (dov_c - delta[:, None]) * rden[:, None]
    dp_p = (dov_p - delta[:, None]) * rden[:, None]
    win_c, lin_c = pair_masks(i[:, None], i[None, :], q_ok[:, None] & q_ok[None, :], WINDOW, TERRACE)
    win_p, lin_p = pair_masks(i[:, None], jp[None, :], q_ok[:, None] & p_ok[None, :], WINDOW, TERRACE)
    # For dgamma: do . (window numerator), do . (linear numerator) and the two normalisers.
    x_win = tl.zeros([C], dtype=tl.float32)
    den_win = tl.zeros([C], dtype=tl.float32)
    if WINDOW > 0 and SIDE == 1:
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
        ds_c, ds_p = ds_c.to(DT), ds_p.to(DT)
        dq = (tl.dot(ds_c, k_cur) + tl.dot(ds_p, k_prev)) * scale
        tl.store(dq_ptr + i[:, None] * sqt + d[None, :], dq.to(DQ.dtype.element_ty), mask=q_ok[:, None])
        # this head's dk shares: share 0 of key chunk n (its own query chunk), share 1 of key chunk n-1
        # (the next query chunk); the group's heads give key chunk n 2*GROUP shares, the last one GROUP
        DKT = DK_SHARES.dtype.element_ty
        dk_ptr = DK_SHARES + b * sgb + 2 * h * sgh
        tl.store(dk_ptr + i[:, None] * sgt + d[None, :], (tl.dot(tl.trans(ds_c), qt) * scale).to(DKT),
                 mask=q_ok[:, None])
        tl.store(dk_ptr + sgh + jp[:, None] * sgt + d[None, :], (tl.dot(tl.trans(ds_p), qt) * scale).to(DKT),
                 mask=p_ok[:, None])
        bkv = b * (H // GROUP) + hk
        group_shares = DK_SHARES + b * sgb + 2 * hk * GROUP * sgh
        sum_group_shares(COUNTS + bkv * N + n, tl.where(n == N - 1, GROUP, 2 * GROUP), group_shares,
                         DK + bkv * T * D, i, q_ok, sgh, sgt, C, D, 2 * GROUP)
        if n > 0:
            sum_group_shares(COUNTS + bkv * N + n - 1, 2 * GROUP, group_shares, DK + bkv * T * D, jp, p_ok, sgh, sgt,
                             C, D, 2 * GROUP)
        if HAS_LINEAR and HAS_GAMMA:
            tl.store(WIN_SUMS + stat + i, x_win, mask=q_ok)
            tl.store(WIN_SUMS + n_stat + stat + i, den_win, mask=q_ok)
    if HAS_LINEAR and SIDE == 2:
        S = tl.load(STATES + state * F * D + f[:, None] * D + d[None, :])
        z = tl.load(ZS + state * F + f)
        go = (do.to(tl.float32) * rden[:, None]).to(DT)  # do / den
        go_s = tl.dot(go, tl.trans(S))  # [C,F]
        dfq = go_s - (delta * rden)[:, None] * z[None, :]
        if LIN_FROM == 0:
            fk_cur = tl.load(fk_ptr + i[:, None] * sft + f[None, :], mask=q_ok[:, None], other=0.0).to(DT)
            dfq += tl.dot(tl.where(lin_c, dp_c, 0.0).to(DT), fk_cur)
        if LIN_FROM <= 1:
            fk_prev = tl.load(fk_ptr + jp[:, None] * sft + f[None, :], mask=p_ok[:, None], other=0.0).to(DT)
            dfq += tl.dot(tl.where(lin_p, dp_p, 0.0).to(DT), fk_prev)
        if EVERY > 1:  # key chunks between the stored state and chunk n-1, as in the forward
            for gap in range(tl.maximum(stored * EVERY - 1, 0), n - 1):
                jg = gap * C + r
                dov_g = tl.dot(do, tl.trans(tl.load(v_ptr + jg[:, None] * svt + d[None, :])))
                fk_g = tl.load(fk_ptr + jg[:, None] * sft + f[None, :]).to(DT)
                dfq += tl.dot(((dov_g - delta[:, None]) * rden[:, None]).to(DT), fk_g)
        tl.store(dfq_ptr + i[:, None] * sft + f[None, :], dfq.to(DFQ.dtype.element_ty), mask=q_ok[:, None])
        if HAS_GAMMA:
            if WINDOW > 0:
                x_win = tl.load(WIN_SUMS + stat + i, mask=q_ok, other=0.0)
                den_win = tl.load(WIN_SUMS + n_stat + stat + i, mask=q_ok, other=0.0)
            fq = tl.load(fq_ptr + i[:, None] * sft + f[None, :], mask=q_ok[:, None], other=0.0).to(DT)
            fq32 = fq.to(tl.float32)
            x_lin = tl.sum(fq32 * go_s, 1) / rden
            den_lin = tl.sum(fq32 * z[None, :], 1)
            if LIN_FROM == 0:
                l_c = tl.where(lin_c, tl.dot(fq, tl.trans(fk_cur)), 0.0)
                x_lin += tl.sum(l_c * dov_c, 1)
                den_lin += tl.sum(l_c, 1)
            if LIN_FROM <= 1:
                l_p = tl.where(lin_p, tl.dot(fq, tl.trans(fk_prev)), 0.0)
                x_lin += tl.sum(l_p * dov_p, 1)
                den_lin += tl.sum(l_p, 1)
            if EVERY > 1:
                for gap in range(tl.maximum(stored * EVERY - 1, 0), n - 1):
                    jg = gap * C + r
                    l_g = tl.dot(fq, tl.trans(tl.load(fk_ptr + jg[:, None] * sft + f[None, :]).to(DT)))
                    x_lin += tl.sum(l_g * tl.dot(do, tl.trans(tl.load(v_ptr + jg[:, None] * svt + d[None, :]))), 1)
                    den_lin += tl.sum(l_g, 1)
            # sum_W A_ij dp_ij without the rounded output: with delta = (x_win + x_lin) / den it is
            # (x_win den_lin - x_lin den_win) / den^2, free of the cancellation in x_win - delta den_win
            dg = (x_win * den_lin - x_lin * den_win) * rden * rden
            tl.store(DGAMMA + chunk, tl.sum(dg, 0) / g)


@triton.jit
def _bwd_value_kernel(
    Q, K, FQ, FK, DSTATES, GAMMA, DO, DEN, MAX, DV_SHARES, DV, COUNTS,
    sqb, sqh, sqt, skb, skh, skt, sob, soh, sot, sfb, sfh, sft, sgb, sgh, sgt,
    T, scale,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
    C: tl.constexpr, WINDOW: tl.constexpr, TERRACE: tl.constexpr,
    HAS_LINEAR: tl.constexpr, HAS_GAMMA: tl.constexpr, EVERY: tl.constexpr, LIN_FROM: tl.constexpr,
):
    """Program (key chunk, (b, h)): this query head's share of dv, into DV_SHARES [B,H,T,D] (strides
    sg*); with GQA the program that completes the key chunk's count in COUNTS sums the group's shares
    into DV [B,Hkv,T,D] (without, the shares are dv). Walking the group's heads here instead, into
    one accumulator, ran 2x slower on an H100."""
    mc, pid_bh, b, h = chunk_program(H, GROUP)
    q_ptr = Q + b * sqb + h * sqh
    k_ptr = K + b * skb + (h // GROUP) * skh
    do_ptr = DO + b * sob + h * soh
    fq_ptr = FQ + b * sfb + h * sfh
    stat = pid_bh.to(tl.int64) * T
    N = tl.cdiv(T, C)
    NS = tl.cdiv(N, EVERY)
    stored = tl.cdiv(mc, EVERY)  # dS of key chunk stored*EVERY: query chunks >= stored*EVERY+2
    state = pid_bh.to(tl.int64) * NS + stored
    has_state = stored < NS  # past the last chunk, stored*EVERY names no chunk: its dS is zero
    DT = Q.dtype.element_ty

    r = tl.arange(0, C)
    d = tl.arange(0, D)
    f = tl.arange(0, F)
    g = tl.load(GAMMA + h).to(tl.float32) if HAS_GAMMA else 1.0
    j = mc * C + r  # this chunk's keys
    k_ok = j < T
    dv = tl.zeros([C, D], dtype=tl.float32)
    if HAS_LINEAR:
        fk_t = tl.load(FK + b * sfb + h * sfh + j[:, None] * sft + f[None, :], mask=k_ok[:, None],
                       other=0.0).to(DT)
        # every query chunk >= mc+2 sees these keys only through the state ...
        dS = tl.load(DSTATES + state * F * D + f[:, None] * D + d[None, :], mask=has_state, other=0.0)
        dv += tl.dot(fk_t, dS)
        # ... or, up to the stored dS, through all-linear blocks
        for gap in range(mc + 2, tl.minimum(stored * EVERY + 2, N)):
            ig = gap * C + r
            g_ok = ig < T
            do = tl.load(do_ptr + ig[:, None] * sot + d[None, :], mask=g_ok[:, None], other=0.0)
            rden = 1.0 / tl.load(DEN + stat + ig, mask=g_ok, other=1.0)
            fq = tl.load(fq_ptr + ig[:, None] * sft + f[None, :], mask=g_ok[:, None], other=0.0).to(DT)
            dv += tl.dot(tl.dot(fk_t, tl.trans(fq)).to(DT), (do.to(tl.float32) * rden[:, None]).to(DT))
    if WINDOW > 0:
        k_t = tl.load(k_ptr + j[:, None] * skt + d[None, :], mask=k_ok[:, None], other=0.0)
    # the two query chunks whose local blocks hold these keys: chunk mc (i >= j) and chunk mc+1
    for near in tl.static_range(2):
        i = j + near * C
        q_ok = i < T
        do = tl.load(do_ptr + i[:, None] * sot + d[None, :], mask=q_ok[:, None], other=0.0)
        rden = 1.0 / tl.load(DEN + stat + i, mask=q_ok, other=1.0)
        winT, linT = pair_masks(i[None, :], j[:, None], k_ok[:, None] & q_ok[None, :], WINDOW, TERRACE)
        # key-major blocks [C keys, C queries]
        if WINDOW > 0:
            qt = tl.load(q_ptr + i[:, None] * sqt + d[None, :], mask=q_ok[:, None], other=0.0)
            m = tl.load(MAX + stat + i, mask=q_ok, other=0.0)
            aT = tl.where(winT, g * tl.exp(tl.dot(k_t, tl.trans(qt)) * scale - m[None, :]), 0.0)
        else:
            aT = tl.zeros([C, C], dtype=tl.float32)
        if near >= LIN_FROM:
            fq = tl.load(fq_ptr + i[:, None] * sft + f[None, :], mask=q_ok[:, None], other=0.0).to(DT)
            aT += tl.where(linT, tl.dot(fk_t, tl.trans(fq)), 0.0)  # window and linear pairs are disjoint
        dv += tl.dot(aT.to(DT), (do.to(tl.float32) * rden[:, None]).to(DT))
    tl.store(DV_SHARES + b * sgb + h * sgh + j[:, None] * sgt + d[None, :], dv.to(DV_SHARES.dtype.element_ty),
             mask=k_ok[:, None])
    if GROUP > 1:
        bkv = b * (H // GROUP) + h // GROUP
        sum_group_shares(COUNTS + bkv * N + mc, GROUP, DV_SHARES + b * sgb + (h // GROUP) * GROUP * sgh,
                         DV + bkv * T * D, j, k_ok, sgh, sgt, C, D, GROUP)


@triton.jit
def _bwd_key_feature_kernel(
    FQ, V, DSTATES, DZS, DO, DEN, DELTA, DFK,
    svb, svh, svt, sob, soh, sot, sfb, sfh, sft,
    T,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
    C: tl.constexpr, WINDOW: tl.constexpr, TERRACE: tl.constexpr, EVERY: tl.constexpr, LIN_FROM: tl.constexpr,
):
    """Program (key chunk, (b, h)): dfk [B,H,T,F] with fq's strides."""
    mc, pid_bh, b, h = chunk_program(H, GROUP)
    v_ptr = V + b * svb + (h // GROUP) * svh
    do_ptr = DO + b * sob + h * soh
    fq_ptr = FQ + b * sfb + h * sfh
    stat = pid_bh.to(tl.int64) * T
    N = tl.cdiv(T, C)
    NS = tl.cdiv(N, EVERY)
    stored = tl.cdiv(mc, EVERY)  # as in _bwd_value_kernel
    state = pid_bh.to(tl.int64) * NS + stored
    has_state = stored < NS
    DT = V.dtype.element_ty

    r = tl.arange(0, C)
    d = tl.arange(0, D)
    f = tl.arange(0, F)
    j = mc * C + r
    k_ok = j < T
    v_t = tl.load(v_ptr + j[:, None] * svt + d[None, :], mask=k_ok[:, None], other=0.0)
    dS = tl.load(DSTATES + state * F * D + f[:, None] * D + d[None, :], mask=has_state, other=0.0)
    dfk = tl.dot(v_t, tl.trans(dS)) - tl.load(DZS + state * F + f, mask=has_state, other=0.0)[None, :]
    # the local blocks that hold linear pairs, then the query chunks up to the stored dS
    for near in range(LIN_FROM, tl.minimum(stored * EVERY + 2, N) - mc):
        i = j + near * C
        q_ok = i < T
        do = tl.load(do_ptr + i[:, None] * sot + d[None, :], mask=q_ok[:, None], other=0.0)
        rden = 1.0 / tl.load(DEN + stat + i, mask=q_ok, other=1.0)
        delta = tl.load(DELTA + stat + i, mask=q_ok, other=0.0)
        fq = tl.load(fq_ptr + i[:, None] * sft + f[None, :], mask=q_ok[:, None], other=0.0).to(DT)
        dpT = (tl.dot(v_t, tl.trans(do)) - delta[None, :]) * rden[None, :]
        _, linT = pair_masks(i[None, :], j[:, None], k_ok[:, None] & q_ok[None, :], WINDOW, TERRACE)
        dfk += tl.dot(tl.where(linT, dpT, 0.0).to(DT), fq)
    tl.store(DFK + b * sfb + h * sfh + j[:, None] * sft + f[None, :], dfk.to(DFK.dtype.element_ty),
             mask=k_ok[:, None])


def hybrid_attention_chunk_bwd(q, k, v, fq, fk, gamma, o, den, max_, states, zs, do, window_size: int,
                               terrace: bool, scale: float, chunk: int, every: int, dstate_every: int):
    """-> dq, dk, dv, dfq, dfk, dgamma (None where an input does not reach the output). `every`: the
    forward's state spacing; `dstate_every`: the spacing of the gradient states stored here."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    N = triton.cdiv(T, chunk)
    do = do.contiguous()  # o's layout: the two share strides in the kernels
    meta = kernel_meta(q, k, fq, gamma, window_size, terrace, chunk)
    has_window, has_linear = window_size > 0, fq is not None
    feats = (fq, fk) if has_linear else (q, q)
    dq = torch.empty_strided(q.shape, q.stride(), dtype=q.dtype, device=q.device) if has_window else None
    dfq = torch.empty_like(fq) if has_linear else None
    dgamma = torch.empty(B, H, N, device=q.device, dtype=torch.float32)  # a partial per chunk
    gamma_arg = gamma if gamma is not None else den
    sums_passed = has_window and has_linear and gamma is not None
    win_sums = torch.empty(2, B, H, T, device=q.device, dtype=torch.float32) if sums_passed else den
    # dk shares [B, H, 2, T, D] as [B, 2H, T, D]: a GQA group's eight (or 2*GROUP) lie side by side
    dk_shares = torch.empty(B, 2 * H, T, D, device=q.device, dtype=q.dtype) if has_window else q
    dk = torch.empty(B, Hkv, T, D, device=q.device, dtype=k.dtype) if has_window else None
    counts = torch.zeros(2, B * Hkv * N, device=q.device, dtype=torch.int32)  # arrivals per key chunk: dk, dv
    grid = chunk_grid(N, B, H, Hkv)

    def query_side(side: int, delta: torch.Tensor) -> None:
        _bwd_query_kernel[grid](
            q, k, v, *feats, states if has_linear else den, zs if has_linear else den, gamma_arg,
            do, o, den, max_, delta, dq if has_window else q, dk_shares, dk if has_window else q, counts[0],
            dfq if has_linear else q, dgamma, win_sums, *bht_strides(q), *bht_strides(k), *bht_strides(v),
            *bht_strides(do), *bht_strides(feats[0]), *bht_strides(dk_shares), T, scale, SIDE=side, EVERY=every,
            **meta)

    if has_window:  # the window side computes delta for the launches after it
        delta = torch.empty_like(den)
        query_side(1, delta)
    else:
        delta = chunk_delta(o, do, chunk)
    dstates, dzs = den, den
    if has_linear:
        dstates, dzs = chunk_states_bwd(fq, do, den, delta, chunk, dstate_every)
        query_side(2, delta)
    dv_shares = torch.empty(B, H, T, D, device=q.device, dtype=q.dtype)
    dv = torch.empty(B, Hkv, T, D, device=q.device, dtype=v.dtype) if H > Hkv else dv_shares
    _bwd_value_kernel[grid](
        q, k, *feats, dstates, gamma_arg, do, den, max_, dv_shares, dv, counts[1],
        *bht_strides(q), *bht_strides(k), *bht_strides(do), *bht_strides(feats[0]), *bht_strides(dv_shares),
        T, scale, EVERY=dstate_every, **meta)
    dfk = None
    if has_linear:
        dfk = torch.empty_like(fk)
        _bwd_key_feature_kernel[grid](
            fq, v, dstates, dzs, do, den, delta, dfk, *bht_strides(v), *bht_strides(do), *bht_strides(fq), T,
            EVERY=dstate_every, **{k_: meta[k_] for k_ in ("H", "GROUP", "D", "F", "C", "WINDOW", "TERRACE",
                                                            "LIN_FROM", "num_warps", "num_stages")},
            maxnreg=KEY_FEATURE_MAXNREG)
    if gamma is None:
        dgamma = None
    elif has_linear:
        dgamma = dgamma.sum((0, 2)).to(gamma.dtype)
    else:  # window only: gamma scales every weight and cancels in the shared normaliser
        dgamma = torch.zeros_like(gamma)
    return dq, dk, dv, dfq, dfk, dgamma
