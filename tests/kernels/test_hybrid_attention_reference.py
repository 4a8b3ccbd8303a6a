"""The PyTorch forms of hybrid attention held to each other (../shared/design/lolcats.md §1.3, §7).

naive (quadratic) is first checked against a per-query loop over explicit key sets; the chunked
parallel form is then held to naive on values and every input gradient; the recurrent form is held
to the parallel one token by token, and its state to the prefill state.
"""
import pytest
import torch

from kernels.hybrid_attention import (WINDOW_KINDS, hybrid_attention_naive, hybrid_attention_parallel,
                                      hybrid_attention_recurrent, prefill_state, window_kind)
from kernels.testing import assert_close
from tests.helpers import make_inputs, window_for

# (B, H, Hkv, T, D, F, window_size): T not a multiple of the window or chunk, GQA ratios 1, 2, 3.
SHAPES = [
    pytest.param(1, 2, 2, 1, 8, 6, 4, id="T1"),
    pytest.param(2, 4, 2, 37, 8, 6, 4, id="gqa2-T37-w4"),
    pytest.param(1, 3, 1, 130, 16, 12, 16, id="gqa3-T130-w16"),
    pytest.param(1, 2, 1, 200, 8, 8, 64, id="gqa2-T200-w64"),
    pytest.param(1, 2, 2, 150, 8, 8, 24, id="T150-w24"),
    pytest.param(1, 2, 2, 40, 8, 8, 64, id="window-longer-than-T"),
]
MODES = ["hybrid", "window_only", "linear_only"]
WINDOWS = sorted(WINDOW_KINDS)


def brute_force(q, k, v, fq, fk, gamma, window_size, window):
    """One query at a time over explicitly listed window and linear key sets."""
    B, H, T, D = q.shape
    contains = window_kind(window).contains
    y = torch.zeros(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kh = h // (H // k.shape[1])
            for i in range(T):
                win = [j for j in range(i + 1) if window_size and contains(i, j, window_size)]
                lin = [j for j in range(i + 1) if j not in win] if fq is not None else []
                num, den = torch.zeros(D, dtype=torch.float64), 0.0
                if win:
                    s = torch.stack([q[b, h, i].double() @ k[b, kh, j].double() for j in win]) / D**0.5
                    g = 1.0 if gamma is None else gamma[h].double()
                    a = g * torch.exp(s - s.max())
                    num = num + sum(a[n] * v[b, kh, j].double() for n, j in enumerate(win))
                    den = den + a.sum()
                for j in lin:
                    w = fq[b, h, i].double() @ fk[b, h, j].double()
                    num, den = num + w * v[b, kh, j].double(), den + w
                y[b, h, i] = num / den
    return y


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("mode", MODES)
def test_naive_matches_brute_force(mode, window):
    inputs = make_inputs(1, 4, 2, 23, 4, 5, mode)
    w = window_for(mode, 4)
    with torch.no_grad():
        assert_close("y", brute_force(*inputs, w, window), hybrid_attention_naive(*inputs, w, window))


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,H,Hkv,T,D,F,window_size", SHAPES)
def test_parallel_matches_naive_values_and_grads(B, H, Hkv, T, D, F, window_size, mode, window):
    inputs = make_inputs(B, H, Hkv, T, D, F, mode)
    w = window_for(mode, window_size)
    ref = hybrid_attention_naive(*inputs, w, window)
    got = hybrid_attention_parallel(*inputs, w, window)
    assert_close("y", ref, got)
    dy = torch.randn_like(ref)
    names = ["q", "k", "v", "fq", "fk", "gamma"]
    present = [(n, t) for n, t in zip(names, inputs) if t is not None]
    # allow_unused: linear-only never reads q and k (only their features)
    ref_grads = torch.autograd.grad(ref, [t for _, t in present], dy, allow_unused=True)
    got_grads = torch.autograd.grad(got, [t for _, t in present], dy, allow_unused=True)
    for (name, _), r, g in zip(present, ref_grads, got_grads):
        assert (r is None) == (g is None), f"d{name}: used by one form only"
        if r is not None:
            assert_close(f"d{name}", r, g)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("mode", MODES)
def test_recurrent_matches_parallel_token_by_token(mode, window):
    inputs = make_inputs(2, 4, 2, 150, 8, 6, mode)
    w = window_for(mode, 16)
    with torch.no_grad():
        ref = hybrid_attention_parallel(*inputs, w, window)
        got, state = hybrid_attention_recurrent(*inputs, w, window)
        for t in range(ref.shape[2]):
            assert_close(f"y[t={t}]", ref[:, :, t], got[:, :, t])
        # the state after a one-shot prefill equals the state reached token by token
        q, k, v, fq, fk, gamma = inputs
        prefilled = prefill_state(k, v, fk, q.shape[1], w, window)
        assert prefilled.seen == state.seen and prefilled.window_k.shape == state.window_k.shape
        assert_close("S", state.kv_state, prefilled.kv_state)
        assert_close("z", state.k_state, prefilled.k_state)


@pytest.mark.parametrize("window", WINDOWS)
def test_recurrent_state_is_bounded_by_the_window(window):
    inputs = make_inputs(1, 2, 1, 300, 8, 4, "hybrid")
    with torch.no_grad():
        _, state = hybrid_attention_recurrent(*inputs, 16, window)
    assert state.window_k.shape[2] <= window_kind(window).capacity(16)
    assert state.seen == 300


@pytest.mark.parametrize("window", WINDOWS)
def test_decode_after_prefill_continues_the_parallel_form(window):
    q, k, v, fq, fk, gamma = [t.detach() if t is not None else None for t in make_inputs(1, 4, 2, 100, 8, 6, "hybrid")]
    full = hybrid_attention_parallel(q, k, v, fq, fk, gamma, 16, window)
    n = 70  # prompt length: the rest is decoded from the prefill state
    state = prefill_state(k[:, :, :n], v[:, :, :n], fk[:, :, :n], q.shape[1], 16, window)
    tail, _ = hybrid_attention_recurrent(q[:, :, n:], k[:, :, n:], v[:, :, n:], fq[:, :, n:], fk[:, :, n:],
                                         gamma, 16, window, state=state)
    assert_close("y decoded", full[:, :, n:], tail)


def test_bad_shapes_name_what_was_expected():
    q, k, v, fq, fk, gamma = make_inputs(1, 3, 2, 8, 4, 4, "hybrid")
    with pytest.raises(ValueError, match="Hkv dividing H"):
        hybrid_attention_parallel(q, k, v, fq, fk, gamma, 4)
    with pytest.raises(ValueError, match="window_size"):
        hybrid_attention_parallel(q[:, :2], k, v, None, None, None, 0)
