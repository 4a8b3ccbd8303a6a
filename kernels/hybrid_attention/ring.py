"""The decode state in fixed-size buffers, and its step in plain PyTorch (../shared/design/lolcats.md §7).

`recurrent.py` states the recurrent form with a window that grows and shrinks by concatenation;
generation needs the same numbers in buffers allocated once, so memory never depends on the
context length and a step can run in place (one kernel launch, CUDA graphs). Per layer:

    kv_state  S [B,H,F,D] fp32   sum fk_j v_j^T over keys that left the window
    k_state   z [B,H,F]   fp32   sum fk_j over the same keys
    ring_k/v  [B,Hkv,R,D]        post-RoPE keys/values; position j sits in slot j % R
    ring_fk   [B,H,R,F]   fp32   their feature-mapped keys (per query head, after GQA repeat)
    positions [B]         int64  tokens consumed per row = the next token's position

The ring keeps feature-mapped keys rather than recomputing phi_k when a key leaves the window: the
step then needs no feature-map weights, so any registered feature map decodes through one kernel.
The price is fixed memory of R x F fp32 per query head, about S's F x D for a terrace window of 64.

R = capacity(w) + 1: one slot more than the window kind ever holds, so the slot a step writes is
never one that a key leaving the window at that step still occupies. The fused kernel relies on
it: programs of one step run concurrently and must not overwrite what another still reads.
Rows carry their own position, so left-padded prompts keep padding out of every state.
"""
from dataclasses import dataclass, fields

import torch

from .naive import repeat_kv
from .windows import window_kind


def ring_size(window_size: int, window: str) -> int:
    """R: slots per ring; linear-only keeps one unused slot so shapes stay uniform."""
    return (window_kind(window).capacity(window_size) if window_size > 0 else 0) + 1


@dataclass(frozen=True)  # updated in place only: a CUDA graph keeps reading its tensors (decode_graph.py)
class RingState:
    kv_state: torch.Tensor  # S [B,H,F,D] fp32
    k_state: torch.Tensor  # z [B,H,F] fp32
    ring_k: torch.Tensor  # [B,Hkv,R,D] model dtype
    ring_v: torch.Tensor  # [B,Hkv,R,D]
    ring_fk: torch.Tensor  # [B,H,R,F] fp32
    positions: torch.Tensor  # [B] int64

    @classmethod
    def empty(cls, batch: int, heads: int, kv_heads: int, head_dim: int, feature_dim: int, ring: int,
              device=None, dtype=torch.float32) -> "RingState":
        """Zero state for `batch` rows at position 0; `feature_dim` 0 for window-only attention."""
        return cls(
            kv_state=torch.zeros(batch, heads, feature_dim, head_dim, device=device),
            k_state=torch.zeros(batch, heads, feature_dim, device=device),
            ring_k=torch.zeros(batch, kv_heads, ring, head_dim, device=device, dtype=dtype),
            ring_v=torch.zeros(batch, kv_heads, ring, head_dim, device=device, dtype=dtype),
            ring_fk=torch.zeros(batch, heads, ring, feature_dim, device=device),
            positions=torch.zeros(batch, dtype=torch.long, device=device),
        )

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in _RING_FIELDS]  # (a graph replay checks them every step)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def select_rows(self, index: torch.Tensor) -> "RingState":
        """A new state of the rows `index` (in that order, repeats allowed): beam reorder, expansion."""
        return RingState(*(t.index_select(0, index.to(t.device)) for t in self.tensors()))


_RING_FIELDS = tuple(f.name for f in fields(RingState))  # dataclasses.fields is slow, and the fields are fixed


def fill_ring_state(state: RingState, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    fk: torch.Tensor | None, window_size: int, window: str = "sliding") -> None:
    """Set rows `rows` of `state` to the state after a prompt: k, v [b,Hkv,T,D], fk [b,H,T,F] or None.

    The equivalent of `recurrent.prefill_state` in ring layout: keys outside the window of the last
    prompt token are summed into S, z; the last min(T, R) keys go to their slots.
    """
    b, Hkv, T, D = k.shape
    H, R = state.ring_fk.shape[1], state.ring_k.shape[2]
    j = torch.arange(T, device=k.device)
    if window_size > 0:
        linear_keys = int((~window_kind(window).contains(T - 1, j, window_size)).sum())
    else:
        linear_keys = T
    kv_state = torch.zeros(b, H, *state.kv_state.shape[2:], device=k.device)
    k_state = torch.zeros(b, H, state.k_state.shape[2], device=k.device)
    if fk is not None:
        fk_old, v_old = fk[:, :, :linear_keys].float(), repeat_kv(v[:, :, :linear_keys], H).float()
        kv_state = torch.einsum("bhtf,bhtd->bhfd", fk_old, v_old)  # [b,H,F,D]
        k_state = fk_old.sum(dim=2)  # [b,H,F]
    kept = min(T, R)
    slots = j[T - kept:] % R  # the newest keys, at the slots of their positions
    ring_k = state.ring_k.new_zeros(b, Hkv, R, D)
    ring_v = state.ring_v.new_zeros(b, Hkv, R, D)
    ring_fk = state.ring_fk.new_zeros(b, H, R, state.ring_fk.shape[3])
    ring_k[:, :, slots] = k[:, :, T - kept:].to(ring_k.dtype)
    ring_v[:, :, slots] = v[:, :, T - kept:].to(ring_v.dtype)
    if fk is not None:
        ring_fk[:, :, slots] = fk[:, :, T - kept:].float()
    for target, value in ((state.kv_state, kv_state), (state.k_state, k_state), (state.ring_k, ring_k),
                          (state.ring_v, ring_v), (state.ring_fk, ring_fk)):
        target.index_copy_(0, rows, value)
    state.positions.index_fill_(0, rows, T)


