"""The Triton chunk kernels (run by the interpreter here) held to the PyTorch chunked reference.

Same inputs and the same upstream gradient go through `hybrid_attention_parallel` and
`hybrid_attention_chunk`; outputs and the gradients of q, k, v, fq, fk and gamma are compared one by
one. The real-shape bf16 check runs on a GPU: benchmarks/gpu_attention_check.py.
"""
import pytest
import torch

from kernels.hybrid_attention import BACKENDS, hybrid_attention_chunk, hybrid_attention_parallel
from kernels.hybrid_attention import chunk as chunk_module
from kernels.hybrid_attention.chunk_blocks import check_dtype, linear_from, triton_chunk_size
from kernels.hybrid_attention.windows import WINDOW_KINDS, window_kind
from kernels.testing import SEQUENCE_SUM_TOLERANCE, assert_close
from pipeline.hybrid.attention import resolve_backend
from tests.helpers import make_inputs, window_for

# (B, H, Hkv, T, D, F, window_size): ragged lengths over several chunks, GQA ratios 1-3, a window
# shorter than the chunk (sliding 24 in chunks of 64), one as long (64), one longer (128).
SHAPES = [
    pytest.param(1, 2, 2, 1, 16, 16, 64, id="T1"),
    pytest.param(2, 4, 2, 200, 16, 16, 16, id="gqa2-T200-w16"),
    pytest.param(1, 3, 1, 130, 32, 16, 64, id="gqa3-T130-w64"),
    pytest.param(1, 2, 1, 300, 16, 32, 128, id="gqa2-T300-w128"),
]
MODES = ["hybrid", "window_only", "linear_only"]
WINDOWS = sorted(WINDOW_KINDS)  # every registered kind: one the kernels lack is refused, and fails here
# (D, F, mode, window, window_size): head dims of real models that are not powers of two >= 16 (8:
# stories260K, 80, 96: Phi-3) and feature dims that are not either, zero-padded to the kernels' tiles
# (8 -> 16, 24 -> 32, 80 and 96 -> 128; F 12 -> 16, 48 -> 64).
PADDED = [
    pytest.param(8, 12, "hybrid", "terrace", 32, id="D8-F12-terrace"),
    pytest.param(8, 12, "hybrid", "sliding", 24, id="D8-F12-sliding"),
    pytest.param(24, 16, "hybrid", "sliding", 16, id="D24-sliding"),
    pytest.param(24, 16, "window_only", "terrace", 64, id="D24-window-only"),
    pytest.param(80, 48, "hybrid", "sliding", 64, id="D80-F48-sliding"),
    pytest.param(96, 32, "hybrid", "terrace", 64, id="D96-terrace"),
    pytest.param(96, 32, "linear_only", "sliding", 0, id="D96-linear-only"),
]
# (D, F, mode, window, window_size): head dims above 128 (256: Gemma-3; 160 and 192 padded to 256),
# which the kernels split into two D tiles of 128; the window kinds and sizes give every local block
# pattern (linear pairs in the own chunk, in the previous one only, in neither).
WIDE = [
    pytest.param(256, 16, "hybrid", "terrace", 64, id="D256-terrace"),
    pytest.param(256, 32, "hybrid", "sliding", 24, id="D256-sliding"),
    pytest.param(256, 16, "window_only", "sliding", 128, id="D256-window-only"),
    pytest.param(256, 16, "linear_only", "terrace", 0, id="D256-linear-only"),
    pytest.param(160, 16, "hybrid", "sliding", 64, id="D160-sliding"),
    pytest.param(192, 48, "hybrid", "terrace", 32, id="D192-F48-terrace"),
    pytest.param(192, 16, "window_only", "terrace", 64, id="D192-window-only"),
    pytest.param(160, 16, "linear_only", "sliding", 0, id="D160-linear-only"),
]


