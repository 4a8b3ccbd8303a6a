"""Recurrent (decode) form of hybrid attention in plain PyTorch (../shared/design/lolcats.md §7).

State per sequence: the linear state S = sum fk_j v_j^T [H,F,D] and z = sum fk_j [H,F] (fp32) over
keys that have left the window, plus a ring of the keys still inside it (k, v per key/value head,
fk per query head). Its size depends on the window, never on the context length.

Window semantics follow the model's own window kind exactly: a sliding window keeps the last w
keys; a terrace window keeps the current and the previous w-block (up to 2w keys) and moves a
whole block into S when a new block starts. So this form equals `parallel.py` token for token for
both kinds (upstream decodes terrace-trained models with a sliding window; we do not).
"""
from dataclasses import dataclass

import torch

from .naive import check_inputs
from .windows import window_kind


@dataclass
class HybridState:
    kv_state: torch.Tensor  # S [B,H,F,D] fp32, keys that left the window
    k_state: torch.Tensor  # z [B,H,F] fp32
    window_k: torch.Tensor  # [B,Hkv,R,D] keys still in the window, oldest first (R <= capacity)
    window_v: torch.Tensor  # [B,Hkv,R,D]
    window_fk: torch.Tensor  # [B,H,R,F] their feature-mapped keys (per query head, after GQA repeat)
    seen: int  # tokens consumed so far; the next token's position

    @classmethod
    def empty(cls, batch: int, heads: int, kv_heads: int, head_dim: int, feature_dim: int,
              device=None, dtype=torch.float32) -> "HybridState":
        return cls(
            kv_state=torch.zeros(batch, heads, feature_dim, head_dim, device=device),
            k_state=torch.zeros(batch, heads, feature_dim, device=device),
            window_k=torch.zeros(batch, kv_heads, 0, head_dim, device=device, dtype=dtype),
            window_v=torch.zeros(batch, kv_heads, 0, head_dim, device=device, dtype=dtype),
            window_fk=torch.zeros(batch, heads, 0, feature_dim, device=device),
            seen=0,
        )

    def evict(self, count: int, linear: bool) -> "HybridState":
        """Drop the `count` oldest window keys, adding them to S and z when the linear branch is on."""
        fk, v = self.window_fk[:, :, :count], self.window_v[:, :, :count]  # [B,H,c,F], [B,Hkv,c,D]
        kv_state, k_state = self.kv_state, self.k_state
        if linear and count:
            v_rep = v.float().repeat_interleave(fk.shape[1] // v.shape[1], dim=1)  # [B,H,c,D]
            kv_state = kv_state + torch.einsum("bhcf,bhcd->bhfd", fk, v_rep)
            k_state = k_state + fk.sum(dim=2)
        return HybridState(kv_state, k_state, self.window_k[:, :, count:], self.window_v[:, :, count:],
                           self.window_fk[:, :, count:], self.seen)


def prefill_state(k: torch.Tensor, v: torch.Tensor, fk: torch.Tensor | None, num_heads: int,
                  window_size: int, window: str = "sliding") -> HybridState:
    """The state after consuming k, v [B,Hkv,T,D] and fk [B,H,T,F] (window-only: fk None) at once."""
    B, Hkv, T, D = k.shape
    H = num_heads
    fk = fk if fk is not None else torch.zeros(B, H, T, 0, device=k.device)
    state = HybridState.empty(B, H, Hkv, D, fk.shape[-1], device=k.device, dtype=k.dtype)
    state = HybridState(state.kv_state, state.k_state, k, v, fk.float(), T)
    return state.evict(_outside_window(T - 1, T, window_size, window), linear=fk.shape[-1] > 0)


def _outside_window(position: int, length: int, window_size: int, window: str) -> int:
    """How many of the oldest `length` keys (positions up to `position`) are outside its window."""
    if window_size == 0:
        return length
    first = position - length + 1
    contains = window_kind(window).contains
    return sum(1 for j in range(first, position + 1) if not contains(position, j, window_size))


def hybrid_attention_step(
    state: HybridState,
    q: torch.Tensor,  # [B,H,D] the new token's query
    k: torch.Tensor,  # [B,Hkv,D]
    v: torch.Tensor,  # [B,Hkv,D]
    fq: torch.Tensor | None,  # [B,H,F]
    fk: torch.Tensor | None,  # [B,H,F]
    gamma: torch.Tensor | None,  # [H]
    window_size: int,
    window: str = "sliding",
    scale: float | None = None,
) -> tuple[torch.Tensor, HybridState]:  # y [B,H,D] in q's dtype, the state after this token
    B, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    linear = fq is not None
    fk = fk if linear else torch.zeros(B, H, 0, device=q.device)
    t = state.seen
    state = HybridState(
        state.kv_state, state.k_state,
        torch.cat([state.window_k, k[:, :, None]], dim=2),
        torch.cat([state.window_v, v[:, :, None]], dim=2),
        torch.cat([state.window_fk, fk[:, :, None].float()], dim=2),
        t + 1,
    )
    state = state.evict(_outside_window(t, state.window_k.shape[2], window_size, window), linear)

    num = torch.zeros(B, H, D, device=q.device)
    den = torch.zeros(B, H, 1, device=q.device)
    if window_size > 0:
        k_win = state.window_k.float().repeat_interleave(H // k.shape[1], dim=1)  # [B,H,R,D]
        v_win = state.window_v.float().repeat_interleave(H // k.shape[1], dim=1)
        s = scale * torch.einsum("bhd,bhrd->bhr", q.float(), k_win)  # [B,H,R]
        g = torch.ones(H, device=q.device) if gamma is None else gamma.float()
        a = g[:, None] * torch.exp(s - s.amax(dim=-1, keepdim=True))
        num = num + torch.einsum("bhr,bhrd->bhd", a, v_win)
        den = den + a.sum(-1, keepdim=True)
    if linear:
        num = num + torch.einsum("bhf,bhfd->bhd", fq.float(), state.kv_state)
        den = den + torch.einsum("bhf,bhf->bh", fq.float(), state.k_state)[..., None]
    return (num / den).to(q.dtype), state


def hybrid_attention_recurrent(q, k, v, fq, fk, gamma, window_size: int, window: str = "sliding",
                               scale: float | None = None, state: HybridState | None = None
                               ) -> tuple[torch.Tensor, HybridState]:
    """Token-by-token loop over `hybrid_attention_step`; same arguments as the parallel form."""
    check_inputs(q, k, v, fq, fk, gamma, window_size)
    B, H, T, D = q.shape
    if state is None:
        feature_dim = fq.shape[-1] if fq is not None else 0
        state = HybridState.empty(B, H, k.shape[1], D, feature_dim, device=q.device, dtype=k.dtype)
    ys = []
    for t in range(T):
        y, state = hybrid_attention_step(
            state, q[:, :, t], k[:, :, t], v[:, :, t],
            None if fq is None else fq[:, :, t], None if fk is None else fk[:, :, t],
            gamma, window_size, window, scale)
        ys.append(y)
    return torch.stack(ys, dim=2), state
