"""The backward of the chunked hybrid attention (`chunk.py`): one step's gradient kernels.

The launches, each one program per (chunk, head) in parallel unless said otherwise (and, where
the output has D columns, per D tile: `chunk_blocks`), the query sides in `chunk_bwd_query.py`:
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
Every program holds one [C,BD] or [C,F] accumulator: with more in one program the kernels spill
registers and run slower. Local blocks without linear pairs (`chunk_blocks.linear_from`: none at
all for the default terrace window of 64) skip their feature dots. delta is computed on the window
side, not in a pass of its own that would read do again; dk comes from the window side's ds (two
dots and two [C,D] share writes there, eight shares per key in the GQA sum), not from a key-side
launch that would recompute the scores and their gradient for every key chunk, nor from fp32
atomics into one dk per kv head, which lose at long T where a group's heads run far apart. The
timings behind each choice are in benchmarks/h100/README.md.
The max m_i stabilises the window part only and the linear part is not scaled by it, so the output
depends on m_i: its gradient dm_i = -sum_j A_ij dp_ij flows to the argmax key, as through the
reference's amax (ties, which random data never produce, go to one key instead of being split).
"""
import torch
import triton
import triton.language as tl

from ..strides import bht_strides
from .chunk_blocks import chunk_grid, chunk_program, dot_rest, kernel_meta, own_d_tile, pair_masks
from .chunk_bwd_query import _bwd_query_kernel
from .chunk_state import chunk_delta, chunk_states_bwd
from .group_sum import sum_group_shares

# Register cap of the dfk launch: at 168 three programs fit an SM instead of two, which made it
# faster; the same cap slowed the dv launch and the query sides (spilling), so they run uncapped.
KEY_FEATURE_MAXNREG = 168