def compare(inputs, window_size: int, window: str, ratio: float | None = None) -> None:
    given = [x for x in inputs if x is not None]
    ref = hybrid_attention_parallel(*inputs, window_size, window)
    upstream = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, given, upstream, allow_unused=True)
    out = hybrid_attention_chunk(*inputs, window_size, window)
    grads = torch.autograd.grad(out, given, upstream, allow_unused=True)
    assert_close("o", ref, out, ratio)
    names = [n for n, x in zip(("dq", "dk", "dv", "dfq", "dfk", "dgamma"), inputs) if x is not None]
    for name, r, g in zip(names, ref_grads, grads):
        if r is None:  # q and k do not reach a linear-only output
            assert g is None or not g.any(), f"{name}: nonzero gradient for an unused input"
            continue
        assert_close(name, r, g, max(ratio or 0.0, SEQUENCE_SUM_TOLERANCE) if name == "dgamma" else ratio)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,H,Hkv,T,D,F,w", SHAPES)
def test_kernel_matches_reference_values_and_gradients(B, H, Hkv, T, D, F, w, mode, window):
    compare(make_inputs(B, H, Hkv, T, D, F, mode), window_for(mode, w), window)


@pytest.mark.parametrize("every,dstate_every", [(1, 1), (4, 2), (2, 4)])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("mode", ["hybrid", "linear_only"])  # window-only has no states
def test_states_stored_every_few_chunks_give_the_same_values_and_gradients(mode, window, every, dstate_every,
                                                                            monkeypatch):
    """Chunks between stored states add the missing chunks as all-linear blocks (chunk.STATE_EVERY)."""
    monkeypatch.setattr(chunk_module, "STATE_EVERY", every)
    monkeypatch.setattr(chunk_module, "DSTATE_EVERY", dstate_every)
    compare(make_inputs(1, 2, 1, 260, 16, 16, mode), window_for(mode, 32), window)  # 5 chunks of 64


@pytest.mark.parametrize("D,F,mode,window,w", PADDED)
def test_dims_off_the_tiles_are_padded_without_changing_values_or_gradients(D, F, mode, window, w):
    """The default scale is D**-0.5 of the unpadded D, as in the reference; GQA 4:2 over three chunks."""
    compare(make_inputs(1, 4, 2, 130, D, F, mode), w, window)


@pytest.mark.parametrize("D,F,mode,window,w", WIDE)
def test_head_dims_above_128_run_in_d_tiles_with_the_same_values_and_gradients(D, F, mode, window, w, monkeypatch):
    """GQA 4:2 over four chunks (chunk 3 adds chunk 1 between its stored state and chunk 2), every buffer
    NaN-filled first: each D tile's program writes its columns, and tile 0's the per-query values."""
    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, nan_filled(getattr(torch, name)))
    compare(make_inputs(1, 4, 2, 200, D, F, mode), w, window)


@pytest.mark.parametrize("D", [16, 256])
def test_dims_on_the_tiles_reach_the_kernels_uncopied(monkeypatch, D):
    seen = []

    class Spy:
        @staticmethod
        def apply(q, k, v, fq, fk, *args):
            seen.extend((q, k, v, fq, fk))
            return torch.zeros_like(q)

    monkeypatch.setattr(chunk_module, "HybridAttentionChunkFunction", Spy)
    inputs = make_inputs(1, 4, 2, 10, D, 32, "hybrid")
    hybrid_attention_chunk(*inputs, 64, "sliding")
    assert all(a is b for a, b in zip(seen, inputs))


def nan_filled(allocate):
    def allocate_nan(*args, **kwargs):
        x = allocate(*args, **kwargs)
        return x.fill_(float("nan")) if x.is_floating_point() else x
    return allocate_nan


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("mode", MODES)
def test_every_element_of_the_buffers_the_kernels_fill_is_written(mode, window, monkeypatch):
    """Buffers come from torch.empty, empty_like and empty_strided; NaN-filled here, an element no kernel
    writes shows (such as rows of dk or dv whose group sum no program took, or a share a sum read
    that no program wrote: the last key chunk has no second dk share)."""
    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, nan_filled(getattr(torch, name)))
    compare(make_inputs(1, 4, 2, 150, 16, 16, mode), window_for(mode, 32), window)


