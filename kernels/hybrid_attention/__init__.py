"""Hybrid softmax-window + linear attention (../shared/design/lolcats.md §1.3, §7).

`naive.py` is the quadratic form (the tests' oracle, and the weights the cross-entropy transfer
loss trains through), `parallel.py` the chunked PyTorch form (CPU path and reference), `recurrent.py`
the decode form, `chunk.py` the Triton training/prefill kernels (backward in
`chunk_bwd.py` and `chunk_bwd_query.py`, shared block logic and the D tiles of head dims above 128
in `chunk_blocks.py`, per-chunk linear states from the scans in `chunk_state.py`, GQA sums of the
key gradients in `group_sum.py`). The window kinds are registered in `windows.py`; `kernel_windows.py`
gives the Triton kernels (chunk and decode) their rules, by code, and refuses the kinds they lack.
Backends sit in `BACKENDS`; `hybrid_attention` dispatches to one.
"""
from typing import Callable

from .chunk import chunk_refusal, hybrid_attention_chunk
from .naive import hybrid_attention_naive, hybrid_attention_weights
from .parallel import hybrid_attention_parallel
from .recurrent import HybridState, hybrid_attention_recurrent, hybrid_attention_step, prefill_state
from .windows import WINDOW_KINDS, window_kind
# The decode step: fixed-size ring state (ring.py), PyTorch step and its fused Triton kernels (their Hedgehog
# maps in decode_maps.py).
from .fused_recurrent import fused_recurrent_hybrid_attention
from .ring import RingState, fill_ring_state, hybrid_attention_ring_step, ring_size

BACKENDS: dict[str, Callable] = {"torch": hybrid_attention_parallel, "triton": hybrid_attention_chunk}


def hybrid_attention(q, k, v, fq, fk, gamma, window_size: int, window: str = "sliding",
                     scale: float | None = None, backend: str = "torch"):
    """Parallel hybrid attention through the named backend; see `naive.py` for the contract."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[backend](q, k, v, fq, fk, gamma, window_size, window, scale)


DECODE_BACKENDS: dict[str, Callable] = {"torch": hybrid_attention_ring_step, "triton": fused_recurrent_hybrid_attention}


def hybrid_attention_decode(state: RingState, q, k, v, fq, fk, gamma, window_size: int, window: str = "sliding",
                            scale: float | None = None, backend: str = "torch"):
    """One decode step through the named backend; see `ring.hybrid_attention_ring_step` for the contract."""
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"unknown decode backend {backend!r}; known: {sorted(DECODE_BACKENDS)}")
    return DECODE_BACKENDS[backend](state, q, k, v, fq, fk, gamma, window_size, window, scale)


__all__ = ["BACKENDS", "HybridState", "chunk_refusal", "WINDOW_KINDS", "hybrid_attention", "hybrid_attention_chunk", "hybrid_attention_naive", "hybrid_attention_weights",
           "hybrid_attention_parallel", "hybrid_attention_recurrent", "hybrid_attention_step",
           "prefill_state", "window_kind"]
__all__ += ["DECODE_BACKENDS", "RingState", "fill_ring_state", "fused_recurrent_hybrid_attention",
            "hybrid_attention_decode", "hybrid_attention_ring_step", "ring_size"]
