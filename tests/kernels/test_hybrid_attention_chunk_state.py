"""The state scans of the Triton chunk kernels (interpreter) against the states computed in PyTorch.

S_n = sum of fk^T v over key chunks <= n-2 and dS_m = sum of fq^T do/den over query chunks >= m+2
(chunk_state.py), at lengths of one chunk, several, and a ragged last chunk, stored for every chunk
or every 2nd / 4th one, with D one state tile (32) or four (256: Gemma-3's head dim).
"""
import pytest
import torch
import torch.nn.functional as F_

from kernels.hybrid_attention.chunk_state import chunk_states_bwd, chunk_states_fwd
from kernels.testing import assert_close

C = 16  # small chunks: many of them at a short T


def per_chunk(x: torch.Tensor, n: int) -> torch.Tensor:  # [B,H,T,X] -> [B,H,N,C,X], zero-padded
    return F_.pad(x, (0, 0, 0, n * C - x.shape[2])).view(*x.shape[:2], n, C, x.shape[-1])


@pytest.mark.parametrize("D", [32, 256])
@pytest.mark.parametrize("every", [1, 2, 4])
@pytest.mark.parametrize("T", [5, 100, 130])
def test_forward_states_are_the_sums_of_the_chunks_before_the_previous_one(T, every, D):
    B, H, Hkv, Fd = 2, 4, 2, 16
    fk, v = torch.rand(B, H, T, Fd), torch.randn(B, Hkv, T, D)
    n = -(-T // C)
    fkc, vc = per_chunk(fk, n), per_chunk(v.repeat_interleave(H // Hkv, 1), n)
    kv = torch.einsum("bhncf,bhncd->bhnfd", fkc, vc).cumsum(2)
    expect_s = F_.pad(kv, (0, 0, 0, 0, 2, 0))[:, :, :n]
    expect_z = F_.pad(fkc.sum(3).cumsum(2), (0, 0, 2, 0))[:, :, :n]
    states, zs = chunk_states_fwd(fk, v, torch.float32, C, every)
    assert_close("S", expect_s[:, :, ::every], states)
    assert_close("z", expect_z[:, :, ::every], zs)


@pytest.mark.parametrize("D", [32, 256])
@pytest.mark.parametrize("every", [1, 2, 4])
@pytest.mark.parametrize("T", [5, 100, 130])
def test_backward_states_are_the_sums_of_the_chunks_after_the_next_one(T, every, D):
    B, H, Fd = 2, 3, 16
    fq, do = torch.rand(B, H, T, Fd), torch.randn(B, H, T, D)
    den, delta = 1 + torch.rand(B, H, T), torch.randn(B, H, T)
    n = -(-T // C)
    fqc = per_chunk(fq, n)
    go = per_chunk(do / den[..., None], n)
    gz = per_chunk((delta / den)[..., None], n)

    def after_next(x: torch.Tensor) -> torch.Tensor:  # sums over chunks >= m+2, per chunk m
        suffix = x.flip(2).cumsum(2).flip(2)
        return F_.pad(suffix, (0, 0) * (x.dim() - 3) + (0, 2))[:, :, 2:]
    expect_ds = after_next(torch.einsum("bhncf,bhncd->bhnfd", fqc, go))
    expect_dz = after_next((fqc * gz).sum(3))
    dstates, dzs = chunk_states_bwd(fq, do, den, delta, C, every)
    assert_close("dS", expect_ds[:, :, ::every], dstates)
    assert_close("dz", expect_dz[:, :, ::every], dzs)