def test_half_precision_inputs_accumulate_in_fp32():
    inputs = make_inputs(1, 2, 1, 150, 32, 32, "hybrid", dtype=torch.float16)
    compare(inputs, 64, "terrace", ratio=5e-3)


def test_non_contiguous_queries_and_keys_are_read_in_place():
    """The model hands over q, k, v as transposed views of [B,T,H,D]."""
    q, k, v, fq, fk, gamma = make_inputs(1, 4, 2, 100, 16, 16, "hybrid")
    views = [x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in (q, k, v)]
    assert not views[0].is_contiguous()
    compare([*views, fq, fk, gamma], 64, "sliding")


@pytest.mark.parametrize("window,size", [("terrace", 48), ("sliding", 256)])
def test_unsupported_windows_name_the_torch_backend(window, size):
    inputs = make_inputs(1, 2, 2, 10, 16, 16, "hybrid")
    with pytest.raises(ValueError, match="attention.backend: torch"):
        hybrid_attention_chunk(*inputs, size, window)


@pytest.mark.parametrize("D,F,refused", [(257, 16, "head dim"), (16, 512, "feature dim")])
def test_dims_beyond_the_tiles_are_refused(D, F, refused):
    """Head dims up to 256 run in D tiles (test_head_dims_above_128_...); F is never split."""
    inputs = make_inputs(1, 2, 2, 10, D, F, "hybrid")
    with pytest.raises(ValueError, match=rf"needs the {refused} to be in \[1, \d+\] .*: use attention.backend: torch"):
        hybrid_attention_chunk(*inputs, 64, "sliding")
    assert chunk_module.chunk_refusal(D, F, 64, "sliding", torch.device("cuda"), torch.bfloat16).startswith(
        f"the triton backend needs the {refused}")


def test_chunk_covers_the_window():
    assert triton_chunk_size(64, "terrace") == 64 and triton_chunk_size(24, "sliding") == 64
    assert triton_chunk_size(128, "sliding") == 128
    assert triton_chunk_size(0, "sliding") == 64


def test_auto_backend_is_the_kernel_on_cuda_and_torch_on_cpu():
    assert BACKENDS["triton"] is hybrid_attention_chunk
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda"), dtype=torch.bfloat16) == "triton"
    assert resolve_backend("auto", torch.device("cuda"), dtype=torch.float32) == "torch"  # refused there


def test_fp32_on_cuda_is_refused():
    """hybrid_attention_chunk adds the fix to every refusal (test_unsupported_windows_name_the_torch_backend)."""
    check_dtype(torch.device("cuda"), torch.bfloat16)
    check_dtype(torch.device("cpu"), torch.float32)  # the interpreter runs fp32 fine
    with pytest.raises(ValueError, match="not fp32"):
        check_dtype(torch.device("cuda"), torch.float32)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("window_size", [0, 16, 32, 64, 128])
def test_kernels_skip_exactly_the_local_blocks_without_linear_pairs(window, window_size):
    """linear_from names the nearest local block holding a linear pair; the kernels skip the nearer ones."""
    chunk = triton_chunk_size(window_size, window)
    i = torch.arange(chunk, 2 * chunk)[:, None]  # queries of chunk 1
    has_linear = []
    for j in (torch.arange(chunk, 2 * chunk)[None, :], torch.arange(chunk)[None, :]):  # own chunk, previous
        inside = window_kind(window).contains(i, j, window_size) if window_size else torch.zeros_like(i - j) > 0
        has_linear.append(bool(((j <= i) & ~inside).any()))
    expected = 0 if has_linear[0] else 1 if has_linear[1] else 2
    assert linear_from(window_size, window_kind(window).code, chunk) == expected
