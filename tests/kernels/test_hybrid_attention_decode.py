"""The decode step in fixed-size buffers (../shared/design/lolcats.md §7).

The PyTorch ring step is held to the recurrent form of `recurrent.py` (rows at different
positions, as left padding leaves them); the fused Triton kernel (TRITON_INTERPRET=1 on CPU) is
held to the PyTorch ring step on outputs and on every state tensor, over steps that evict keys
into S (one per token for sliding windows, a whole block for terrace windows).
"""
import pytest
import torch

from kernels.hybrid_attention import (WINDOW_KINDS, RingState, fill_ring_state, fused_recurrent_hybrid_attention,
                                      hybrid_attention_recurrent, hybrid_attention_ring_step, ring_size)
from kernels.hybrid_attention.decode_maps import HedgehogMaps
from kernels.hybrid_attention.fused_recurrent import StepTiles, _decode_step_fwd, launches
from kernels.hybrid_attention.kernel_windows import kernel_code
from kernels.testing import TOLERANCE, assert_close
from pipeline.hybrid.feature_maps import PHI_EPS, HedgehogFeatureMap

# (B, H, Hkv, D, F, window_size, prompt length, decode steps)
SHAPES = [
    pytest.param(2, 4, 2, 8, 6, 4, 3, 7, id="gqa2-w4-short-prompt"),
    pytest.param(1, 3, 1, 16, 12, 4, 10, 7, id="gqa3-w4-long-prompt"),
    pytest.param(1, 4, 1, 128, 128, 16, 33, 2, id="gqa4-d128-f128"),
    pytest.param(1, 2, 1, 64, 128, 8, 17, 2, id="d64-f128"),
    pytest.param(3, 2, 2, 16, 8, 4, 9, 6, id="mha-b3"),  # one query head per group: a 16-row dot, 15 masked
    # head dims above 128: the step walks D in tiles of 32 (200: six and a masked one), unpadded; the
    # first step evicts a terrace block
    pytest.param(1, 4, 2, 256, 32, 16, 32, 2, id="gqa2-d256"),
    pytest.param(1, 2, 1, 200, 16, 8, 16, 2, id="d200"),
]
MODES = ["hybrid", "window_only", "linear_only"]
WINDOWS = sorted(WINDOW_KINDS)  # every registered kind: one the kernel lacks is refused, and fails here


def make_inputs(B, H, Hkv, T, D, F, mode, dtype=torch.float32):
    """q, k, v, fq, fk, gamma over T tokens; positive features as every feature map gives."""
    q, k, v = torch.randn(B, H, T, D, dtype=dtype), torch.randn(B, Hkv, T, D, dtype=dtype), torch.randn(B, Hkv, T, D, dtype=dtype)
    fq = torch.rand(B, H, T, F) + 0.05 if mode != "window_only" else None
    fk = torch.rand(B, H, T, F) + 0.05 if mode != "window_only" else None
    gamma = torch.rand(H) * 0.8 + 0.1 if mode == "hybrid" else None
    return q, k, v, fq, fk, gamma


def at(x: torch.Tensor | None, t: int) -> torch.Tensor | None:
    return None if x is None else x[:, :, t]


