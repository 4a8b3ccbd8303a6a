"""The Hedgehog feature map fused in Triton: one kernel forward, two backward.

Same function as `pipeline.hybrid.feature_maps.HedgehogFeatureMap` (../shared/design/lolcats.md §1.2),
the PyTorch reference it is tested against. For query head h with W_h [D,F']:
    u = x W_h,   phi = max([softmax(u), softmax(-u)], eps)     ([B,H,T,2F'], each half its own softmax)
x is [B,Hx,T,D] with Hx dividing H, and query head h reads x head h // (H // Hx): keys go in
un-repeated, so GQA's repeat_kv copy never exists. u is accumulated in fp32 (dot operands in x's
dtype, W rounded to it), softmax and clamp run in fp32, phi is stored in x's dtype.

Kernels, in the order a training step runs them:
  _fwd_kernel     program (token block, b, x head): loads the x tile once, then per query head of
                  its group computes u, both softmaxes and stores phi. Only x and W are kept for the
                  backward: recomputing u costs a small matmul, storing it would cost memory traffic.
  _bwd_dx_kernel  program (token block, b, x head): per query head recomputes u and the softmax
                  halves, du = a (g+ - <g+, a>) - c (g- - <g-, c>) with g zeroed where the clamp held
                  (torch's clamp passes the gradient where the value >= eps), and sums du W_h^T over
                  the group in fp32 registers before one store of dx in x's dtype.
  _bwd_dw_kernel  program (slice of the B*T token blocks, query head): dW_h partial = sum x^T du in
                  fp32 registers; torch sums the partials of the slices. Partials instead of fp32
                  atomics: each weight element gets B*T/BT updates, which atomics would serialise on
                  one address and add in a different order every run; partials keep dW deterministic
                  (same numbers on every rerun) for a buffer of (slices x H x D x F') fp32, 18 MB
                  at the Llama-3-8B shape on an H100.
dx and dW come from separate kernels because one program cannot hold both: dx sums over the query
heads of a group per token block, dW over all token blocks per query head.

Head dims that are not powers of two >= 16 (8: stories260K, 80, 96: Phi-3, 160, 192) are
zero-padded up to one, in x and in W's rows, by `hedgehog_feature_map`: the zeros add nothing to
u = x W_h, and the pad outside the autograd function slices dx and dW back. A padded D above
D_TILE (256: Gemma-3) is split into D tiles: u = x W_h sums the tiles' dots, tile 0 first (with
one tile, the only one; the x tile loaded once is tile 0, the further ones are loaded with each
W_h), and dx and dW, which have D columns or rows, run one program per D tile (grid axis 2), each
recomputing u. F' is not padded, since zero columns of u would be logits of the softmaxes: it must
be a power of two itself, and it is never split.
"""
import torch
import torch.nn.functional as F_
import triton
import triton.language as tl

from ..strides import bht_strides

# D and F' are tl.dot dimensions (>= 16) and block shapes (powers of two), D after padding. F' is one
# tile: above 128 the backward's fp32 [tokens, F'] tiles no longer fit in registers. D is cut into
# tiles of D_TILE, the widest the kernels were measured at (H100, D 128), so that a program at D 256
# holds the tiles of one at D 128; unmeasured on a GPU at 256, the largest head dim in use (Gemma-3).
MIN_DIM, MAX_FEATURE_DIM, MAX_HEAD_DIM, D_TILE = 16, 128, 256, 128
# Floats the kernel takes on CUDA. fp32 is refused there as by the chunk attention kernels (which met
# illegal memory accesses with fp32 tiles on an H100, triton 3.6): fp32 models keep the PyTorch maps.
CUDA_DTYPES = (torch.bfloat16, torch.float16)


@triton.jit
def _tile(ptr, t, t_ok, stride_t, cols):
    """Rows t (masked by t_ok, zero beyond) and columns `cols` of a [T, X] matrix at ptr."""
    return tl.load(ptr + t[:, None] * stride_t + cols[None, :], mask=t_ok[:, None], other=0.0)


@triton.jit
def _softmax_pair(u):
    """u [BT,F'] fp32 -> (softmax(u), softmax(-u)) along F', fp32; max(-u) = -min(u)."""
    pos = tl.exp(u - tl.max(u, 1)[:, None])
    neg = tl.exp(tl.min(u, 1)[:, None] - u)
    return pos / tl.sum(pos, 1)[:, None], neg / tl.sum(neg, 1)[:, None]


