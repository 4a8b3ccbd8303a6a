"""How the chunk kernels cut the sequence, and which (query, key) pairs each score block holds.

Shared by the forward (`chunk.py`) and the backward (`chunk_bwd.py`): the chunk length for a
window, the pair masks of a block, which local blocks hold linear pairs at all (the kernels skip
the dots of those that do not), how the head dim is cut into tiles, and the launch grid and settings.
The window rule itself comes from the registry through `kernel_windows.py`: the kernels take the
kind's code as KIND, and `kernel_meta` refuses a kind they have no branch for.

D tiles. A (padded) head dim up to D_TILE is one tile, BD = D and ND = 1, and the kernels are those
measured on an H100/H200. A larger one (Gemma-3's 256) is split into ND tiles of BD = D_TILE, the
way flash-linear-attention tiles its key and value dims: a kernel whose output has D columns (o,
dq and the dk shares, dv) runs one program per D tile, on grid axis 2, and each walks every tile
for the contractions over D (q . k, do . v, do . o, fq S^T, v dS^T), tile 0 first and then the
further tiles in a static loop (`dot_rest`, `rowdot_rest`): with ND = 1 that loop has no
iteration and the kernels are, op for op, those of a single tile.
"""
import torch
import triton
import triton.language as tl

from .kernel_windows import TERRACE, in_window, kernel_code

# Chunk length of the Triton kernels (the PyTorch form picks its own, `parallel.torch_chunk_size`): the
# score blocks are C x C; 64 keeps them in registers with head dim 128.
MIN_TRITON_CHUNK = 64
MAX_TRITON_CHUNK = 128
# Widest D tile: 128, the head dim the kernels were tuned at, so that a program at D 256 holds the
# [C, BD] and [F, BD] tiles of one at D 128 (what its registers were sized for), and the [C, C]
# blocks, which each D tile's program recomputes over all of D, are computed twice, not four times
# as with tiles of 64.
D_TILE = 128


def d_tiles(head_dim: int) -> tuple[int, int]:
    """(BD, ND): the width and count of the D tiles of a padded head dim (a power of two)."""
    BD = min(head_dim, D_TILE)
    return BD, head_dim // BD


def triton_chunk_size(window_size: int, window: str) -> int:
    """C for a window: the smallest power of two >= MIN_TRITON_CHUNK, >= w, and a multiple of w
    (terrace: its blocks start at 0, and one straddling two chunks would reach chunk n-2). ValueError
    for a window the kernels cannot take, the kind included (`kernel_windows.kernel_code`)."""
    kind = kernel_code(window, "triton backend")
    if window_size == 0:
        return MIN_TRITON_CHUNK
    c = max(MIN_TRITON_CHUNK, triton.next_power_of_2(window_size))
    if c > MAX_TRITON_CHUNK or (kind == TERRACE.value and c % window_size):
        raise ValueError(f"the triton backend supports sliding windows up to {MAX_TRITON_CHUNK} and terrace "
                         f"windows that are powers of two up to {MAX_TRITON_CHUNK}; got {window} {window_size}")
    return c


@triton.jit
def pair_masks(i, j, ok, WINDOW: tl.constexpr, KIND: tl.constexpr):
    """(window, linear) masks of a block of (query i, key j) pairs; i, j and ok (both exist) broadcast."""
    visible = (j <= i) & ok
    if WINDOW > 0:
        win = visible & in_window(i, j, WINDOW, KIND)
    else:
        win = visible & False
    return win, visible & (~win)


def linear_from(window_size: int, kind: int, chunk: int) -> int:
    """The nearest of the two local score blocks (0: the chunk's own, 1: the previous chunk's, 2:
    neither) that holds linear pairs: query-key distances a block spans, against the window of the
    kind with code `kind` (one `kernel_windows.kernel_code` admitted: sliding or terrace)."""
    if window_size == 0:
        return 0
    if kind == TERRACE.value:  # linear from two window blocks apart: the own chunk spans C/w - 1, the previous 2C/w - 1
        return 0 if chunk // window_size >= 3 else 1 if chunk // window_size >= 2 else 2
    return 0 if chunk > window_size else 1  # sliding: distances up to C-1, and 2C-1 >= w


@triton.jit
def own_d_tile(BD: tl.constexpr, ND: tl.constexpr):
    """(t, cols): this program's D tile (grid axis 2) and its columns; with one tile, 0 and all of D."""
    if ND == 1:
        return 0, tl.arange(0, BD)
    else:
        t = tl.program_id(2)
        return t, t * BD + tl.arange(0, BD)


