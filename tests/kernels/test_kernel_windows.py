"""The window kinds inside the Triton kernels (`kernel_windows.py`), run by the interpreter here.

Each branch the kernels take on KIND is held to the registry's predicate, for every registered kind;
a kind registered without a branch is refused by every Triton path, by name, instead of running as
another kind, while the PyTorch paths (the oracle) take it at once.
"""
import pytest
import torch
import triton
import triton.language as tl

from kernels.hybrid_attention import (RingState, chunk_refusal, fused_recurrent_hybrid_attention,
                                      hybrid_attention_chunk, hybrid_attention_naive, hybrid_attention_parallel,
                                      hybrid_attention_ring_step, ring_size)
from kernels.hybrid_attention.chunk import hybrid_attention_chunk_bwd, hybrid_attention_chunk_fwd
from kernels.hybrid_attention.kernel_windows import in_window, window_start
from kernels.hybrid_attention.windows import WINDOW_KINDS, register_window, window_kind
from kernels.testing import assert_close
from tests.helpers import make_inputs

POSITIONS = 128  # queries and keys 0..127: several blocks and chunks of every window size below


@triton.jit
def _rules_kernel(INSIDE, START, W: tl.constexpr, KIND: tl.constexpr, P: tl.constexpr):
    """in_window over all (i, j) pairs of positions 0..P-1, and window_start of each position."""
    p = tl.arange(0, P)
    tl.store(INSIDE + p[:, None] * P + p[None, :], in_window(p[:, None], p[None, :], W, KIND).to(tl.int8))
    tl.store(START + p, window_start(p, W, KIND))


def kernel_rules(window_size: int, code: int) -> tuple[torch.Tensor, torch.Tensor]:
    inside = torch.empty(POSITIONS, POSITIONS, dtype=torch.int8)
    start = torch.empty(POSITIONS, dtype=torch.int32)
    _rules_kernel[(1,)](inside, start, W=window_size, KIND=code, P=POSITIONS)
    return inside.bool(), start


@pytest.mark.parametrize("window_size", [1, 4, 16, 64])
@pytest.mark.parametrize("window", sorted(WINDOW_KINDS))
def test_kernel_rules_are_the_registry_predicate(window, window_size):
    i, j = torch.arange(POSITIONS)[:, None], torch.arange(POSITIONS)[None, :]
    causal = j <= i
    expected = window_kind(window).contains(i, j, window_size) & causal
    inside, start = kernel_rules(window_size, window_kind(window).code)
    assert torch.equal(inside & causal, expected)
    assert torch.equal((j >= start[:, None].long()) & causal, expected)  # an interval ending at the query


@pytest.fixture
def unimplemented_kind():
    """A kind registered for one test: keys in the query's own w-block only (monotone, at most w keys)."""
    name = "own_block"
    code = max(kind.code for kind in WINDOW_KINDS.values()) + 1
    register_window(name, capacity=lambda w: w, code=code)(lambda i, j, w: i // w == j // w)
    try:
        yield name
    finally:
        del WINDOW_KINDS[name]


def test_a_kind_without_kernel_rules_is_refused_by_every_triton_path(unimplemented_kind):
    kind = unimplemented_kind
    refused = rf"does not implement window kind '{kind}'; it implements \['sliding', 'terrace'\]"
    inputs = make_inputs(1, 2, 1, 100, 16, 16, "hybrid")
    # the PyTorch paths take the new kind at once
    assert_close("parallel", hybrid_attention_naive(*inputs, 16, kind), hybrid_attention_parallel(*inputs, 16, kind))
    # the chunk kernels: the public entry (an explicit triton backend) and `auto`'s question
    with pytest.raises(ValueError, match=refused + ": use attention.backend: torch"):
        hybrid_attention_chunk(*inputs, 16, kind)
    assert chunk_refusal(16, 16, 16, kind, torch.device("cuda"), torch.bfloat16).startswith(
        f"the triton backend does not implement window kind '{kind}'")
    # the forward's and the backward's launchers themselves, behind the entry's check
    q, k, v, fq, fk, gamma = (x.detach() for x in inputs)
    with pytest.raises(ValueError, match=refused):
        hybrid_attention_chunk_fwd(q, k, v, fq, fk, gamma, 16, kind, 0.25, 64, 1)
    saved = hybrid_attention_chunk_fwd(q, k, v, fq, fk, gamma, 16, "sliding", 0.25, 64, 1)
    with pytest.raises(ValueError, match=refused):
        hybrid_attention_chunk_bwd(q, k, v, fq, fk, gamma, *saved, torch.ones_like(q), 16, kind, 0.25, 64, 1, 1)
    # the fused decode step, where the PyTorch ring step runs the kind
    state = RingState.empty(1, 2, 1, 16, 16, ring_size(16, kind))
    step = (q[:, :, 0], k[:, :, 0], v[:, :, 0], fq[:, :, 0], fk[:, :, 0], gamma, 16, kind)
    with pytest.raises(ValueError, match=refused):
        fused_recurrent_hybrid_attention(state, *step)
    hybrid_attention_ring_step(state, *step)
    # and the jit rules, launched with its code regardless, fail to build rather than run as sliding
    with pytest.raises(Exception, match="no Triton rule for this window kind"):
        kernel_rules(16, window_kind(kind).code)


def test_a_code_is_never_given_to_two_kinds():
    with pytest.raises(ValueError, match="window kind code 0 is taken"):
        register_window("another", capacity=lambda w: w, code=window_kind("sliding").code)(lambda i, j, w: i - j < w)
    assert "another" not in WINDOW_KINDS