@triton.jit
def _grad_u(u, dphi_ptr, t, t_ok, stride_t, f, F: tl.constexpr, eps):
    """du [BT,F'] fp32 of one query head from its recomputed u [BT,F'] and dphi read at dphi_ptr."""
    a, c = _softmax_pair(u)
    g_pos = _tile(dphi_ptr, t, t_ok, stride_t, f).to(tl.float32)
    g_neg = _tile(dphi_ptr + F, t, t_ok, stride_t, f).to(tl.float32)
    g_pos = tl.where(a >= eps, g_pos, 0.0)
    g_neg = tl.where(c >= eps, g_neg, 0.0)
    return a * (g_pos - tl.sum(g_pos * a, 1)[:, None]) - c * (g_neg - tl.sum(g_neg * c, 1)[:, None])


@triton.jit
def _weight(W, h, d, f, D: tl.constexpr, F: tl.constexpr, dtype: tl.constexpr):
    """Rows d of W_h [D,F'] of a contiguous [H,D,F'] weight, as dot operand in `dtype`."""
    return tl.load(W + h * D * F + d[:, None] * F + f[None, :]).to(dtype)


@triton.jit
def _logits(x, w, X, t, t_ok, stride_t, W, h, f, D: tl.constexpr, F: tl.constexpr, BD: tl.constexpr,
            ND: tl.constexpr):
    """u = x W_h [BT,F'] fp32 of the token rows t of X: x [BT,BD] and w [BD,F'] are D tile 0 of them
    (the caller's), the further tiles are loaded here."""
    u = tl.dot(x, w)
    for kt in tl.static_range(1, ND):
        d = tl.arange(kt * BD, (kt + 1) * BD)
        u = tl.dot(_tile(X, t, t_ok, stride_t, d), _weight(W, h, d, f, D, F, x.dtype), u)
    return u


@triton.jit
def _own_tile(d, BD: tl.constexpr, ND: tl.constexpr):
    """The columns of this program's D tile (grid axis 2); d, tile 0, when there is one tile."""
    if ND == 1:
        return d
    else:
        return tl.program_id(2) * BD + d


