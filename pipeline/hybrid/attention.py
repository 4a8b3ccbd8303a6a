"""The hybrid attention module attached to each attention layer, and the function transformers calls.

../shared/design/lolcats.md §1.1-§1.3. `convert.py` attaches a `HybridAttention` as `self_attn.hybrid`
of every decoder layer and registers `hybrid_attention_forward` with transformers'
`AttentionInterface`; the model's own attention then hands over post-RoPE q [B,H,T,D] and
un-repeated k, v [B,Hkv,T,D], and gets [B,T,H,D] back, like any attention implementation.
With a `HybridCache` (cache.py) the call is routed to the cache's constant-memory prefill/decode.
"""
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.hybrid_attention import BACKENDS, chunk_refusal, hybrid_attention, hybrid_attention_weights
from kernels.hybrid_attention.decode_maps import HedgehogMaps

from .config import HybridConfig
from .feature_maps import FEATURE_MAPS, PHI_EPS

log = logging.getLogger(__name__)


def resolve_backend(requested: str, device: torch.device, registry: dict[str, Callable] = BACKENDS,
                    dtype: torch.dtype | None = None, refusal: str | None = None) -> str:
    """`auto` picks the Triton kernel on CUDA when `registry` has one, PyTorch otherwise.

    `refusal` is why the kernel cannot take this layer (`chunk_refusal`: head dim, dtype, window),
    or None: `auto` then falls back to PyTorch and says so once per reason; an explicit `triton`
    is left to raise in the kernel with the same words. Given the inputs' dtype, `auto` keeps fp32
    on PyTorch: the chunk kernels take bf16/fp16 on CUDA.
    """
    if requested == "auto":
        usable = device.type == "cuda" and "triton" in registry and dtype != torch.float32
        if usable and refusal is not None:
            if refusal not in _REPORTED_FALLBACKS:
                _REPORTED_FALLBACKS.add(refusal)
                log.warning("attention.backend auto: PyTorch instead of Triton here, since %s", refusal)
            return "torch"
        return "triton" if usable else "torch"
    if requested not in registry:
        raise ValueError(f"attention.backend: {requested!r} is not available here; available: {sorted(registry)}")
    return requested


_REPORTED_FALLBACKS: set[str] = set()  # one log line per reason and process, not one per layer and step


