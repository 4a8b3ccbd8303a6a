"""The running linear states of the chunked Triton kernels, one per chunk, for `chunk.py`.

The only sequential part of chunked hybrid attention is the linear state; everything else is local
to a chunk and its predecessor. These scans walk the chunks once, each program owning an [BF,BV]
tile of the state of one (b, h), and store the state of every EVERY-th chunk, so the kernels of
`chunk.py` run one program per (chunk, b, h) in parallel; a chunk between two stored states adds
the chunks in between as extra local blocks. With a 128 x 128 state per 64 tokens the states are
twice as large as q: storing every chunk's made them most of the memory traffic. Splitting long
sequences into segments with a prefix over segment sums was tried and measured no faster on an
H100 (it reads the inputs twice).

  forward:  S_n = sum over key chunks <= n-2 of fk^T v  [F,D],  z_n = sum fk  [F]
  backward: dS_m = sum over query chunks >= m+2 of fq^T do/den  [F,D],
            dz_m = sum fq delta/den  [F]  (delta = do . o per query)

S and dS are stored in the input dtype: they only ever enter a dot in that dtype, as the sums are
accumulated in fp32 registers. z and dz stay fp32; they enter normalisers.
"""
import torch
import triton
import triton.language as tl

from ..strides import bht_strides
from .chunk_blocks import d_tiles, rowdot_rest

# The state tile of one scan program: F and D split in 64s, so a 128 x 128 state runs four programs.
STATE_TILE = 64
SCAN_WARPS = 4


def scan_stages(programs: int, device: torch.device) -> int:
    """Pipeline stages of a scan's chunk loop: how many chunks it loads ahead of the state update.

    Where the programs are few (long T at small batch: one or two per SM), a third stage hides more of
    the load latency; where they are many, the shared memory of the extra stage costs occupancy, and a
    fourth stage gains nothing at few programs and loses more at many (benchmarks/h100/README.md).
    """
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return 3 if programs <= 2 * sms else 2


