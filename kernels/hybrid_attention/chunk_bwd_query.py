"""The query side of the chunked hybrid attention's backward (`chunk_bwd.py`, which says what each
launch computes and why the kernels are cut as they are): one kernel, run as the window side
(SIDE 1) and as the linear side (SIDE 2).
"""
import triton
import triton.language as tl

from .chunk_blocks import chunk_program, dot_rest, lead_tile, own_d_tile, pair_masks, rowdot_rest
from .group_sum import sum_group_shares


@triton.jit
def _bwd_query_kernel(
    Q, K, V, FQ, FK, STATES, ZS, GAMMA, DO, O, DEN, MAX, DELTA,
    DQ, DK_SHARES, DK, COUNTS, DFQ, DGAMMA, WIN_SUMS,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sfb, sfh, sft, sgb, sgh, sgt,
    T, scale,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
    C: tl.constexpr, WINDOW: tl.constexpr, KIND: tl.constexpr,
    HAS_LINEAR: tl.constexpr, HAS_GAMMA: tl.constexpr, EVERY: tl.constexpr, SIDE: tl.constexpr,
    LIN_FROM: tl.constexpr, BD: tl.constexpr, ND: tl.constexpr,
):
    """q and dq share strides, as do fq, fk and dfq, and o and do; DGAMMA holds one partial per (b,
    h, chunk). SIDE 1: the window side (delta, written for the launches after it, dq, and dk shares
    into DK_SHARES [B,2H,T,D], strides sg*, summed into DK [B,Hkv,T,D] by the program that completes
    a key chunk's count in COUNTS [ND,B*Hkv*N]); SIDE 2, launched after it (or alone without a window):
    the linear side (dfq, dgamma). The window side hands dgamma's window sums to the linear side
    through WIN_SUMS [2,B,H,T]. With D in ND tiles the window side runs one program per D tile t
    (columns d of dq and the dk shares), each computing the [C, C] blocks over all of D, and tile 0's
    stores delta and WIN_SUMS; the linear side, whose outputs have F columns, one program per chunk
    and head that walks the D tiles."""
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
    t, d = own_d_tile(BD, ND)  # the window side's columns of dq and the dk shares
    d0 = tl.arange(0, BD)  # D tile 0 (all of D when ND == 1), where each contraction over D starts
    f = tl.arange(0, F)
    g = tl.load(GAMMA + h).to(tl.float32) if HAS_GAMMA else 1.0
    i = n * C + r
    jp = i - C
    q_ok, p_ok = i < T, jp >= 0
    do = tl.load(do_ptr + i[:, None] * sot + d0[None, :], mask=q_ok[:, None], other=0.0)
    rden = 1.0 / tl.load(DEN + stat + i, mask=q_ok, other=1.0)
    if SIDE == 1:  # delta_i = do_i . o_i, for the launches after this one
        o_ptr = O + b * sob + h * soh
        o = tl.load(o_ptr + i[:, None] * sot + d0[None, :], mask=q_ok[:, None], other=0.0)
        delta = rowdot_rest(tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), o_ptr, do_ptr, i, q_ok, sot, BD, ND)
        tl.store(DELTA + stat + i, delta, mask=lead_tile(q_ok, t, ND))
    else:
        delta = tl.load(DELTA + stat + i, mask=q_ok, other=0.0)
    v_cur = tl.load(v_ptr + i[:, None] * svt + d0[None, :], mask=q_ok[:, None], other=0.0)
    v_prev = tl.load(v_ptr + jp[:, None] * svt + d0[None, :], mask=p_ok[:, None], other=0.0)
    # dL/dp_ij for every pair weight p_ij (window or linear) of the shared normaliser
    dov_c = dot_rest(tl.dot(do, tl.trans(v_cur)), do_ptr, i, q_ok, sot, v_ptr, i, q_ok, svt, BD, ND)  # do_i . v_j
    dov_p = dot_rest(tl.dot(do, tl.trans(v_prev)), do_ptr, i, q_ok, sot, v_ptr, jp, p_ok, svt, BD, ND)
    dp_c = (dov_c - delta[:, None]) * rden[:, None]
    dp_p = (dov_p - delta[:, None]) * rden[:, None]
    win_c, lin_c = pair_masks(i[:, None], i[None, :], q_ok[:, None] & q_ok[None, :], WINDOW, KIND)
    win_p, lin_p = pair_masks(i[:, None], jp[None, :], q_ok[:, None] & p_ok[None, :], WINDOW, KIND)
    # For dgamma: do . (window numerator), do . (linear numerator) and the two normalisers.
    x_win = tl.zeros([C], dtype=tl.float32)
    den_win = tl.zeros([C], dtype=tl.float32)
    if WINDOW > 0 and SIDE == 1:
        qt = tl.load(q_ptr + i[:, None] * sqt + d0[None, :], mask=q_ok[:, None], other=0.0)
        k_cur = tl.load(k_ptr + i[:, None] * skt + d0[None, :], mask=q_ok[:, None], other=0.0)
        k_prev = tl.load(k_ptr + jp[:, None] * skt + d0[None, :], mask=p_ok[:, None], other=0.0)
        qk_c = dot_rest(tl.dot(qt, tl.trans(k_cur)), q_ptr, i, q_ok, sqt, k_ptr, i, q_ok, skt, BD, ND)
        s_c = tl.where(win_c, qk_c * scale, float("-inf"))
        qk_p = dot_rest(tl.dot(qt, tl.trans(k_prev)), q_ptr, i, q_ok, sqt, k_ptr, jp, p_ok, skt, BD, ND)
        s_p = tl.where(win_p, qk_p * scale, float("-inf"))
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
        if ND > 1:  # this program's D tile of q and k (with one tile, those above)
            qt = tl.load(q_ptr + i[:, None] * sqt + d[None, :], mask=q_ok[:, None], other=0.0)
            k_cur = tl.load(k_ptr + i[:, None] * skt + d[None, :], mask=q_ok[:, None], other=0.0)
            k_prev = tl.load(k_ptr + jp[:, None] * skt + d[None, :], mask=p_ok[:, None], other=0.0)
        dq = (tl.dot(ds_c, k_cur) + tl.dot(ds_p, k_prev)) * scale
        tl.store(dq_ptr + i[:, None] * sqt + d[None, :], dq.to(DQ.dtype.element_ty), mask=q_ok[:, None])
        # this head's dk shares: share 0 of key chunk n (its own query chunk), share 1 of key chunk n-1
        # (the next query chunk); the group's heads give key chunk n 2*GROUP shares, the last one GROUP,
        # counted per D tile
        DKT = DK_SHARES.dtype.element_ty
        dk_ptr = DK_SHARES + b * sgb + 2 * h * sgh
        tl.store(dk_ptr + i[:, None] * sgt + d[None, :], (tl.dot(tl.trans(ds_c), qt) * scale).to(DKT),
                 mask=q_ok[:, None])
        tl.store(dk_ptr + sgh + jp[:, None] * sgt + d[None, :], (tl.dot(tl.trans(ds_p), qt) * scale).to(DKT),
                 mask=p_ok[:, None])
        bkv = b * (H // GROUP) + hk
        group_shares = DK_SHARES + b * sgb + 2 * hk * GROUP * sgh
        counts = COUNTS if ND == 1 else COUNTS + t * tl.num_programs(1) * N  # tile t's, after those of tiles < t
        sum_group_shares(counts + bkv * N + n, tl.where(n == N - 1, GROUP, 2 * GROUP), group_shares,
                         DK + bkv * T * D, i, q_ok, d, sgh, sgt, C, D, BD, 2 * GROUP)
        if n > 0:
            sum_group_shares(counts + bkv * N + n - 1, 2 * GROUP, group_shares, DK + bkv * T * D, jp, p_ok, d, sgh,
                             sgt, C, D, BD, 2 * GROUP)
        if HAS_LINEAR and HAS_GAMMA:
            tl.store(WIN_SUMS + stat + i, x_win, mask=lead_tile(q_ok, t, ND))
            tl.store(WIN_SUMS + n_stat + stat + i, den_win, mask=lead_tile(q_ok, t, ND))
    if HAS_LINEAR and SIDE == 2:
        S = tl.load(STATES + state * F * D + f[:, None] * D + d0[None, :])
        z = tl.load(ZS + state * F + f)
        go = (do.to(tl.float32) * rden[:, None]).to(DT)  # do / den
        go_s = tl.dot(go, tl.trans(S))  # [C,F]
        for kt in tl.static_range(1, ND):  # the further D tiles of do and S
            dk = tl.arange(kt * BD, (kt + 1) * BD)
            do_k = tl.load(do_ptr + i[:, None] * sot + dk[None, :], mask=q_ok[:, None], other=0.0)
            S_k = tl.load(STATES + state * F * D + f[:, None] * D + dk[None, :])
            go_s = tl.dot((do_k.to(tl.float32) * rden[:, None]).to(DT), tl.trans(S_k), go_s)
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
                dov_g = dot_rest(tl.dot(do, tl.trans(tl.load(v_ptr + jg[:, None] * svt + d0[None, :]))), do_ptr, i,
                                 q_ok, sot, v_ptr, jg, jg < T, svt, BD, ND)
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
                    dov_g = dot_rest(tl.dot(do, tl.trans(tl.load(v_ptr + jg[:, None] * svt + d0[None, :]))), do_ptr,
                                     i, q_ok, sot, v_ptr, jg, jg < T, svt, BD, ND)
                    x_lin += tl.sum(l_g * dov_g, 1)
                    den_lin += tl.sum(l_g, 1)
            # sum_W A_ij dp_ij without the rounded output: with delta = (x_win + x_lin) / den it is
            # (x_win den_lin - x_lin den_win) / den^2, free of the cancellation in x_win - delta den_win
            dg = (x_win * den_lin - x_lin * den_win) * rden * rden
            tl.store(DGAMMA + chunk, tl.sum(dg, 0) / g)
