"""Sums of per-query-head gradient shares over each GQA group (the chunk backward's dk and dv), taken
by the last program to write a share.

A key/value head serves GROUP query heads. The backward writes, for each key chunk, each query
head's share of dv and two shares of dk (from the query chunk itself and from the next one). A
program that has stored its shares of a key chunk counts its arrival on that chunk's counter; the
one that completes the count adds the group's shares in fp32, always in the same order (so the sum
does not depend on which program came last), and writes the key/value head's gradient. `chunk_grid`
runs a group's query heads side by side, so the shares are read back from L2. This replaced a
launch of its own that read every share from DRAM and cost more than the sums add to the dk and dv
launches (benchmarks/h100/README.md).
"""
import triton
import triton.language as tl


@triton.jit
def sum_group_shares(COUNT, ARRIVALS, SHARES, OUT, rows, ok, cols, share_stride, row_stride,
                     C: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, N_SHARES: tl.constexpr):
    """Call once this program has stored its share(s) of the key chunk at `rows` (`ok`: rows < T) and
    the BD columns `cols` (one D tile, all of D up to 128; each tile counts at a COUNT of its own).
    Counts the arrival at COUNT; the ARRIVALS-th program to arrive writes OUT [T,D] (one kv head,
    contiguous) at `rows`, `cols` = the sum of the N_SHARES shares at SHARES + s * share_stride (rows
    row_stride apart). Where fewer programs arrive than there are shares (dk of the last key chunk,
    which no query chunk follows), only the even shares exist."""
    # The barrier puts every thread's stores before the atomic's release (one thread runs it); its
    # result reaches the other threads through shared memory behind another barrier, after the acquire.
    tl.debug_barrier()
    if tl.atomic_add(COUNT, 1, sem="acq_rel", scope="gpu") == ARRIVALS - 1:
        acc = tl.zeros([C, BD], dtype=tl.float32)
        for s in tl.static_range(N_SHARES):
            keep = ok if s % 2 == 0 else ok & (ARRIVALS == N_SHARES)
            # .cg: from L2, where the other programs' stores are, never from this SM's L1
            acc += tl.load(SHARES + s * share_stride + rows[:, None] * row_stride + cols[None, :], mask=keep[:, None],
                           other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(OUT + rows[:, None] * D + cols[None, :], acc.to(OUT.dtype.element_ty), mask=ok[:, None])