@triton.jit
def _fwd_kernel(
    X, W, PHI, sxb, sxh, sxt, spb, sph, spt, T, eps,
    HX: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BT: tl.constexpr,
    BD: tl.constexpr, ND: tl.constexpr,
):
    pid_t, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hx = (pid_bh // HX).to(tl.int64), (pid_bh % HX).to(tl.int64)
    t = pid_t * BT + tl.arange(0, BT)
    t_ok = t < T
    t = t.to(tl.int64)  # row offsets t * stride reach past 2^31 at long contexts
    d, f = tl.arange(0, BD), tl.arange(0, F)  # d: D tile 0
    x_ptr = X + b * sxb + hx * sxh
    x = _tile(x_ptr, t, t_ok, sxt, d)
    for g in range(GROUP):
        h = hx * GROUP + g
        a, c = _softmax_pair(_logits(x, _weight(W, h, d, f, D, F, X.dtype.element_ty), x_ptr, t, t_ok, sxt, W, h, f,
                                     D, F, BD, ND))
        out = PHI + b * spb + h * sph + t[:, None] * spt + f[None, :]
        tl.store(out, tl.maximum(a, eps).to(PHI.dtype.element_ty), mask=t_ok[:, None])
        tl.store(out + F, tl.maximum(c, eps).to(PHI.dtype.element_ty), mask=t_ok[:, None])


@triton.jit
def _bwd_dx_kernel(
    X, W, DPHI, DX, sxb, sxh, sxt, sgb, sgh, sgt, sdb, sdh, sdt, T, eps,
    HX: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BT: tl.constexpr,
    BD: tl.constexpr, ND: tl.constexpr,
):
    pid_t, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hx = (pid_bh // HX).to(tl.int64), (pid_bh % HX).to(tl.int64)
    t = pid_t * BT + tl.arange(0, BT)
    t_ok = t < T
    t = t.to(tl.int64)
    d, f = tl.arange(0, BD), tl.arange(0, F)  # d: D tile 0
    dd = _own_tile(d, BD, ND)  # this program's columns of dx
    DT = X.dtype.element_ty
    x_ptr = X + b * sxb + hx * sxh
    x = _tile(x_ptr, t, t_ok, sxt, d)
    dx = tl.zeros([BT, BD], dtype=tl.float32)
    for g in range(GROUP):
        h = hx * GROUP + g
        w = _weight(W, h, d, f, D, F, DT)
        dphi_ptr = DPHI + b * sgb + h * sgh
        du = _grad_u(_logits(x, w, x_ptr, t, t_ok, sxt, W, h, f, D, F, BD, ND), dphi_ptr, t, t_ok, sgt, f, F, eps)
        dx += tl.dot(du.to(DT), tl.trans(w if ND == 1 else _weight(W, h, dd, f, D, F, DT)))
    tl.store(DX + b * sdb + hx * sdh + t[:, None] * sdt + dd[None, :], dx.to(DX.dtype.element_ty),
             mask=t_ok[:, None])


@triton.jit
def _bwd_dw_kernel(
    X, W, DPHI, DW_PART, sxb, sxh, sxt, sgb, sgh, sgt, T, n_blocks, blocks_per_program, eps,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, F: tl.constexpr, BT: tl.constexpr,
    BD: tl.constexpr, ND: tl.constexpr,
):
    pid_s, h = tl.program_id(0), tl.program_id(1).to(tl.int64)
    hx = h // GROUP
    d, f = tl.arange(0, BD), tl.arange(0, F)  # d: D tile 0
    dd = _own_tile(d, BD, ND)  # this program's rows of dW
    DT = X.dtype.element_ty
    w = _weight(W, h, d, f, D, F, DT)
    t_blocks = tl.cdiv(T, BT)
    acc = tl.zeros([BD, F], dtype=tl.float32)
    first = pid_s * blocks_per_program
    for block in range(first, tl.minimum(first + blocks_per_program, n_blocks)):  # token blocks of every row b
        b = (block // t_blocks).to(tl.int64)
        t = (block % t_blocks) * BT + tl.arange(0, BT)
        t_ok = t < T
        t = t.to(tl.int64)
        x_ptr = X + b * sxb + hx * sxh
        x = _tile(x_ptr, t, t_ok, sxt, d)
        dphi_ptr = DPHI + b * sgb + h * sgh
        du = _grad_u(_logits(x, w, x_ptr, t, t_ok, sxt, W, h, f, D, F, BD, ND), dphi_ptr, t, t_ok, sgt, f, F, eps)
        acc += tl.dot(tl.trans(x if ND == 1 else _tile(x_ptr, t, t_ok, sxt, dd)), du.to(DT))
    tl.store(DW_PART + (pid_s * H + h) * D * F + dd[:, None] * F + f[None, :], acc)


def _meta(x: torch.Tensor, weight: torch.Tensor) -> dict:
    H, D, F = weight.shape
    # Token blocks: on an H100 (triton 3.6, Llama-3-8B shape, F' = 64) 128 tokens ran the dx kernel of
    # grouped keys 1.6x and the dW kernel 1.8x faster than 64. At F' = 128 (D 128) the dx kernel's
    # pipelined loop over a GQA group needed 240 KB of shared memory with 64 (the H100 has 227 KB),
    # and the backward's six fp32 [BT,F'] tiles would spill from registers: 32 there.
    # Eight warps: four met illegal memory accesses in the chunk attention kernels there.
    BD = min(D, D_TILE)
    meta = dict(GROUP=H // x.shape[1], D=D, F=F, BT=128 if F <= 64 else 32, BD=BD, ND=D // BD, num_warps=8)
    if D > D_TILE:
        # Each loop step loads two D tiles of x instead of one, and the three pipeline stages of its
        # loads would need 270-400 KB of shared memory at F' <= 64 (ptxas, sm_90). 64 tokens (as many x
        # values as 128 at D 128) in two stages need at most 160 KB, without spills. Not run on a GPU.
        meta.update(BT=min(meta["BT"], 64), num_stages=2)
    return meta


def _dw_slices(n_blocks: int, heads: int, device: torch.device) -> int:
    """Slices of the token blocks per head: enough programs for ~4 per SM, no more partials than that.

    On CPU (the interpreter) 8 programs, so tests with a few blocks still sum several partials.
    """
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(n_blocks, triton.cdiv(programs, heads)))


def hedgehog_feature_map_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [B,Hx,T,D], weight [H,D,F'] contiguous -> phi [B,H,T,2F'] in x's dtype."""
    B, HX, T, _ = x.shape
    H, _, F = weight.shape
    phi = torch.empty(B, H, T, 2 * F, device=x.device, dtype=x.dtype)
    meta = _meta(x, weight)
    _fwd_kernel[(triton.cdiv(T, meta["BT"]), B * HX)](
        x, weight, phi, *bht_strides(x), *bht_strides(phi), T, eps, HX=HX, **meta)
    return phi


def hedgehog_feature_map_bwd(x: torch.Tensor, weight: torch.Tensor, dphi: torch.Tensor, eps: float,
                             need_dx: bool = True, need_dweight: bool = True
                             ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """-> dx [B,Hx,T,D] in x's dtype, dweight [H,D,F'] fp32; None where not needed.

    Attention transfer needs only dweight (the LLM is frozen), LoRA training only dx (maps frozen).
    """
    B, HX, T, D = x.shape
    H, _, F = weight.shape
    if dphi.stride(-1) != 1:  # e.g. the expanded gradient of a sum
        dphi = dphi.contiguous()
    meta = _meta(x, weight)
    dx = dweight = None
    if need_dx:
        dx = torch.empty_strided(x.shape, x.stride(), device=x.device, dtype=x.dtype)
        _bwd_dx_kernel[(triton.cdiv(T, meta["BT"]), B * HX, meta["ND"])](
            x, weight, dphi, dx, *bht_strides(x), *bht_strides(dphi), *bht_strides(dx), T, eps, HX=HX, **meta)
    if need_dweight:
        n_blocks = B * triton.cdiv(T, meta["BT"])
        slices = _dw_slices(n_blocks, H, x.device)
        partials = torch.empty(slices, H, D, F, device=x.device, dtype=torch.float32)
        _bwd_dw_kernel[(slices, H, meta["ND"])](
            x, weight, dphi, partials, *bht_strides(x), *bht_strides(dphi), T, n_blocks,
            triton.cdiv(n_blocks, slices), eps, H=H, **meta)
        dweight = partials.sum(0)
    return dx, dweight


class HedgehogFeatureMapFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return hedgehog_feature_map_fwd(x, weight, eps)

    @staticmethod
    def backward(ctx, dphi):
        x, weight = ctx.saved_tensors
        dx, dweight = hedgehog_feature_map_bwd(x, weight, dphi, ctx.eps, *ctx.needs_input_grad[:2])
        return dx, None if dweight is None else dweight.to(weight.dtype), None


def _kernel_feature_dim(dim: int) -> bool:
    return MIN_DIM <= dim <= MAX_FEATURE_DIM and not dim & (dim - 1)


def _padded_dim(dim: int) -> int:
    return max(MIN_DIM, triton.next_power_of_2(dim))


def hedgehog_kernel_takes(head_dim: int, feature_dim: int) -> bool:
    """Whether the kernels take maps of this shape (the model falls back to PyTorch where not)."""
    return 1 <= head_dim <= MAX_HEAD_DIM and _kernel_feature_dim(feature_dim)


def check_hedgehog_inputs(x: torch.Tensor, weight: torch.Tensor) -> None:
    """Shapes, sizes and dtypes the kernels take; each refusal says what to use instead."""
    if x.dim() != 4 or weight.dim() != 3 or x.shape[-1] != weight.shape[1] or weight.shape[0] % x.shape[1]:
        raise ValueError(f"expected x [B,Hx,T,D] and weight [H,D,F'] with Hx dividing H; got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}")
    D, F = weight.shape[1:]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"the fused Hedgehog kernel needs the head dim D to be at most {MAX_HEAD_DIM} (padded to "
                         f"a power of two, split into tiles of {D_TILE} above {D_TILE}); got {D}: use the PyTorch "
                         "feature map (attention.backend: torch)")
    if not _kernel_feature_dim(F):
        raise ValueError(f"the fused Hedgehog kernel needs the feature dim F' to be a power of two in "
                         f"[{MIN_DIM}, {MAX_FEATURE_DIM}] (one tile, whose fp32 tiles of the backward must fit in "
                         f"registers); got {F}: use the PyTorch feature map (attention.backend: torch)")
    if x.device != weight.device:
        raise ValueError(f"x and weight must be on one device; got {x.device}, {weight.device}")
    allowed = CUDA_DTYPES if x.device.type == "cuda" else (*CUDA_DTYPES, torch.float32)
    if x.dtype not in allowed:
        raise ValueError(f"the fused Hedgehog kernel takes x in {[str(t) for t in allowed]} on {x.device.type}; "
                         f"got {x.dtype}: cast the model to bf16, or use the PyTorch feature map "
                         "(attention.backend: torch)")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point; got {weight.dtype}")


def hedgehog_feature_map(
    x: torch.Tensor,  # [B,Hx,T,D] post-RoPE queries (Hx = H) or un-repeated keys (Hx = Hkv); last dim contiguous
    weight: torch.Tensor,  # [H,D,F'] the per-head maps (fp32 master weights)
    eps: float = 1e-12,
) -> torch.Tensor:  # [B,H,T,2F'] in x's dtype
    """phi = max([softmax(x W_h), softmax(-x W_h)], eps) per query head h, reading x head h // (H // Hx).

    Differentiable in x (dx in x's dtype, summed over each group in fp32) and weight (fp32 sums
    over B and T, returned in weight's dtype). D up to 256, zero-padded to a power of two >= 16
    where it is not one (a copy of x) and split into tiles of 128 above 128; F' a power of two in
    [16, 128]; bf16/fp16 on CUDA, fp32 too under TRITON_INTERPRET=1 on CPU. Any strides whose last
    is 1 are read in place.
    """
    check_hedgehog_inputs(x, weight)
    pad = _padded_dim(x.shape[-1]) - x.shape[-1]
    if pad:
        x, weight = F_.pad(x, (0, pad)), F_.pad(weight, (0, 0, 0, pad))
    if x.stride(-1) != 1:
        x = x.contiguous()
    return HedgehogFeatureMapFunction.apply(x, weight.contiguous(), eps)