def token_per_row(x: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """[B,heads,T,X] -> [B,heads,X]: row b's token at index[b]."""
    return None if x is None else x[torch.arange(x.shape[0]), :, index]


def prefilled(q, k, v, fq, fk, window_size, window, prompt) -> RingState:
    B, H, _, D = q.shape
    state = RingState.empty(B, H, k.shape[1], D, 0 if fk is None else fk.shape[-1], ring_size(window_size, window),
                            dtype=k.dtype)
    fill_ring_state(state, torch.arange(B), k[:, :, :prompt], v[:, :, :prompt], None if fk is None else fk[:, :, :prompt],
                    window_size, window)
    return state


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("mode", MODES)
def test_ring_step_follows_the_recurrent_form_with_rows_at_different_positions(mode, window):
    """Row 0 has a 9-token prompt, row 1 a 2-token one (left padding leaves rows like that)."""
    H, Hkv, D, F, w, steps = 4, 2, 8, 6, 4, 9
    window_size = 0 if mode == "linear_only" else w
    prompts = [9, 2]
    q, k, v, fq, fk, gamma = make_inputs(2, H, Hkv, max(prompts) + steps, D, F, mode)
    state = RingState.empty(2, H, Hkv, D, 0 if fk is None else F, ring_size(window_size, window))
    for row, prompt in enumerate(prompts):
        rows = torch.tensor([row])
        fill_ring_state(state, rows, k[rows, :, :prompt], v[rows, :, :prompt],
                        None if fk is None else fk[rows, :, :prompt], window_size, window)
    ys = []
    for step in range(steps):
        index = torch.tensor(prompts) + step  # each row's own next token
        ys.append(hybrid_attention_ring_step(state, *(token_per_row(x, index) for x in (q, k, v, fq, fk)), gamma,
                                             window_size, window))
    for row, prompt in enumerate(prompts):
        row_inputs = [None if x is None else x[row:row + 1, :, :prompt + steps] for x in (q, k, v, fq, fk)]
        reference, _ = hybrid_attention_recurrent(*row_inputs, gamma, window_size, window)
        got = torch.stack([y[row] for y in ys], dim=1)  # [H,steps,D]
        assert_close(f"row {row} y", reference[0, :, prompt:], got)
    assert state.positions.tolist() == [p + steps for p in prompts]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,H,Hkv,D,F,w,prompt,steps", SHAPES)
def test_fused_kernel_matches_the_torch_step(B, H, Hkv, D, F, w, prompt, steps, mode, window):
    window_size = 0 if mode == "linear_only" else w
    q, k, v, fq, fk, gamma = make_inputs(B, H, Hkv, prompt + steps, D, F, mode)
    reference = prefilled(q, k, v, fq, fk, window_size, window, prompt)
    fused = RingState(*(t.clone() for t in reference.tensors()))
    for t in range(prompt, prompt + steps):
        args = (at(q, t), at(k, t), at(v, t), at(fq, t), at(fk, t), gamma, window_size, window)
        assert_close(f"y at {t}", hybrid_attention_ring_step(reference, *args), fused_recurrent_hybrid_attention(fused, *args))
    for name in ("kv_state", "k_state", "ring_k", "ring_v", "ring_fk"):
        assert_close(name, getattr(reference, name), getattr(fused, name))
    assert torch.equal(reference.positions, fused.positions)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("heads", [1, 2, 3, 4])
@pytest.mark.parametrize("H,Hkv", [(6, 2), (8, 2)], ids=["gqa3", "gqa4"])
def test_window_kernel_takes_any_number_of_a_groups_heads_per_program(H, Hkv, heads, mode, window):
    """The batch picks heads per program (GROUP_PROGRAMS): one head, a whole group, or a part of one
    (gqa3 with 2: a masked head in the second program); only the group's first program writes the ring."""
    B, D, F, w, prompt, steps = 2, 16, 8, 4, 6, 5
    window_size = 0 if mode == "linear_only" else w
    tiles = StepTiles(window_heads=heads)
    q, k, v, fq, fk, gamma = make_inputs(B, H, Hkv, prompt + steps, D, F, mode)
    reference = prefilled(q, k, v, fq, fk, window_size, window, prompt)
    fused = RingState(*(t.clone() for t in reference.tensors()))
    kind, scale = kernel_code(window, "fused decode step"), D ** -0.5
    for t in range(prompt, prompt + steps):
        args = tuple(None if x is None else x.contiguous() for x in (at(q, t), at(k, t), at(v, t), at(fq, t), at(fk, t)))
        expected = hybrid_attention_ring_step(reference, *args, gamma, window_size, window)
        got = _decode_step_fwd(fused, *args, gamma, window_size, kind, scale, None, tiles)
        assert_close(f"y at {t}", expected, got)
        fused.positions.add_(1)
    for name in ("kv_state", "k_state", "ring_k", "ring_v", "ring_fk"):
        assert_close(name, getattr(reference, name), getattr(fused, name))
    plan = launches(B, H, Hkv, D, F, fused.ring_k.shape[2], window_size, kind, mode != "window_only", False,
                    gamma is not None, tiles)
    per_program = min(heads, H // Hkv)
    assert plan["window"].constexprs["HP"] == per_program
    assert plan["window"].grid == (B * Hkv * -(-(H // Hkv) // per_program),)


def test_the_batch_picks_a_group_or_one_head_per_window_program():
    """Llama-3-8B's layer: 8 groups of 4 heads; 32 rows make 256 group programs, enough for the GPU."""
    def heads(batch):
        return launches(batch, 32, 8, 128, 128, 128, 64, 1, True, True, True)["window"].constexprs["HP"]
    assert [heads(b) for b in (1, 16, 31, 32, 64)] == [1, 1, 1, 4, 4]


@pytest.mark.parametrize("window", WINDOWS)
def test_fused_kernel_in_bfloat16(window):
    """bf16 q/k/v and ring, fp32 state: the kernel rounds only where the PyTorch step does."""
    B, H, Hkv, D, F, w, prompt, steps = 2, 4, 2, 16, 8, 4, 7, 6
    q, k, v, fq, fk, gamma = make_inputs(B, H, Hkv, prompt + steps, D, F, "hybrid", dtype=torch.bfloat16)
    reference = prefilled(q, k, v, fq, fk, w, window, prompt)
    fused = RingState(*(t.clone() for t in reference.tensors()))
    for t in range(prompt, prompt + steps):
        args = (at(q, t), at(k, t), at(v, t), at(fq, t), at(fk, t), gamma, w, window)
        y_ref, y_fused = hybrid_attention_ring_step(reference, *args), fused_recurrent_hybrid_attention(fused, *args)
        assert y_fused.dtype == torch.bfloat16
        assert_close(f"y at {t}", y_ref, y_fused, TOLERANCE[torch.bfloat16])
    assert_close("kv_state", reference.kv_state, fused.kv_state, TOLERANCE[torch.float16])


# (H, Hkv, D, F' of each Hedgehog half, window size): D 200 and F' 3 are masked tiles
HEDGEHOG_SHAPES = [pytest.param(4, 2, 16, 8, 4, id="gqa2-d16"), pytest.param(2, 1, 200, 3, 4, id="d200-half3"),
                   pytest.param(4, 1, 128, 64, 4, id="gqa4-d128-llama")]


def hedgehog_case(B, H, Hkv, D, half, window_size, window, prompt, steps, mode):
    """Inputs over prompt + steps tokens with Hedgehog features from real maps, (q, k, v, fq, fk, gamma,
    maps), and the state after the prompt twice: for the PyTorch step and for the kernel."""
    q, k, v, _, _, gamma = make_inputs(B, H, Hkv, prompt + steps, D, 2 * half, mode)
    map_q, map_k = (HedgehogFeatureMap(H, D, half, "kaiming") for _ in range(2))
    with torch.no_grad():
        fq, fk = map_q(q), map_k(k.repeat_interleave(H // Hkv, dim=1))
    reference = prefilled(q, k, v, fq, fk, window_size, window, prompt)
    maps = HedgehogMaps(map_q.weight.detach(), map_k.weight.detach(), PHI_EPS)
    return (q, k, v, fq, fk, gamma, maps), reference, RingState(*(t.clone() for t in reference.tensors()))


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("mode", ["hybrid", "linear_only"])
@pytest.mark.parametrize("H,Hkv,D,half,w", HEDGEHOG_SHAPES)
def test_fused_kernel_applies_the_hedgehog_map_itself(H, Hkv, D, half, w, mode, window):
    """Given the maps' weights instead of fq, fk, and the window factors instead of gamma (a HybridCache
    step on CUDA), the kernel computes phi_q(q), phi_k(k) and gamma = sigmoid(factors) itself: the same
    outputs and states as the PyTorch step given HedgehogFeatureMap's outputs and the sigmoid."""
    B, prompt, steps = 2, 2 * w + 1, 2 * w + 2  # the steps cross a terrace block boundary
    window_size = 0 if mode == "linear_only" else w
    (q, k, v, fq, fk, gamma, maps), reference, fused = hedgehog_case(B, H, Hkv, D, half, window_size, window,
                                                                     prompt, steps, mode)
    factors = None if gamma is None else torch.logit(gamma)
    for t in range(prompt, prompt + steps):
        y_ref = hybrid_attention_ring_step(reference, at(q, t), at(k, t), at(v, t), at(fq, t), at(fk, t), gamma,
                                           window_size, window)
        y_fused = fused_recurrent_hybrid_attention(fused, at(q, t), at(k, t), at(v, t), None, None, None, window_size,
                                                   window, hedgehog=maps, window_factors=factors)
        assert_close(f"y at {t}", y_ref, y_fused)
    for name in ("kv_state", "k_state", "ring_fk"):
        assert_close(name, getattr(reference, name), getattr(fused, name))


def test_fused_kernel_maps_rows_in_blocks():
    """The Hedgehog maps of the new token are computed for 16 rows a program: 19 rows take two programs
    per head, the second partly masked, and every row still gets its own features."""
    B, H, Hkv, D, half, w, prompt = 19, 2, 1, 16, 8, 4, 9
    (q, k, v, fq, fk, gamma, maps), reference, fused = hedgehog_case(B, H, Hkv, D, half, w, "sliding", prompt, 1,
                                                                     "hybrid")
    y_ref = hybrid_attention_ring_step(reference, at(q, prompt), at(k, prompt), at(v, prompt), at(fq, prompt),
                                       at(fk, prompt), gamma, w, "sliding")
    y_fused = fused_recurrent_hybrid_attention(fused, at(q, prompt), at(k, prompt), at(v, prompt), None, None, gamma,
                                               w, "sliding", hedgehog=maps)
    assert_close("y", y_ref, y_fused)
    for name in ("kv_state", "k_state", "ring_fk"):
        assert_close(name, getattr(reference, name), getattr(fused, name))


def test_fused_kernel_reads_maps_cast_to_bfloat16_as_fp32():
    """A model cast whole to bf16 after linearize hands the kernel bf16 weights: the values are used as they
    are, like HedgehogFeatureMap.forward does (weight.float())."""
    B, H, Hkv, D, half, w, prompt = 1, 2, 1, 16, 8, 4, 9
    q, k, v, _, _, gamma = make_inputs(B, H, Hkv, prompt + 1, D, 2 * half, "hybrid")
    map_q, map_k = (HedgehogFeatureMap(H, D, half, "kaiming").to(torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        fq, fk = map_q(q), map_k(k.repeat_interleave(H // Hkv, dim=1))
    reference = prefilled(q, k, v, fq, fk, w, "terrace", prompt)
    fused = RingState(*(t.clone() for t in reference.tensors()))
    y_ref = hybrid_attention_ring_step(reference, at(q, prompt), at(k, prompt), at(v, prompt), at(fq, prompt),
                                       at(fk, prompt), gamma, w, "terrace")
    maps = HedgehogMaps(map_q.weight.detach(), map_k.weight.detach(), PHI_EPS)
    y_fused = fused_recurrent_hybrid_attention(fused, at(q, prompt), at(k, prompt), at(v, prompt), None, None, gamma,
                                               w, "terrace", hedgehog=maps)
    assert_close("y", y_ref, y_fused)


def test_fused_kernel_refuses_maps_it_cannot_apply():
    q, k, v, fq, fk, gamma = make_inputs(1, 2, 1, 1, 8, 4, "hybrid")
    state = RingState.empty(1, 2, 1, 8, 4, ring_size(4, "sliding"))
    maps = HedgehogMaps(torch.randn(2, 8, 2), torch.randn(2, 8, 2), PHI_EPS)
    with pytest.raises(ValueError, match="not both"):
        fused_recurrent_hybrid_attention(state, at(q, 0), at(k, 0), at(v, 0), at(fq, 0), at(fk, 0), gamma, 4, hedgehog=maps)
    with pytest.raises(ValueError, match="gamma or window_factors"):
        fused_recurrent_hybrid_attention(state, at(q, 0), at(k, 0), at(v, 0), None, None, gamma, 4, hedgehog=maps,
                                         window_factors=torch.logit(gamma))
    with pytest.raises(ValueError, match=r"each \[H,D,F/2\]=\[2,8,2\]; got \[\(2, 8, 3\)"):
        fused_recurrent_hybrid_attention(state, at(q, 0), at(k, 0), at(v, 0), None, None, gamma, 4,
                                         hedgehog=HedgehogMaps(torch.randn(2, 8, 3), maps.weight_k, PHI_EPS))


def test_fused_kernel_names_what_it_does_not_know():
    q, k, v, fq, fk, gamma = make_inputs(1, 2, 1, 1, 8, 4, "hybrid")
    state = RingState.empty(1, 2, 1, 8, 4, ring_size(4, "sliding"))
    with pytest.raises(ValueError, match="unknown window kind 'dilated'"):
        fused_recurrent_hybrid_attention(state, at(q, 0), at(k, 0), at(v, 0), at(fq, 0), at(fk, 0), gamma, 4, "dilated")
    with pytest.raises(ValueError, match=r"expected q \[B,H,D\]"):
        fused_recurrent_hybrid_attention(state, at(q, 0), at(q, 0), at(v, 0), at(fq, 0), at(fk, 0), gamma, 4, "sliding")