@triton.jit
def lead_tile(ok, t, ND: tl.constexpr):
    """The store mask `ok` on D tile 0's program only: per-query values every tile's program computes
    alike (normalisers, maxima, delta) are written once."""
    if ND == 1:
        return ok
    else:
        return ok & (t == 0)


@triton.jit
def dot_rest(acc, A, a_rows, a_ok, a_stride, B, b_rows, b_ok, b_stride, BD: tl.constexpr, ND: tl.constexpr):
    """acc (the caller's dot of D tile 0) + A_kt B_kt^T for the further D tiles kt: A_kt, B_kt the
    columns of tile kt of the rows a_rows, b_rows of [T, D] matrices (rows a_stride, b_stride apart;
    zero where a_ok, b_ok are false), loaded here in their own dtype. acc itself when ND == 1."""
    for kt in tl.static_range(1, ND):
        cols = tl.arange(kt * BD, (kt + 1) * BD)
        a = tl.load(A + a_rows[:, None] * a_stride + cols[None, :], mask=a_ok[:, None], other=0.0)
        b = tl.load(B + b_rows[:, None] * b_stride + cols[None, :], mask=b_ok[:, None], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def rowdot_rest(acc, A, B, rows, ok, stride, BD: tl.constexpr, ND: tl.constexpr):
    """acc (the caller's row sums of D tile 0) + the fp32 row sums of A * B over the further D tiles,
    for two [T, D] matrices with one row stride; acc itself when ND == 1."""
    for kt in tl.static_range(1, ND):
        offsets = rows[:, None] * stride + tl.arange(kt * BD, (kt + 1) * BD)[None, :]
        a = tl.load(A + offsets, mask=ok[:, None], other=0.0)
        b = tl.load(B + offsets, mask=ok[:, None], other=0.0)
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), 1)
    return acc


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    if device.type == "cuda" and dtype == torch.float32:
        # fp32 dots run in tf32: with this guard lifted (H200, triton 3.6, 2026-12-02) the kernels ran
        # fp32 without a fault and finite on 13 cases (3 shapes x 2 windows, T 150-1000), but 1.2e-3 to
        # 1.5e-2 from the fp32 reference (kernels/testing.py allows 1e-4): fp32 stays on PyTorch
        raise ValueError("the triton backend takes bf16 or fp16 on CUDA, not fp32")


@triton.jit
def chunk_program(H: tl.constexpr, GROUP: tl.constexpr):
    """(n, pid_bh, b, h): this program's chunk and head on the grid of `chunk_grid`, pid_bh = b*H + h."""
    pid, pid_bkv = tl.program_id(0), tl.program_id(1)
    pid_bh = pid_bkv * GROUP + pid % GROUP
    return pid // GROUP, pid_bh, (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)


def chunk_grid(chunks: int, B: int, H: int, Hkv: int, tiles: int = 1) -> tuple[int, int, int]:
    """One program per (chunk, b, h) and, where the kernel's output has D columns, per D tile (axis 2;
    one tile up to D_TILE). The query heads of a GQA group sit side by side on each chunk: they read
    the same k and v (from L2 after the first) and write the gradient shares `group_sum.py` adds while
    those are still in L2. Walking each head's chunks in turn instead, the heads of a group run far
    apart at long T and lose both (benchmarks/h100/README.md)."""
    return chunks * (H // Hkv), B * Hkv, tiles


# Four warps: one warpgroup, so Hopper's wgmma takes the 64-row tiles whole (eight warps split
# them, and ran slower: benchmarks/h100/README.md).
CHUNK_WARPS = 4


def kernel_meta(q: torch.Tensor, k: torch.Tensor, fq: torch.Tensor | None, gamma: torch.Tensor | None,
                window_size: int, window: str, chunk: int) -> dict:
    """The compile-time arguments every chunk kernel takes, and the launch settings; KIND is the
    registry's code of `window`, refused here where the kernels have no branch for it."""
    BD, ND = d_tiles(q.shape[-1])
    kind = kernel_code(window, "triton backend")
    return dict(H=q.shape[1], GROUP=q.shape[1] // k.shape[1], D=q.shape[-1], BD=BD, ND=ND,
                F=fq.shape[-1] if fq is not None else 16, C=chunk, WINDOW=window_size, KIND=kind,
                HAS_LINEAR=fq is not None, HAS_GAMMA=gamma is not None,
                LIN_FROM=linear_from(window_size, kind, chunk) if fq is not None else 2,
                num_warps=CHUNK_WARPS, num_stages=1)
