"""The fused Hedgehog kernel (run by the interpreter here) held to the PyTorch map, and its wiring.

Same x, weight and upstream gradient go through `HedgehogFeatureMap` on repeat_kv(x) and through
`hedgehog_feature_map` on x itself; phi, dx and dweight are compared one by one. The real-shape
bf16 check runs on a GPU: benchmarks/gpu_feature_map.py.
"""
import pytest
import torch

from kernels.feature_maps import hedgehog_feature_map, hedgehog_kernel_takes
from kernels.testing import TOLERANCE, assert_close
from pipeline.hybrid import HybridAttention, HybridConfig
from pipeline.hybrid import attention as attention_module
from pipeline.hybrid import feature_maps as feature_maps_module
from pipeline.hybrid.attention import use_fused_feature_maps
from pipeline.hybrid.feature_maps import FEATURE_MAPS, PHI_EPS, HedgehogFeatureMap

# (B, H, Hx, T, D, F'): GQA groups 1-4 (Hx = H: queries), T ragged against the token block (128
# tokens, 32 at F' = 128; at D 256, in two D tiles of 128, 64 and 32), one to three blocks per row.
SHAPES = [
    pytest.param(1, 2, 2, 1, 16, 16, id="group1-T1"),
    pytest.param(2, 4, 2, 37, 16, 32, id="group2-T37"),
    pytest.param(1, 3, 1, 130, 32, 16, id="group3-T130"),
    pytest.param(2, 2, 2, 130, 32, 32, id="group1-T130"),
    pytest.param(1, 4, 1, 70, 16, 128, id="group4-T70-F128"),
    pytest.param(1, 4, 2, 130, 256, 32, id="group2-T130-D256"),
    pytest.param(1, 2, 2, 70, 256, 16, id="group1-T70-D256"),
    pytest.param(1, 4, 1, 37, 256, 128, id="group4-T37-D256-F128"),
]


def reference_map(H: int, D: int, F: int, scale: float = 1.0) -> HedgehogFeatureMap:
    feature_map = HedgehogFeatureMap(H, D, F, "kaiming")
    with torch.no_grad():
        feature_map.weight.mul_(scale)
    return feature_map