@triton.jit
def _bwd_value_kernel(
    Q, K, FQ, FK, DSTATES, GAMMA, DO, DEN, MAX, DV_SHARES, DV, COUNTS,
    sqb, sqh, sqt, skb, skh, skt, sob, soh, sot, sfb, sfh, sft, sgb, sgh, sgt,
    T, scale,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
    C: tl.constexpr, WINDOW: tl.constexpr, KIND: tl.constexpr,
    HAS_LINEAR: tl.constexpr, HAS_GAMMA: tl.constexpr, EVERY: tl.constexpr, LIN_FROM: tl.constexpr,
    BD: tl.constexpr, ND: tl.constexpr,
):
    """Program (key chunk, (b, h), D tile t): this query head's share of dv's columns d, into
    DV_SHARES [B,H,T,D] (strides sg*); with GQA the program that completes the count of the key chunk
    and tile in COUNTS sums the group's shares into DV [B,Hkv,T,D] (without, the shares are dv). The
    window scores run over all of D in every tile's program. Walking the group's heads here instead,
    into one accumulator, ran slower."""
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
    t, d = own_d_tile(BD, ND)  # this program's columns of dv
    d0 = tl.arange(0, BD)  # D tile 0 (all of D when ND == 1), where k . q starts
    f = tl.arange(0, F)
    g = tl.load(GAMMA + h).to(tl.float32) if HAS_GAMMA else 1.0
    j = mc * C + r  # this chunk's keys
    k_ok = j < T
    dv = tl.zeros([C, BD], dtype=tl.float32)
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
        k_t = tl.load(k_ptr + j[:, None] * skt + d0[None, :], mask=k_ok[:, None], other=0.0)
    # the two query chunks whose local blocks hold these keys: chunk mc (i >= j) and chunk mc+1
    for near in tl.static_range(2):
        i = j + near * C
        q_ok = i < T
        do = tl.load(do_ptr + i[:, None] * sot + d[None, :], mask=q_ok[:, None], other=0.0)
        rden = 1.0 / tl.load(DEN + stat + i, mask=q_ok, other=1.0)
        winT, linT = pair_masks(i[None, :], j[:, None], k_ok[:, None] & q_ok[None, :], WINDOW, KIND)
        # key-major blocks [C keys, C queries]
        if WINDOW > 0:
            qt = tl.load(q_ptr + i[:, None] * sqt + d0[None, :], mask=q_ok[:, None], other=0.0)
            m = tl.load(MAX + stat + i, mask=q_ok, other=0.0)
            kq = dot_rest(tl.dot(k_t, tl.trans(qt)), k_ptr, j, k_ok, skt, q_ptr, i, q_ok, sqt, BD, ND)
            aT = tl.where(winT, g * tl.exp(kq * scale - m[None, :]), 0.0)
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
        counts = COUNTS if ND == 1 else COUNTS + t * tl.num_programs(1) * N  # tile t's, after those of tiles < t
        sum_group_shares(counts + bkv * N + mc, GROUP, DV_SHARES + b * sgb + (h // GROUP) * GROUP * sgh,
                         DV + bkv * T * D, j, k_ok, d, sgh, sgt, C, D, BD, GROUP)


@triton.jit
def _bwd_key_feature_kernel(
    FQ, V, DSTATES, DZS, DO, DEN, DELTA, DFK,
    svb, svh, svt, sob, soh, sot, sfb, sfh, sft,
    T,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
    C: tl.constexpr, WINDOW: tl.constexpr, KIND: tl.constexpr, EVERY: tl.constexpr, LIN_FROM: tl.constexpr,
    BD: tl.constexpr, ND: tl.constexpr,
):
    """Program (key chunk, (b, h)): dfk [B,H,T,F] with fq's strides, walking the D tiles of v."""
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
    d = tl.arange(0, BD)  # D tile 0 (all of D when ND == 1)
    f = tl.arange(0, F)
    j = mc * C + r
    k_ok = j < T
    v_t = tl.load(v_ptr + j[:, None] * svt + d[None, :], mask=k_ok[:, None], other=0.0)
    dS = tl.load(DSTATES + state * F * D + f[:, None] * D + d[None, :], mask=has_state, other=0.0)
    v_ds = dot_rest(tl.dot(v_t, tl.trans(dS)), v_ptr, j, k_ok, svt, DSTATES + state * F * D, f, (f < F) & has_state,
                    D, BD, ND)
    dfk = v_ds - tl.load(DZS + state * F + f, mask=has_state, other=0.0)[None, :]
    # the local blocks that hold linear pairs, then the query chunks up to the stored dS
    for near in range(LIN_FROM, tl.minimum(stored * EVERY + 2, N) - mc):
        i = j + near * C
        q_ok = i < T
        do = tl.load(do_ptr + i[:, None] * sot + d[None, :], mask=q_ok[:, None], other=0.0)
        rden = 1.0 / tl.load(DEN + stat + i, mask=q_ok, other=1.0)
        delta = tl.load(DELTA + stat + i, mask=q_ok, other=0.0)
        fq = tl.load(fq_ptr + i[:, None] * sft + f[None, :], mask=q_ok[:, None], other=0.0).to(DT)
        dpT = (dot_rest(tl.dot(v_t, tl.trans(do)), v_ptr, j, k_ok, svt, do_ptr, i, q_ok, sot, BD, ND)
               - delta[None, :]) * rden[None, :]
        _, linT = pair_masks(i[None, :], j[:, None], k_ok[:, None] & q_ok[None, :], WINDOW, KIND)
        dfk += tl.dot(tl.where(linT, dpT, 0.0).to(DT), fq)
    tl.store(DFK + b * sfb + h * sfh + j[:, None] * sft + f[None, :], dfk.to(DFK.dtype.element_ty),
             mask=k_ok[:, None])


def hybrid_attention_chunk_bwd(q, k, v, fq, fk, gamma, o, den, max_, states, zs, do, window_size: int,
                               window: str, scale: float, chunk: int, every: int, dstate_every: int):
    """-> dq, dk, dv, dfq, dfk, dgamma (None where an input does not reach the output). `every`: the
    forward's state spacing; `dstate_every`: the spacing of the gradient states stored here."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    N = triton.cdiv(T, chunk)
    do = do.contiguous()  # o's layout: the two share strides in the kernels
    meta = kernel_meta(q, k, fq, gamma, window_size, window, chunk)
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
    # arrivals per D tile and key chunk: dk, dv
    counts = torch.zeros(2, B * Hkv * N * meta["ND"], device=q.device, dtype=torch.int32)
    grid = chunk_grid(N, B, H, Hkv)  # the linear side and dfk: outputs with F columns
    tiled = chunk_grid(N, B, H, Hkv, meta["ND"])  # the window side and dv: one program per D tile too

    def query_side(side: int, delta: torch.Tensor) -> None:
        _bwd_query_kernel[tiled if side == 1 else grid](
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
    _bwd_value_kernel[tiled](
        q, k, *feats, dstates, gamma_arg, do, den, max_, dv_shares, dv, counts[1],
        *bht_strides(q), *bht_strides(k), *bht_strides(do), *bht_strides(feats[0]), *bht_strides(dv_shares),
        T, scale, EVERY=dstate_every, **meta)
    dfk = None
    if has_linear:
        dfk = torch.empty_like(fk)
        _bwd_key_feature_kernel[grid](
            fq, v, dstates, dzs, do, den, delta, dfk, *bht_strides(v), *bht_strides(do), *bht_strides(fq), T,
            EVERY=dstate_every, **{k_: meta[k_] for k_ in ("H", "GROUP", "D", "F", "C", "WINDOW", "KIND",
                                                            "LIN_FROM", "BD", "ND", "num_warps", "num_stages")},
            maxnreg=KEY_FEATURE_MAXNREG)
    if gamma is None:
        dgamma = None
    elif has_linear:
        dgamma = dgamma.sum((0, 2)).to(gamma.dtype)
    else:  # window only: gamma scales every weight and cancels in the shared normaliser
        dgamma = torch.zeros_like(gamma)
    return dq, dk, dv, dfq, dfk, dgamma