def held_positions(last: torch.Tensor, ring: int) -> torch.Tensor:
    """[B] newest position per row -> [B,R] the position each slot holds (negative: never written)."""
    slots = torch.arange(ring, device=last.device)
    return last[:, None] - (last[:, None] + ring - slots) % ring


def hybrid_attention_ring_step(
    state: RingState,
    q: torch.Tensor,  # [B,H,D] the new token's query
    k: torch.Tensor,  # [B,Hkv,D]
    v: torch.Tensor,  # [B,Hkv,D]
    fq: torch.Tensor | None,  # [B,H,F]
    fk: torch.Tensor | None,  # [B,H,F]
    gamma: torch.Tensor | None,  # [H]
    window_size: int,
    window: str = "sliding",
    scale: float | None = None,
) -> torch.Tensor:  # y [B,H,D] in q's dtype; `state` is advanced in place
    """One decode step for every row, each at its own position: keys leaving the window go to S, z,
    the new key enters the ring, then y = (window softmax part + fq S) / (its sum + fq z)."""
    B, H, D = q.shape
    R = state.ring_k.shape[2]
    scale = D**-0.5 if scale is None else scale
    p = state.positions  # [B]
    rows = torch.arange(B, device=q.device)
    linear = fq is not None
    num = torch.zeros(B, H, D, device=q.device)
    den = torch.zeros(B, H, 1, device=q.device)
    if window_size > 0:
        contains = window_kind(window).contains
        before = held_positions(p - 1, R)  # [B,R] what the ring held after the previous token
        leaving = (before >= 0) & contains(p[:, None] - 1, before, window_size) & ~contains(p[:, None], before, window_size)
        slots = leaving.any(dim=0).nonzero()[:, 0]  # only the slots some row evicts
        if linear and len(slots):
            fk_out = state.ring_fk[:, :, slots] * leaving[:, None, slots, None]  # [B,H,n,F]
            v_out = repeat_kv(state.ring_v[:, :, slots], H).float()  # [B,H,n,D]
            state.kv_state.add_(torch.einsum("bhnf,bhnd->bhfd", fk_out, v_out))
            state.k_state.add_(fk_out.sum(dim=2))
        state.ring_k[rows, :, p % R] = k.to(state.ring_k.dtype)
        state.ring_v[rows, :, p % R] = v.to(state.ring_v.dtype)
        if linear:
            state.ring_fk[rows, :, p % R] = fk.float()
        now = held_positions(p, R)
        in_window = (now >= 0) & contains(p[:, None], now, window_size)  # [B,R]
        k_win = repeat_kv(state.ring_k, H).float()  # [B,H,R,D]
        s = scale * torch.einsum("bhd,bhrd->bhr", q.float(), k_win)
        s = s.masked_fill(~in_window[:, None], float("-inf"))
        g = torch.ones(H, device=q.device) if gamma is None else gamma.float()
        a = g[:, None] * torch.exp(s - s.amax(dim=-1, keepdim=True))  # [B,H,R], 0 outside the window
        num = num + torch.einsum("bhr,bhrd->bhd", a, repeat_kv(state.ring_v, H).float())
        den = den + a.sum(-1, keepdim=True)
    elif linear:  # linear-only: the new key is linear for its own query
        state.kv_state.add_(torch.einsum("bhf,bhd->bhfd", fk.float(), repeat_kv(v[:, :, None], H)[:, :, 0].float()))
        state.k_state.add_(fk.float())
    if linear:
        num = num + torch.einsum("bhf,bhfd->bhd", fq.float(), state.kv_state)
        den = den + torch.einsum("bhf,bhf->bh", fq.float(), state.k_state)[..., None]
    state.positions.add_(1)
    return (num / den).to(q.dtype)