def compare(x: torch.Tensor, feature_map: HedgehogFeatureMap, ratio: float | None = None,
            eps: float = PHI_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and grads of the kernel vs the torch map (fp32, on fp32 copies of x); returns both phi."""
    weight = feature_map.weight
    x_ref = x.detach().float().requires_grad_(x.requires_grad)
    group = weight.shape[0] // x.shape[1]
    ref = feature_map(x_ref.repeat_interleave(group, dim=1))  # [B,H,T,2F']
    upstream = torch.randn_like(ref)
    leaves = [t for t in (x, weight) if t.requires_grad]
    ref_grads = torch.autograd.grad(ref, [t for t in (x_ref, weight) if t.requires_grad], upstream)
    out = hedgehog_feature_map(x, weight, eps)
    assert out.dtype == x.dtype
    grads = torch.autograd.grad(out, leaves, upstream.to(out.dtype))
    assert_close("phi", ref, out, ratio)
    names = [n for n, t in (("dx", x), ("dweight", weight)) if t.requires_grad]
    for name, r, g in zip(names, ref_grads, grads):
        assert g.dtype == (x.dtype if name == "dx" else weight.dtype), f"{name}: dtype {g.dtype}"
        assert_close(name, r, g, ratio)
    return ref.detach(), out.detach()


@pytest.mark.parametrize("B,H,Hx,T,D,F", SHAPES)
def test_kernel_matches_torch_map_values_and_gradients(B, H, Hx, T, D, F):
    compare(torch.randn(B, Hx, T, D, requires_grad=True), reference_map(H, D, F))


# stories260K, -, -, Phi-3, -, -: padded to 16, 32, 128, 128, 256 and 256 (two D tiles)
@pytest.mark.parametrize("D", [8, 24, 80, 96, 160, 192])
def test_head_dims_off_the_tiles_are_padded_without_changing_values_or_gradients(D):
    """Keys (Hx = 2 of H = 4) as the model hands them over, a transposed view, over two token blocks."""
    x = torch.randn(1, 130, 2, D).transpose(1, 2).requires_grad_()
    compare(x, reference_map(4, D, 32))


def test_transposed_view_is_read_in_place():
    """The model hands q and k over as [B,T,H,D] tensors transposed to [B,H,T,D]."""
    x = torch.randn(2, 50, 2, 16).transpose(1, 2).requires_grad_()  # [B,Hx,T,D], strides of [B,T,Hx,D]
    assert not x.is_contiguous()
    compare(x, reference_map(4, 16, 16))


@pytest.mark.parametrize("scale,eps", [pytest.param(40.0, PHI_EPS, id="sharp-maps"),
                                       pytest.param(1.0, 0.03, id="large-eps")])
def test_clamp_holds_values_and_blocks_their_gradient_like_torch(monkeypatch, scale, eps):
    """Sharp maps push many softmax values below 1e-12; a large eps (the reference's PHI_EPS raised
    with it) makes the blocked gradients of the clamped values large enough to tell apart."""
    monkeypatch.setattr(feature_maps_module, "PHI_EPS", eps)
    ref, out = compare(torch.randn(1, 2, 64, 16, requires_grad=True), reference_map(4, 16, 16, scale), eps=eps)
    clamped = ref <= eps
    assert clamped.float().mean() > 0.1, "the case should clamp a good share of phi"
    # relative RMS cannot see values of 1e-12 next to ones of 0.1: the clamped ones are checked alone
    torch.testing.assert_close(out[clamped], ref[clamped], rtol=1e-3, atol=0.0)


@pytest.mark.parametrize("frozen", ["x", "weight"])
def test_only_the_needed_gradient_is_computed(frozen):
    """Attention transfer trains the maps on a frozen LLM, LoRA the LLM with frozen maps."""
    feature_map = reference_map(4, 16, 16)
    x = torch.randn(1, 2, 40, 16, requires_grad=frozen != "x")
    feature_map.weight.requires_grad_(frozen != "weight")
    compare(x, feature_map)


def test_half_precision_accumulates_in_fp32():
    x = torch.randn(1, 2, 100, 32).half().requires_grad_()
    compare(x, reference_map(4, 32, 32), ratio=TOLERANCE[torch.float16])


@pytest.mark.parametrize("x_shape,weight_shape,match", [
    ((1, 2, 10, 16), (2, 16, 48), "feature dim F' to be a power of two"),  # zero logits would join the softmax
    ((1, 2, 10, 257), (2, 257, 16), "head dim D to be at most 256"),  # Gemma-3's 256 runs in two D tiles
    ((1, 3, 10, 16), (4, 16, 16), "Hx dividing H"),
])
def test_unsupported_inputs_are_refused_naming_the_torch_map(x_shape, weight_shape, match):
    with pytest.raises(ValueError, match=match) as error:
        hedgehog_feature_map(torch.randn(x_shape), torch.randn(weight_shape))
    if "dim" in match:
        assert "use the PyTorch feature map" in str(error.value)


def test_the_kernel_takes_every_head_dim_up_to_256_and_feature_dims_that_are_powers_of_two():
    assert all(hedgehog_kernel_takes(D, 64) for D in (1, 8, 24, 80, 96, 128, 160, 192, 256))
    assert not hedgehog_kernel_takes(257, 64)
    assert not any(hedgehog_kernel_takes(96, F) for F in (8, 48, 256))


def test_integer_inputs_are_refused():
    with pytest.raises(ValueError, match="takes x in"):
        hedgehog_feature_map(torch.ones(1, 2, 10, 16, dtype=torch.int32), torch.randn(2, 16, 16))


CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize("backend,device,dtype,expected", [
    ("triton", CUDA, torch.bfloat16, True),
    ("triton", CUDA, torch.float16, True),
    ("triton", CUDA, torch.float32, False),  # fp32 on CUDA stays on PyTorch, like the chunk kernels
    ("torch", CUDA, torch.bfloat16, False),
    ("triton", CPU, torch.float32, False),  # the interpreter and the DVC pipeline: PyTorch maps
    ("triton", CPU, torch.bfloat16, False),
    ("torch", CPU, torch.float32, False),
])
def test_fused_maps_are_chosen_only_beside_the_triton_attention_on_cuda_half(backend, device, dtype, expected):
    assert use_fused_feature_maps(backend, device, dtype) is expected


def test_maps_without_a_kernel_stay_on_torch_when_fusion_is_allowed():
    feature_map = FEATURE_MAPS["t2r"](4, 16, 16, "kaiming")
    assert feature_map.fused_kernel is None
    x = torch.randn(1, 2, 20, 16)
    assert torch.equal(feature_map.grouped(x, fused=True), feature_map(x.repeat_interleave(2, dim=1)))


def test_grouped_hedgehog_runs_the_kernel_when_fused():
    feature_map = reference_map(4, 16, 16)
    x = torch.randn(1, 2, 20, 16)
    fused, torch_map = feature_map.grouped(x, fused=True), feature_map.grouped(x, fused=False)  # [B,4,T,32]
    assert not torch.equal(fused, torch_map)  # different summation order: the kernel did run
    assert_close("phi", torch_map, fused)


def layer_inputs(H=4, Hkv=2, T=30, D=16):
    q = torch.randn(1, T, H, D).transpose(1, 2)  # [B,H,T,D] views, as the model hands them over
    k = torch.randn(1, T, Hkv, D).transpose(1, 2)
    v = torch.randn(1, T, Hkv, D).transpose(1, 2)
    return q, k, v


def test_features_on_cpu_are_exactly_the_torch_maps():
    """CPU results (the DVC pipeline's) are bit for bit those of phi_q(q), phi_k(repeat_kv(k))."""
    hybrid = HybridAttention(HybridConfig(feature_dim=16, feature_init="kaiming"), num_heads=4, head_dim=16)
    q, k, _ = layer_inputs()
    for backend in ("torch", "triton"):
        fq, fk = hybrid.features(q, k, backend)
        assert torch.equal(fq, hybrid.feature_map_q(q))
        assert torch.equal(fk, hybrid.feature_map_k(k.repeat_interleave(2, dim=1)))


def test_forward_hands_the_resolved_backend_to_the_feature_maps(monkeypatch):
    """forward resolves the backend first; the maps see it with the inputs' device and dtype."""
    seen = []

    def spy(backend, device, dtype):
        seen.append((backend, device.type, dtype))
        return True  # as on CUDA in bf16: the Hedgehog maps take their kernel, on un-repeated keys

    kernel_inputs = []

    def kernel(x, weight, eps):
        kernel_inputs.append(x.shape[1])
        return hedgehog_feature_map(x, weight, eps)

    monkeypatch.setattr(attention_module, "use_fused_feature_maps", spy)
    monkeypatch.setattr(HedgehogFeatureMap, "fused_kernel", staticmethod(kernel))
    # the attention itself is not under test here (the chunk kernel has its own tests)
    monkeypatch.setattr(attention_module, "hybrid_attention", lambda q, *args: torch.zeros_like(q))
    hybrid = HybridAttention(HybridConfig(feature_dim=16, backend="triton"), num_heads=4, head_dim=16)
    q, k, v = layer_inputs()
    hybrid(q, k, v, scale=0.25)
    assert seen == [("triton", "cpu", torch.float32)]
    assert kernel_inputs == [4, 2]  # q with its 4 heads, k un-repeated with 2


def test_hedgehog_shapes_the_kernel_refuses_stay_on_torch():
    """feature_dim 8 is a valid config for the attention kernel (F = 16): the map falls back, not fails."""
    feature_map = reference_map(4, 16, 8)
    assert not feature_map.kernel_takes_shape()
    x = torch.randn(1, 2, 20, 16)
    assert torch.equal(feature_map.grouped(x, fused=True), feature_map(x.repeat_interleave(2, dim=1)))