def use_fused_feature_maps(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Feature maps run their fused kernel (where they have one) beside the Triton attention: CUDA, bf16/fp16.

    fp32 stays on PyTorch as the chunk kernels do on CUDA, and the CPU path (the DVC pipeline,
    the Triton interpreter) keeps the PyTorch maps, so its numbers do not move.
    """
    return backend == "triton" and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)


@dataclass
class TransferLosses:
    """What one forward in attention-transfer mode leaves behind (../shared/design/lolcats.md §2)."""
    with_xent: bool  # also compute the attention-weight cross-entropy (quadratic memory)
    mse: torch.Tensor | None = None
    xent: torch.Tensor | None = None


class HybridAttention(nn.Module):
    """Feature maps phi_q, phi_k and the per-head window factors w_h (gamma_h = sigmoid(w_h))."""

    def __init__(self, config: HybridConfig, num_heads: int, head_dim: int):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        if config.uses_linear:
            feature_map = FEATURE_MAPS[config.feature_map]
            self.feature_map_q = feature_map(num_heads, head_dim, config.feature_dim, config.feature_init)
            self.feature_map_k = feature_map(num_heads, head_dim, config.feature_dim, config.feature_init)
        if config.uses_window and config.uses_linear:  # gamma cancels out of a window-only softmax
            self.window_factors = nn.Parameter(torch.full((num_heads,), config.init_window_factor))
        self.transfer: TransferLosses | None = None  # set by pipeline.transfer while training
        # the teacher layer's own sliding window (None: global attention): the softmax transfer imitates
        self.teacher_window: int | None = None
        self.cache = None  # the HybridCache of the current forward, shown by a hook of `linearize`
        # SSD (arXiv 2510.05901): the chance that a training forward runs linear-only; set per update by
        # pipeline.training.WindowDropoutSchedule, a plain attribute so no state dict or config.json holds it
        self.window_dropout = 0.0

    @property
    def state_feature_dim(self) -> int:
        """F of the recurrent state: phi's width, 0 when the linear branch is off."""
        return self.feature_map_k.output_dim if self.config.uses_linear else 0

    def features(self, q: torch.Tensor, k: torch.Tensor, backend: str = "torch"
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """phi_q(q), phi_k(repeat_kv(k)): [B,H,T,F] each, or None when the linear branch is off.

        q [B,H,T,D], k [B,Hkv,T,D] un-repeated; `backend` is the resolved attention backend, which
        decides with the inputs' device and dtype whether fused map kernels run (`use_fused_feature_maps`).
        """
        if not self.config.uses_linear:
            return None, None
        fused = use_fused_feature_maps(backend, q.device, q.dtype)
        return self.feature_map_q.grouped(q, fused), self.feature_map_k.grouped(k, fused)

    def decode_maps(self, backend: str, q: torch.Tensor) -> HedgehogMaps | None:
        """The feature maps for the fused decode kernel to apply itself (a map that it implements, where
        the fused maps run: `use_fused_feature_maps`), else None: fq, fk then come from `features`."""
        if not (self.config.uses_linear and self.feature_map_q.in_decode_kernel
                and use_fused_feature_maps(backend, q.device, q.dtype)):
            return None
        return HedgehogMaps(self.feature_map_q.weight, self.feature_map_k.weight, PHI_EPS)

    def kernel_refusal(self, q: torch.Tensor) -> str | None:
        """Why the Triton chunk kernels cannot take this layer's inputs q [B,H,T,D], or None."""
        return chunk_refusal(q.shape[-1], self.state_feature_dim or None, self.config.effective_window_size,
                             self.config.window, q.device, q.dtype)

    def gamma(self) -> torch.Tensor | None:
        factors = self.factors()
        return None if factors is None else torch.sigmoid(factors.float())

    def factors(self) -> torch.Tensor | None:
        """The window factors w_h [H] (gamma = sigmoid(w)); None where the layer has no window mix (gamma 1)."""
        return getattr(self, "window_factors", None)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q [B,H,T,D], k, v [B,Hkv,T,D] -> y [B,H,T,D].

        In attention-transfer mode (`transfer is not None`) the teacher's softmax output is returned
        instead, so later layers see exactly the teacher's hidden states, and the losses of §2 are
        left in `self.transfer`.
        """
        backend = resolve_backend(self.config.backend, q.device, dtype=q.dtype, refusal=self.kernel_refusal(q))
        fq, fk = self.features(q, k, backend)
        gamma, window_size = self.gamma(), self.config.effective_window_size
        # one draw per call from the default CPU generator, and none at all with p = 0 (the usual case)
        if self.training and self.window_dropout > 0 and torch.rand(()).item() < self.window_dropout:
            # window dropped: what mode linear_only computes, with these feature maps. gamma = 0 alone
            # would not do: the linear branch covers only keys outside the window, so the first window's
            # queries would see no key at all (0 / 0) and the rest none of their nearest keys
            gamma, window_size = None, 0
        y = hybrid_attention(q, k, v, fq, fk, gamma, window_size, self.config.window, scale, backend)
        if self.transfer is None:
            return y
        with torch.no_grad():
            # in the model's dtype: bf16 on a GPU takes the flash kernel, fp32 GQA would fall back to
            # the math kernel and its T x T matrix
            if self.teacher_window is None:
                teacher = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
            else:
                teacher = F.scaled_dot_product_attention(q, k, v, attn_mask=self._teacher_visible(q), scale=scale,
                                                         enable_gqa=True)
            teacher = teacher.float()  # [B,H,T,D]
        self.transfer.mse = F.mse_loss(y.float(), teacher)  # per-head outputs before o_proj
        if self.transfer.with_xent:
            self.transfer.xent = self._attention_xent(q, k, fq, fk, gamma, window_size, scale)
        return teacher.to(q.dtype)

    def _teacher_visible(self, q: torch.Tensor) -> torch.Tensor:
        """[T,T] bool: key j is visible to query i in the teacher layer (causal, within its own window)."""
        i = torch.arange(q.shape[2], device=q.device)[:, None]
        j = torch.arange(q.shape[2], device=q.device)[None, :]
        visible = j <= i
        return visible if self.teacher_window is None else visible & (i - j < self.teacher_window)

    def _attention_xent(self, q, k, fq, fk, gamma, window_size, scale) -> torch.Tensor:
        """Mean over queries of -sum_j a_teacher,ij log a_student,ij (quadratic in T: 1K tokens, not 32K)."""
        with torch.no_grad():
            scores = scale * q.float() @ k.float().repeat_interleave(self.num_heads // k.shape[1], 1).transpose(-1, -2)
            teacher = scores.masked_fill(~self._teacher_visible(q), float("-inf")).softmax(dim=-1)  # [B,H,T,T]
        student = hybrid_attention_weights(q, k, fq, fk, gamma, window_size, self.config.window, scale)
        return -(teacher * student.clamp(min=1e-12).log()).sum(-1).mean()


def real_keys(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B,1,Tq,Tk] mask (bool, or additive float) -> [B,Tk] bool: which keys are tokens, not padding."""
    if attention_mask is None:
        return None
    keys_visible = attention_mask[:, 0, -1, :]  # the last query sees every real key
    return keys_visible if keys_visible.dtype == torch.bool else keys_visible == 0


def _check_padding(attention_mask: torch.Tensor | None) -> None:
    """Only right padding is harmless to a causal layer that ignores the mask; refuse the rest."""
    keys_visible = real_keys(attention_mask)
    if keys_visible is None:
        return
    if (keys_visible[:, 1:] & ~keys_visible[:, :-1]).any():
        raise ValueError("hybrid attention does not support left padding or packed masks: "
                         "pad on the right (tokenizer.padding_side = 'right') or use batch size 1")


def hybrid_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None,
                             scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers attention-interface entry: q [B,H,Tq,D], k, v [B,Hkv,Tk,D] -> ([B,Tq,H,D], None).

    With a `HybridCache` the cache computes the output from its state (prefill or decode step).
    With the stock KV cache a decode step brings Tq < Tk (queries are the last Tq positions): the
    parallel form then runs over all Tk positions with zero queries in front, and keeps the last Tq.
    """
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if module.hybrid.cache is not None:
        layer = module.hybrid.cache.layers[module.layer_idx]
        y = layer.attend(module.hybrid, query, key, value, real_keys(attention_mask), scale)  # [B,H,Tq,D]
        return y.transpose(1, 2).contiguous(), None
    _check_padding(attention_mask)
    q_len, k_len = query.shape[2], key.shape[2]
    if q_len < k_len:
        query = torch.nn.functional.pad(query, (0, 0, k_len - q_len, 0))
    y = module.hybrid(query, key, value, scale)[:, :, k_len - q_len:]  # [B,H,Tq,D]
    return y.transpose(1, 2).contiguous(), None
