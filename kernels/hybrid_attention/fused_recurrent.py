"""The decode step of hybrid attention in Triton (../shared/design/lolcats.md §7).

Same function and state layout as `ring.hybrid_attention_ring_step` (the PyTorch step it is tested
against): for every (row, query head),
  1. keys leaving the window since the previous token -> S += fk v^T, z += fk (fp32),
  2. the new key, value and feature-mapped key -> their ring slot,
  3. y = (gamma sum_win e^{s - m} v + fq S) / (gamma sum_win e^{s - m} + fq z).
Three launches a layer (two when fq, fk come in computed), cut where the work changes shape:
  `_hedgehog_rows_kernel`  (head, 16 rows): phi_q, phi_k of the new token (with `hedgehog` only;
                           decode_maps.py);
  `_window_kernel`         (row, HP query heads of a GQA group): window scores and values, z, the
                           denominator, the ring;
  `_state_kernel`          (row, head, BV value columns): S advanced and read, y.
One program per (row, head) for everything (the kernel before 2026-12-07) was latency-bound: 255
registers a thread with spills, its window, maps and S phases one after the other, and every program
reading its head's map weights again (B times a step: at batch 64 on an H100, 57 of its 185 us a layer).
Here the maps read their weights once per 16 rows, and the S reads, the step's bulk, are spread over
D/BV programs per head that each load their tile first, in 62 registers. Keys leaving the window go
into S one outer product each: a dot over a terrace block held its operands' registers on every step.
A window program owns z, ring_fk of its HP query heads of one GQA group in row b, and reads the
group's ring keys and values once for all of them. In batch, HP is the whole group (one program per
query head read the keys G times and took 66 of the step's 135 us at batch 64 on an H100; a group
per program, 42 of 104); where the (row, group) programs are too few to fill the GPU, batch 1 above
all, HP is 1 (a group per program: 30 us a layer at batch 1, one head: 18). The group's first
program writes the new key and value: the ring has one slot more than the window ever holds, so that
write never lands on a slot another program still reads, in this launch or the state kernel's.

Every window kind the kernels implement is an interval ending at the query, starting at
`kernel_windows.window_start(p)` (the kind's rule from the registry, by its code KIND), so the keys
leaving at step p are the positions [start(p-1), start(p)); other kinds are refused before launch.

Feature maps: fq, fk come in computed, or (`hedgehog`) the step computes the Hedgehog maps of the
query and the new key (decode_maps.py). The mix gamma comes in, or (`window_factors`) as its logits,
whose sigmoid the window kernel takes.

Math is fp32: elementwise, plus exact ("ieee") fp32 dots for the maps, so the kernels match the
PyTorch step and run under TRITON_INTERPRET=1 on CPU.
Inputs may be fp32, fp16 or bf16; S, z, ring_fk and every sum stay fp32.
"""
import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .decode_maps import MAP_ROWS, HedgehogMaps, _hedgehog_rows_kernel
from .kernel_windows import kernel_code, window_start
from .ring import RingState


# Tiles and warps of the staged kernels, from the compiler's register report for sm_90 at the Llama-3-8B
# shape (terrace window of 64): none spills, and each in batch stays at most 128 registers a thread, so 16
# warps or more fit on a multiprocessor to hide the loads' latency (one kernel for the whole step took 255
# and spilled); a one-head window program, run only on grids too small for residency to matter, takes 136
STATE_TILE = 32  # S columns per `_state_kernel` program: 62 registers at 4 warps (64 columns: 94)
STATE_WARPS = 4
TILE_VALUES = 4096  # fp32 values in a state or map weight tile at most: fewer columns where F is larger
WINDOW_TILE = 16  # head-dim columns per loop step of `_window_kernel` with one head a program
GROUP_TILE = 8  # the same with a group, at most: 125 registers at GQA 4 (GQA 2 at 16 columns: 143)
WINDOW_WARPS = 4
WINDOW_VALUES = 4096  # heads x window x columns products per loop step at most: a group of 8 heads gets 4 columns
# `_window_kernel` takes a whole GQA group per program (its keys and values read once) where the batch
# gives at least this many (row, group) programs, and one head per program below it, where the grid
# would leave most of the GPU's multiprocessors (132 on an H100/H200) idle and registers do not limit
# residency. H100, Llama-3-8B layer step, us: batch 1 (8 groups) one head 18 vs a group 30; batch 16
# (128) 41 vs 48; batch 64 (512) 119 vs 104 (benchmarks/h100/generate/2026-12-07c)
GROUP_PROGRAMS = 256


