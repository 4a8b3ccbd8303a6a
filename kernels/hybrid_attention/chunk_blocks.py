"""How the chunk kernels cut the sequence, and which (query, key) pairs each score block holds.

Shared by the forward (`chunk.py`) and the backward (`chunk_bwd.py`): the chunk length for a
window, the pair masks of a block, which local blocks hold linear pairs at all (the kernels skip
the dots of those that do not), and the launch grid and settings.
"""
import torch
import triton
import triton.language as tl

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
                         f"that are powers of two up to {MAX_CHUNK}; got {window} {window_size}")
    return c


@triton.jit
def pair_masks(i, j, ok, WINDOW: tl.constexpr, TERRACE: tl.constexpr):
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


def linear_from(window_size: int, terrace: bool, chunk: int) -> int:
    """The nearest of the two local score blocks (0: the chunk's own, 1: the previous chunk's, 2:
    neither) that holds linear pairs: query-key distances a block spans, against the window."""
    if window_size == 0:
        return 0
    if terrace:  # linear from two window blocks apart: the own chunk spans C/w - 1, the previous 2C/w - 1
        return 0 if chunk // window_size >= 3 else 1 if chunk // window_size >= 2 else 2
    return 0 if chunk > window_size else 1  # sliding: distances up to C-1, and 2C-1 >= w


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    if device.type == "cuda" and dtype == torch.float32:
        # fp32 tiles hit illegal memory accesses in the earlier, sequential form of these kernels on an
        # H100 (triton 3.6); fp32 has not been run on a GPU since, so it stays on PyTorch there
        raise ValueError("the triton backend takes bf16 or fp16 on CUDA, not fp32")


@triton.jit
def chunk_program(H: tl.constexpr, GROUP: tl.constexpr):
    """(n, pid_bh, b, h): this program's chunk and head on the grid of `chunk_grid`, pid_bh = b*H + h."""
    pid, pid_bkv = tl.program_id(0), tl.program_id(1)
    pid_bh = pid_bkv * GROUP + pid % GROUP
    return pid // GROUP, pid_bh, (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)


def chunk_grid(chunks: int, B: int, H: int, Hkv: int) -> tuple[int, int]:
    """One program per (chunk, b, h), the query heads of a GQA group side by side on each chunk: they read
    the same k and v (from L2 after the first) and write the gradient shares `group_sum.py` adds while
    those are still in L2. Walking each head's chunks in turn instead, the heads of a group ran far apart
    at long T: H100, Llama-3-8B layer, T 32K, forward 1.24 -> 1.17 ms, forward+backward 4.76 -> 4.54
    (T 1K: 3.96 -> 3.95)."""
    return chunks * (H // Hkv), B * Hkv


# Four warps: one warpgroup, so Hopper's wgmma takes the 64-row tiles whole (eight warps split
# them and ran 1.6-2x slower on an H100, triton 3.6).
CHUNK_WARPS = 4


def kernel_meta(q: torch.Tensor, k: torch.Tensor, fq: torch.Tensor | None, gamma: torch.Tensor | None,
                window_size: int, terrace: bool, chunk: int) -> dict:
    """The compile-time arguments every chunk kernel takes, and the launch settings."""
    return dict(H=q.shape[1], GROUP=q.shape[1] // k.shape[1], D=q.shape[-1],
                F=fq.shape[-1] if fq is not None else 16, C=chunk, WINDOW=window_size, TERRACE=terrace,
                HAS_LINEAR=fq is not None, HAS_GAMMA=gamma is not None,
                LIN_FROM=linear_from(window_size, terrace, chunk) if fq is not None else 2,
                num_warps=CHUNK_WARPS, num_stages=1)