@triton.jit
def _state_fwd_kernel(
    FK, V, STATES, ZS,
    sfb, sfh, sft, svb, svh, svt,
    T,
    H: tl.constexpr, GROUP: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
    BF: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, EVERY: tl.constexpr,
):
    """Program (F tile, D tile, (b, h)) walks the chunks forward, storing S and z of every EVERY-th."""
    pid_f, pid_v, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    fk_ptr = FK + b * sfb + h * sfh
    v_ptr = V + b * svb + (h // GROUP) * svh
    NS = tl.cdiv(tl.cdiv(T, C), EVERY)
    states = STATES + pid_bh.to(tl.int64) * NS * F * D
    zs = ZS + pid_bh.to(tl.int64) * NS * F
    DT = STATES.dtype.element_ty

    r = tl.arange(0, EVERY * C)
    f = pid_f * BF + tl.arange(0, BF)
    dv = pid_v * BV + tl.arange(0, BV)
    z_mask = (f < F) & (pid_v == 0)  # one program per F tile writes z
    S = tl.zeros([BF, BV], dtype=tl.float32)
    z = tl.zeros([BF], dtype=tl.float32)
    for e in range(0, NS):
        tl.store(states + e * F * D + f[:, None] * D + dv[None, :], S.to(DT))
        tl.store(zs + e * F + f, z, mask=z_mask)
        # key chunks e*EVERY-1 .. e*EVERY+EVERY-2 join: beyond the window from query chunk (e+1)*EVERY on
        jp = (e * EVERY - 1) * C + r
        p_ok = (jp >= 0) & (jp < T)
        fk = tl.load(fk_ptr + jp[:, None] * sft + f[None, :], mask=p_ok[:, None], other=0.0)
        v = tl.load(v_ptr + jp[:, None] * svt + dv[None, :], mask=p_ok[:, None], other=0.0)
        S += tl.dot(tl.trans(fk.to(DT)), v)
        z += tl.sum(fk.to(tl.float32), 0)


@triton.jit
def _state_bwd_kernel(
    FQ, DO, DEN, DELTA, DSTATES, DZS,
    sfb, sfh, sft, sob, soh, sot,
    T,
    H: tl.constexpr, F: tl.constexpr, D: tl.constexpr,
    BF: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, EVERY: tl.constexpr,
):
    """As `_state_fwd_kernel`, walking the chunks from the last down."""
    pid_f, pid_v, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    fq_ptr = FQ + b * sfb + h * sfh
    do_ptr = DO + b * sob + h * soh
    stat = pid_bh.to(tl.int64) * T
    NS = tl.cdiv(tl.cdiv(T, C), EVERY)
    dstates = DSTATES + pid_bh.to(tl.int64) * NS * F * D
    dzs = DZS + pid_bh.to(tl.int64) * NS * F
    DT = DSTATES.dtype.element_ty

    r = tl.arange(0, EVERY * C)
    f = pid_f * BF + tl.arange(0, BF)
    dv = pid_v * BV + tl.arange(0, BV)
    z_mask = (f < F) & (pid_v == 0)
    dS = tl.zeros([BF, BV], dtype=tl.float32)
    dz = tl.zeros([BF], dtype=tl.float32)
    for step in range(0, NS):
        e = NS - 1 - step
        # query chunks e*EVERY+2 .. e*EVERY+EVERY+1 leave the local blocks of key chunk e*EVERY
        far = (e * EVERY + 2) * C + r
        far_ok = far < T
        fq = tl.load(fq_ptr + far[:, None] * sft + f[None, :], mask=far_ok[:, None], other=0.0)
        do = tl.load(do_ptr + far[:, None] * sot + dv[None, :], mask=far_ok[:, None], other=0.0)
        rden = 1.0 / tl.load(DEN + stat + far, mask=far_ok, other=1.0)
        delta = tl.load(DELTA + stat + far, mask=far_ok, other=0.0)
        go = (do.to(tl.float32) * rden[:, None]).to(DT)
        dS += tl.dot(tl.trans(fq.to(DT)), go)
        dz += tl.sum(fq.to(tl.float32) * (delta * rden)[:, None], 0)
        tl.store(dstates + e * F * D + f[:, None] * D + dv[None, :], dS.to(DT))
        tl.store(dzs + e * F + f, dz, mask=z_mask)


@triton.jit
def _delta_kernel(O, DO, DELTA, sob, soh, sot, T, H: tl.constexpr, C: tl.constexpr, BD: tl.constexpr,
                  ND: tl.constexpr):
    """delta_i = do_i . o_i in fp32, per query, over the ND tiles of D."""
    n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    i = n * C + tl.arange(0, C)
    d = tl.arange(0, BD)
    ok = i < T
    head = b * sob + h * soh
    offsets = head + i[:, None] * sot + d[None, :]
    o = tl.load(O + offsets, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + offsets, mask=ok[:, None], other=0.0).to(tl.float32)
    delta = DELTA + pid_bh.to(tl.int64) * T + i
    tl.store(delta, rowdot_rest(tl.sum(o * do, 1), O + head, DO + head, i, ok, sot, BD, ND), mask=ok)


def _scan(kernel, args: tuple, BH: int, F: int, D: int, **meta) -> None:
    """Launch a state scan: one program per (F tile, D tile, b, h)."""
    BF, BV = min(F, STATE_TILE), min(D, STATE_TILE)
    grid = (F // BF, D // BV, BH)
    kernel[grid](*args, F=F, D=D, BF=BF, BV=BV, num_warps=SCAN_WARPS,
                 num_stages=scan_stages(grid[0] * grid[1] * grid[2], args[0].device), **meta)


def stored_chunks(T: int, chunk: int, every: int) -> int:
    """How many states a scan stores: those of chunks 0, every, 2 every, ..."""
    return triton.cdiv(triton.cdiv(T, chunk), every)


def chunk_states_fwd(fk: torch.Tensor, v: torch.Tensor, dtype: torch.dtype, chunk: int, every: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """fk [B,H,T,F], v [B,Hkv,T,D] -> S [B,H,NS,F,D] in `dtype`, z [B,H,NS,F] fp32, as defined above,
    for chunks 0, every, 2 every, ... (NS of them)."""
    B, H, T, F = fk.shape
    D = v.shape[-1]
    NS = stored_chunks(T, chunk, every)
    states = torch.empty(B, H, NS, F, D, device=fk.device, dtype=dtype)
    zs = torch.empty(B, H, NS, F, device=fk.device, dtype=torch.float32)
    _scan(_state_fwd_kernel, (fk, v, states, zs, *bht_strides(fk), *bht_strides(v), T), B * H, F, D,
          H=H, GROUP=H // v.shape[1], C=chunk, EVERY=every)
    return states, zs


def chunk_delta(o: torch.Tensor, do: torch.Tensor, chunk: int) -> torch.Tensor:
    """o, do [B,H,T,D] with equal strides -> delta [B,H,T] fp32."""
    B, H, T, D = o.shape
    delta = torch.empty(B, H, T, device=o.device, dtype=torch.float32)
    BD, ND = d_tiles(D)
    _delta_kernel[(triton.cdiv(T, chunk), B * H)](o, do, delta, *bht_strides(o), T, H=H, C=chunk, BD=BD, ND=ND,
                                                   num_warps=4)
    return delta


def chunk_states_bwd(fq: torch.Tensor, do: torch.Tensor, den: torch.Tensor, delta: torch.Tensor, chunk: int,
                     every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fq [B,H,T,F], do [B,H,T,D], den, delta [B,H,T] -> dS [B,H,NS,F,D] in do's dtype, dz [B,H,NS,F]
    fp32, for key chunks 0, every, 2 every, ..."""
    B, H, T, F = fq.shape
    D = do.shape[-1]
    NS = stored_chunks(T, chunk, every)
    dstates = torch.empty(B, H, NS, F, D, device=fq.device, dtype=do.dtype)
    dzs = torch.empty(B, H, NS, F, device=fq.device, dtype=torch.float32)
    _scan(_state_bwd_kernel, (fq, do, den, delta, dstates, dzs, *bht_strides(fq), *bht_strides(do), T),
          B * H, F, D, H=H, C=chunk, EVERY=every)
    return dstates, dzs