@triton.jit
def _window_kernel(
    q_ptr, k_ptr, v_ptr, fq_ptr, fk_ptr, gamma_ptr, pos_ptr,
    k_state_ptr, ring_k_ptr, ring_v_ptr, ring_fk_ptr, out_ptr, query_ptr,
    scale,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, F: tl.constexpr, R: tl.constexpr,
    W: tl.constexpr, KIND: tl.constexpr, HAS_LINEAR: tl.constexpr, HAS_GAMMA: tl.constexpr,
    GAMMA_LOGITS: tl.constexpr, FSTRIDE: tl.constexpr, BF: tl.constexpr, BC: tl.constexpr, BV: tl.constexpr,
    HP: tl.constexpr, BG: tl.constexpr,
):
    """Everything of the step but S, per (row, HP query heads of one GQA group): for each head the
    window's softmax weights, z advanced by the keys leaving, the denominator den; and, by the group's
    first program, the new key/value in their ring slot. Writes out [HP,D] = (window part of y) / den (y
    itself without a linear branch) and query [HP,F] = phi_q / den, which `_state_kernel` finishes with
    S. The program's heads share the ring's keys and values, so it reads them once for all of them
    (products summed in fp32; tl.dot would need 16 heads, and its fp32 form held 170-255 registers a
    thread). HP = G: the whole group; HP = 1: one head, for batches too small to fill the GPU."""
    G: tl.constexpr = H // HKV
    PARTS: tl.constexpr = (G + HP - 1) // HP  # programs per group
    pid = tl.program_id(0)
    group = pid // PARTS  # flat (row, kv head) index
    part = pid % PARTS
    b = group // HKV
    hk = group % HKV
    offs_g = part * HP + tl.arange(0, BG)  # the program's heads within the group
    mask_g = (tl.arange(0, BG) < HP) & (offs_g < G)
    heads = b * H + hk * G + offs_g  # flat (row, query head) index of each head
    p = tl.load(pos_ptr + b)
    slot_new = p % R
    writes_ring = part == 0
    k_row = k_ptr + group * D
    v_row = v_ptr + group * D
    ring_k = ring_k_ptr + group * R * D
    ring_v = ring_v_ptr + group * R * D
    offs_c = tl.arange(0, BC)
    offs_f = tl.arange(0, BF)
    mask_gf = mask_g[:, None] & (offs_f < F)[None, :]

    den = tl.zeros([BG], dtype=tl.float32)
    moves = W == 0  # z changes: always for linear-only, else when keys leave the window
    if HAS_LINEAR:
        fq = tl.load(fq_ptr + heads[:, None] * FSTRIDE + offs_f[None, :], mask=mask_gf, other=0.0).to(tl.float32)
        fk_new = tl.load(fk_ptr + heads[:, None] * FSTRIDE + offs_f[None, :], mask=mask_gf, other=0.0).to(tl.float32)
        z = tl.load(k_state_ptr + heads[:, None] * F + offs_f[None, :], mask=mask_gf, other=0.0)
    if W > 0:
        # window scores: the old keys still inside, positions start .. p-1 (at slots j % R), then the new key
        start = tl.maximum(window_start(p, W, KIND), 0)
        held = start + offs_c
        in_window = held < p
        slots = held % R
        s = tl.zeros([BG, BC], dtype=tl.float32)
        s_new = tl.zeros([BG], dtype=tl.float32)
        for d0 in range(0, D, BV):
            offs_d = d0 + tl.arange(0, BV)
            mask_d = offs_d < D
            q_d = tl.load(q_ptr + heads[:, None] * D + offs_d[None, :], mask=mask_g[:, None] & mask_d[None, :],
                          other=0.0).to(tl.float32)
            k_d = tl.load(k_row + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            k_old = tl.load(ring_k + slots[:, None] * D + offs_d[None, :],
                            mask=in_window[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            s += tl.sum(q_d[:, None, :] * k_old[None, :, :], axis=2)
            s_new += tl.sum(q_d * k_d[None, :], axis=1)
        s = tl.where(in_window[None, :], s * scale, float("-inf"))
        s_new = s_new * scale
        m = tl.maximum(tl.max(s, axis=1), s_new)
        g = tl.full([BG], 1.0, dtype=tl.float32)
        if HAS_GAMMA:
            g = tl.load(gamma_ptr + hk * G + offs_g, mask=mask_g, other=1.0).to(tl.float32)
            if GAMMA_LOGITS:  # the mix's parameters: gamma = sigmoid, here rather than a launch of its own
                g = tl.sigmoid(g)
        a = tl.where(in_window[None, :], tl.exp(s - m[:, None]), 0.0) * g[:, None]  # [BG,BC]
        a_new = tl.exp(s_new - m) * g
        den += tl.sum(a, axis=1) + a_new
        leave_from = tl.maximum(window_start(p - 1, W, KIND), 0)  # positions leaving at this step
        leave_to = tl.where(p > 0, tl.maximum(window_start(p, W, KIND), 0), 0)
        moves = leave_to > leave_from
    if HAS_LINEAR:
        ring_fk = ring_fk_ptr + heads[:, None] * R * F + offs_f[None, :]
        if W > 0:
            for j in range(leave_from, leave_to):
                z += tl.load(ring_fk + (j % R) * F, mask=mask_gf, other=0.0)
            tl.store(ring_fk + slot_new * F, fk_new, mask=mask_gf)
        else:  # linear-only: the new key is linear for its own query
            z += fk_new
        tl.store(k_state_ptr + heads[:, None] * F + offs_f[None, :], z, mask=mask_gf & moves)
        den += tl.sum(fq * z, axis=1)
        den = tl.where(mask_g, den, 1.0)  # padding heads: no 0/0
        tl.store(query_ptr + heads[:, None] * F + offs_f[None, :], fq / den[:, None], mask=mask_gf)
    if W > 0:
        for v0 in range(0, D, BV):
            offs_v = v0 + tl.arange(0, BV)
            mask_v = offs_v < D
            v_new = tl.load(v_row + offs_v, mask=mask_v, other=0.0).to(tl.float32)
            v_window = tl.load(ring_v + slots[:, None] * D + offs_v[None, :],
                               mask=in_window[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
            y = (tl.sum(a[:, :, None] * v_window[None, :, :], axis=1) + a_new[:, None] * v_new[None, :]) / den[:, None]
            tl.store(out_ptr + heads[:, None] * D + offs_v[None, :], y.to(out_ptr.dtype.element_ty),
                     mask=mask_g[:, None] & mask_v[None, :])
            # the new key and value into their slot, which no key of this step's window occupies
            tl.store(ring_v + slot_new * D + offs_v, v_new.to(ring_v_ptr.dtype.element_ty), mask=mask_v & writes_ring)
        for d0 in range(0, D, BV):
            offs_d = d0 + tl.arange(0, BV)
            mask_d = offs_d < D
            tl.store(ring_k + slot_new * D + offs_d, tl.load(k_row + offs_d, mask=mask_d).to(ring_k_ptr.dtype.element_ty),
                     mask=mask_d & writes_ring)


@triton.jit
def _state_kernel(
    v_ptr, fk_ptr, pos_ptr, kv_state_ptr, ring_v_ptr, ring_fk_ptr, partial_ptr, query_ptr, y_ptr,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, F: tl.constexpr, R: tl.constexpr,
    W: tl.constexpr, KIND: tl.constexpr, FSTRIDE: tl.constexpr,
    BF: tl.constexpr, BV: tl.constexpr,
):
    """y for one (row, query head, BV value columns): S's columns advanced by the keys leaving the window
    (written back only then), y = partial + query S. S is loaded first, the step's one large read."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    hk = h // (H // HKV)
    offs_v = tl.program_id(1) * BV + tl.arange(0, BV)
    mask_v = offs_v < D
    offs_f = tl.arange(0, BF)
    mask_f = offs_f < F
    kv_state = kv_state_ptr + pid * F * D
    state = tl.load(kv_state + offs_f[:, None] * D + offs_v[None, :],
                    mask=mask_f[:, None] & mask_v[None, :], other=0.0)  # [BF,BV] fp32
    p = tl.load(pos_ptr + b)
    fq = tl.load(query_ptr + pid * F + offs_f, mask=mask_f, other=0.0)
    if W > 0:
        y = tl.load(partial_ptr + pid * D + offs_v, mask=mask_v, other=0.0)
        ring_v = ring_v_ptr + (b * HKV + hk) * R * D
        ring_fk = ring_fk_ptr + pid * R * F
        leave_from = tl.maximum(window_start(p - 1, W, KIND), 0)
        leave_to = tl.where(p > 0, tl.maximum(window_start(p, W, KIND), 0), 0)
        moves = leave_to > leave_from
        # one outer product per key leaving (sliding windows: one a step; terrace: a block, one step in W).
        # Not a dot over the block: its operand layouts would hold every step's registers for a rare path
        for j in range(leave_from, leave_to):
            fk_leaving = tl.load(ring_fk + (j % R) * F + offs_f, mask=mask_f, other=0.0)
            v_leaving = tl.load(ring_v + (j % R) * D + offs_v, mask=mask_v, other=0.0).to(tl.float32)
            state += fk_leaving[:, None] * v_leaving[None, :]
    else:  # linear-only: the new key enters S at once
        y = tl.zeros([BV], dtype=tl.float32)
        moves = True
        fk_new = tl.load(fk_ptr + pid * FSTRIDE + offs_f, mask=mask_f, other=0.0).to(tl.float32)
        v_new = tl.load(v_ptr + (b * HKV + hk) * D + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        state += fk_new[:, None] * v_new[None, :]
    tl.store(kv_state + offs_f[:, None] * D + offs_v[None, :], state, mask=mask_f[:, None] & mask_v[None, :] & moves)
    y += tl.sum(fq[:, None] * state, axis=0)
    tl.store(y_ptr + pid * D + offs_v, y.to(y_ptr.dtype.element_ty), mask=mask_v)


@dataclass(frozen=True)
class StepTiles:
    """Tiles and warps of the step's kernels; `benchmarks/gpu_decode_tiles.py` sweeps them."""
    state_tile: int = STATE_TILE  # S columns per `_state_kernel` program, at most
    state_warps: int = STATE_WARPS
    # head-dim columns per loop step of `_window_kernel`; None: WINDOW_TILE, or GROUP_TILE capped by WINDOW_VALUES
    window_tile: int | None = None
    window_warps: int = WINDOW_WARPS
    # query heads per `_window_kernel` program, at most the group; None: by GROUP_PROGRAMS
    window_heads: int | None = None


class Launch(NamedTuple):
    """One kernel launch of the step: the kernel, its grid, its compile-time arguments and warps."""
    kernel: triton.runtime.JITFunction
    grid: tuple[int, ...]
    constexprs: dict
    num_warps: int


@functools.lru_cache(maxsize=256)  # eager decoding asks every layer, every step, for the same few plans
def launches(B: int, H: int, Hkv: int, D: int, F: int, R: int, window_size: int, kind: int, linear: bool,
             maps: bool, gamma: bool, tiles: StepTiles = StepTiles(), gamma_logits: bool = False
             ) -> dict[str, Launch]:
    """The step's launches by name ("maps" with `maps`, "window", "state" with `linear`), in launch
    order; `benchmarks/decode_registers.py` compiles the same ones for the register report. Cached:
    callers must not change what it returns. `gamma_logits`: gamma comes as the mix's logits."""
    BF = max(16, triton.next_power_of_2(max(F, 1)))
    BV = min(tiles.state_tile, max(16, TILE_VALUES // BF), max(16, triton.next_power_of_2(D)))
    G = H // Hkv
    HP = min(tiles.window_heads or (G if B * Hkv >= GROUP_PROGRAMS else 1), G)
    BG = triton.next_power_of_2(HP)
    BC = max(16, triton.next_power_of_2(R - 1))
    window_tile = tiles.window_tile or (WINDOW_TILE if HP == 1 else min(GROUP_TILE, max(4, WINDOW_VALUES // (BG * BC))))
    window_BV = min(window_tile, triton.next_power_of_2(D))
    sizes = dict(H=H, HKV=Hkv, D=D, F=F, R=R, W=window_size, KIND=kind, FSTRIDE=2 * F if maps else F, BF=BF)
    plan = {}
    if maps:
        BH = max(16, triton.next_power_of_2(F // 2))
        plan["maps"] = Launch(_hedgehog_rows_kernel, (H, triton.cdiv(B, MAP_ROWS)),
                              dict(H=H, HKV=Hkv, D=D, F=F, BB=MAP_ROWS, BH=BH, BV=max(16, min(32, TILE_VALUES // 2 // BH))),
                              4)
    plan["window"] = Launch(_window_kernel, (B * Hkv * triton.cdiv(G, HP),),
                            dict(sizes, HAS_LINEAR=linear, HAS_GAMMA=gamma, GAMMA_LOGITS=gamma_logits,
                                 BC=BC, BV=window_BV, HP=HP, BG=BG),
                            tiles.window_warps)
    if linear:
        plan["state"] = Launch(_state_kernel, (B * H, triton.cdiv(D, BV)), dict(sizes, BV=BV), tiles.state_warps)
    return plan


def _decode_step_fwd(state: RingState, q, k, v, fq, fk, gamma, window_size: int, kind: int,
                     scale: float, hedgehog, tiles: StepTiles = StepTiles(), gamma_logits: bool = False
                     ) -> torch.Tensor:
    B, H, D = q.shape
    Hkv, R, F = k.shape[1], state.ring_k.shape[2], state.kv_state.shape[2]
    linear = fq is not None or hedgehog is not None
    plan = launches(B, H, Hkv, D, F, R, window_size, kind, linear, hedgehog is not None, gamma is not None, tiles,
                    gamma_logits)
    y = torch.empty_like(q)
    dummy = q  # for tensors a mode never reads (they may be empty, and CUDA refuses null pointers)
    if hedgehog is not None:
        features = torch.empty(B, H, 2, F, device=q.device, dtype=torch.float32)
        _launch(plan["maps"], q, k, *hedgehog[:2], features, B, hedgehog.eps)
        fq, fk = features[:, :, 0], features[:, :, 1]
    partial = torch.empty(B, H, D, device=q.device, dtype=torch.float32) if linear else y
    query = torch.empty(B, H, F, device=q.device, dtype=torch.float32) if linear else dummy
    linear_args = (fq, fk, state.kv_state, state.k_state, state.ring_fk) if linear else (dummy,) * 5
    _launch(plan["window"], q, k, v, *linear_args[:2], gamma if gamma is not None else dummy, state.positions,
            linear_args[3], state.ring_k, state.ring_v, linear_args[4], partial, query, scale)
    if linear:
        _launch(plan["state"], v, linear_args[1], state.positions, state.kv_state, state.ring_v, state.ring_fk,
                partial, query, y)
    return y


def _launch(launch: Launch, *args) -> None:
    launch.kernel[launch.grid](*args, **launch.constexprs, num_warps=launch.num_warps)


def _check_step_inputs(state: RingState, q, k, v, fq, fk, gamma, window: str, hedgehog) -> int:
    """-> KIND, the registry's code of `window`; ValueError for inputs the kernel cannot take."""
    kind = kernel_code(window, "fused decode step")
    B, H, D = q.shape
    Hkv = state.ring_k.shape[1]
    if k.shape != (B, Hkv, D) or v.shape != k.shape or H % Hkv:
        raise ValueError(f"expected q [B,H,D], k, v [B,Hkv,D] with Hkv={Hkv} dividing H; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    F = state.kv_state.shape[2]
    if hedgehog is not None:
        if fq is not None or fk is not None:
            raise ValueError("give fq, fk or hedgehog (the maps to apply), not both")
        shapes = [tuple(w.shape) for w in hedgehog[:2]]
        if len(shapes) != 2 or F % 2 or any(shape != (H, D, F // 2) for shape in shapes):
            raise ValueError(f"expected hedgehog W_q, W_k, each [H,D,F/2]=[{H},{D},{F // 2}]; got {shapes}")
    elif (fq is None) != (fk is None) or (fq is not None and (fq.shape != (B, H, F) or fk.shape != fq.shape)):
        raise ValueError(f"expected fq, fk [B,H,F]=[{B},{H},{F}] (or both None); got "
                         f"{None if fq is None else tuple(fq.shape)}, {None if fk is None else tuple(fk.shape)}")
    if state.kv_state.dtype != torch.float32 or state.ring_fk.dtype != torch.float32:
        raise ValueError("S, z and ring_fk must be fp32")
    if gamma is not None and gamma.shape != (H,):
        raise ValueError(f"expected gamma [H]={H}; got {tuple(gamma.shape)}")
    maps = hedgehog[:2] if hedgehog is not None else ()
    tensors = [t for t in (q, k, v, fq, fk, gamma, *maps, *state.tensors()) if t is not None]
    if any(not t.is_contiguous() for t in state.tensors()):
        raise ValueError("the ring state must be contiguous")
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all tensors must be on one device; got {sorted({str(t.device) for t in tensors})}")
    return kind


def fused_recurrent_hybrid_attention(
    state: RingState,
    q: torch.Tensor,  # [B,H,D] the new token's query (fp32, fp16 or bf16)
    k: torch.Tensor,  # [B,Hkv,D]
    v: torch.Tensor,  # [B,Hkv,D]
    fq: torch.Tensor | None,  # [B,H,F], None for window-only
    fk: torch.Tensor | None,  # [B,H,F]
    gamma: torch.Tensor | None,  # [H], None means 1
    window_size: int,  # w; 0 = linear-only
    window: str = "sliding",
    scale: float | None = None,
    hedgehog: HedgehogMaps | None = None,  # instead of fq, fk (which are then None)
    window_factors: torch.Tensor | None = None,  # [H] instead of gamma (then None): gamma = sigmoid(these)
) -> torch.Tensor:  # y [B,H,D] in q's dtype; `state` (S, z, rings, positions) advanced in place
    """Decode one token per row in two Triton launches (three with `hedgehog`); the arguments of
    `hybrid_attention_ring_step`, or with `hedgehog` instead of fq, fk: the Hedgehog feature maps
    computed by the step itself, and with `window_factors` instead of gamma: the mix's parameters,
    whose sigmoid the step takes itself (a model's decode step would otherwise launch one per layer)."""
    if gamma is not None and window_factors is not None:
        raise ValueError("give gamma or window_factors (its logits), not both")
    logits = window_factors is not None
    gamma = window_factors if logits else gamma
    kind = _check_step_inputs(state, q, k, v, fq, fk, gamma, window, hedgehog)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    contiguous = [t.contiguous() if t is not None else None for t in (q, k, v, fq, fk, gamma)]
    if hedgehog is not None:
        hedgehog = HedgehogMaps(hedgehog.weight_q.contiguous(), hedgehog.weight_k.contiguous(), hedgehog.eps)
    y = _decode_step_fwd(state, *contiguous, window_size, kind, scale, hedgehog, gamma_logits=logits)
    state.positions.add_(1)
    return y
