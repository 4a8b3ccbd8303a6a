"""A transformers `Cache` whose memory does not grow with the context (../shared/design/lolcats.md §7).

    model.generate(ids, past_key_values=HybridCache(), ...)

Per layer it holds the fixed-size decode state of `kernels.hybrid_attention.ring` (fp32 S, z, a
ring of the last post-RoPE keys/values and their feature-mapped keys, per-row positions).
A call with an empty cache is the prefill: outputs from the parallel form, then the state after
the prompt. Each later token is one recurrent step (the fused Triton kernel on CUDA when
`attention.backend` allows it, PyTorch otherwise). Several tokens onto a non-empty cache (a new
turn appended to a returned cache, or `prefill_chunk_size`) are exact but run token by token.

How it hooks in: transformers' attention modules call `past_key_values.update(k, v, layer_idx)`
and then the attention function, without handing it the cache. `linearize` adds a forward
pre-hook to every attention module that shows the module's `hybrid` the HybridCache of the
current call; `hybrid_attention_forward` then calls `HybridCacheLayer.attend`. `update` only
returns the new k, v. `get_seq_length` counts every column consumed, so transformers' positions
and RoPE stay right, and the masks transformers builds cover only the new tokens.

Window semantics follow the model's window kind exactly, as in `recurrent.py`: a terrace model
decodes with its terrace window (current and previous w-block, a whole block moving into S when a
new block starts), not with the sliding window upstream decodes terrace models with, so cached
generation equals recomputing the full sequence token for token for both kinds.

Batches: equal-length rows, and left padding (each row keeps its own position; padding never
enters a state). Other masks (right padding, holes) and padded decode tokens are refused.
Beam search and `num_return_sequences` reorder or repeat rows of the state. `crop` (assisted
decoding) is refused: the linear state cannot forget tokens. Inference only: the state is stored
without autograd history and decode steps run without gradients.

Models that mix attention with conv/SSM layers (LFM2, Qwen3-Next, Falcon-H1): the first forward
given the cache lays it out with `fit` (a hook of `linearize` on the model calls it), one layer
per decoder layer as transformers' own `DynamicCache(config=...)` would, except that every
linearized attention gets the hybrid's state. Conv/SSM layers keep their stock conv/recurrent
states (transformers' `LinearAttentionLayer`), which their modules read through the `Cache`
methods (`get_conv_state`, `update_recurrent_state`, ...); a layer running both beside each other
(Falcon-H1) holds both.
"""
import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import (Cache, CacheLayerMixin, DynamicCache, LinearAttentionCacheLayerMixin,
                                      LinearAttentionLayer)

from kernels.hybrid_attention import (DECODE_BACKENDS, RingState, fill_ring_state, fused_recurrent_hybrid_attention,
                                      hybrid_attention, hybrid_attention_decode, ring_size)

from .attention import HybridAttention, resolve_backend
from .decode_graph import DecodeGraphs


class HybridCacheLayer(CacheLayerMixin):
    """One decoder layer's state; allocated at the prefill, fixed-size afterwards."""
    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False  # shapes (batch, heads, feature dim) are known at the prefill only

    def __init__(self):
        super().__init__()
        self.state: RingState | None = None
        self.seen = 0  # columns consumed, padding included: where transformers' positions continue
        self.awaiting_attend = False  # update ran; the hybrid attention has not read the state yet

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    @torch.compiler.disable  # opaque to a compiled decoder layer (decode_graph.compiled): it only keeps flags
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Only the new k, v go on: the attention reads the state through `attend`."""
        if self.awaiting_attend:
            raise ValueError("HybridCache was updated twice without the hybrid attention reading it: use it only "
                             "with a model swapped by `linearize` whose attention implementation is lolcats_hybrid")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.awaiting_attend = True
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Masks over the new tokens only: (kv_length, kv_offset)."""
        return query_length, self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.seen, self.awaiting_attend = None, 0, False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state = self.state.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            rows = torch.arange(self.state.positions.shape[0], device=self.state.positions.device)
            self.reorder_cache(rows.repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("HybridCache cannot be cropped: its linear state cannot forget tokens, so assisted "
                         "or speculative decoding is not supported; generate without an assistant")

    def nbytes(self) -> int:
        return self.state.nbytes() if self.state is not None else 0

    @torch.compiler.disable  # runs eagerly inside a compiled decoder layer: the state is updated in place
    def attend(self, hybrid: HybridAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               real: torch.Tensor | None, scale: float) -> torch.Tensor:
        """q [B,H,Tq,D], new k, v [B,Hkv,Tq,D], real [B,Tq] (None: no padding) -> y [B,H,Tq,D]."""
        self.awaiting_attend = False
        if self.state is None:
            return self._prefill(hybrid, q, k, v, real, scale)
        # a CUDA graph capture cannot read the mask on the host; the graph path checks it before each
        # replay instead (decode_graph.DecodeGraphs.step), and sends a padded step here, eagerly
        capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()  # (the call fails without CUDA)
        if real is not None and not capturing and not bool(real.all()):
            raise ValueError("HybridCache: tokens after the prompt must not be padding (only the prompt may be "
                             "left-padded); drop the padded columns from input_ids and attention_mask")
        if q.shape[0] != self.state.positions.shape[0]:
            raise ValueError(f"HybridCache holds {self.state.positions.shape[0]} rows but got a batch of {q.shape[0]}; "
                             "start a new HybridCache() for a new batch")
        with torch.no_grad():
            ys = [self._step(hybrid, q[:, :, t], k[:, :, t], v[:, :, t], scale) for t in range(q.shape[2])]
        return ys[0][:, :, None] if len(ys) == 1 else torch.stack(ys, dim=2)  # a decode step: no copy

    def _step(self, hybrid: HybridAttention, q, k, v, scale: float) -> torch.Tensor:
        """One token per row: q [B,H,D], k, v [B,Hkv,D] -> y [B,H,D]."""
        config = hybrid.config
        backend = resolve_backend(config.backend, q.device, DECODE_BACKENDS)
        maps = hybrid.decode_maps(backend, q)
        if maps is not None:  # the fused step applies the feature maps and the mix's sigmoid itself
            y = fused_recurrent_hybrid_attention(self.state, q, k, v, None, None, None, config.effective_window_size,
                                                 config.window, scale, hedgehog=maps,
                                                 window_factors=hybrid.factors())
        else:
            fq, fk = hybrid.features(q[:, :, None], k[:, :, None], backend)  # [B,H,1,F] each, or None
            y = hybrid_attention_decode(
                self.state, q, k, v, None if fq is None else fq[:, :, 0], None if fk is None else fk[:, :, 0],
                hybrid.gamma(), config.effective_window_size, config.window, scale, backend)
        self.seen += 1
        return y

    def _prefill(self, hybrid: HybridAttention, q, k, v, real: torch.Tensor | None, scale: float) -> torch.Tensor:
        """Parallel form over each row's tokens; rows left-padded alike are computed together."""
        B, H, T, D = q.shape
        window_size, window = hybrid.config.effective_window_size, hybrid.config.window
        pads = _left_padding(real, T)  # [B]
        self.state = RingState.empty(B, H, k.shape[1], D, hybrid.state_feature_dim, ring_size(window_size, window),
                                     device=q.device, dtype=k.dtype)
        if not bool(pads.any()):  # the common case: one call, no copies
            y = self._prefill_rows(hybrid, torch.arange(B, device=q.device), q, k, v, scale)
        else:
            y = q.new_zeros(B, H, T, D)  # padding positions get 0
            for pad in pads.unique().tolist():
                rows = (pads == pad).nonzero()[:, 0]
                y[rows, :, pad:] = self._prefill_rows(hybrid, rows, q[rows, :, pad:], k[rows, :, pad:],
                                                      v[rows, :, pad:], scale)
        self.seen = T
        return y

    def _prefill_rows(self, hybrid: HybridAttention, rows: torch.Tensor, q, k, v, scale: float) -> torch.Tensor:
        """Outputs for rows `rows` (all tokens real) and their state after the prompt."""
        config = hybrid.config
        backend = resolve_backend(config.backend, q.device, dtype=q.dtype, refusal=hybrid.kernel_refusal(q))
        fq, fk = hybrid.features(q, k, backend)
        y = hybrid_attention(q, k, v, fq, fk, hybrid.gamma(), config.effective_window_size, config.window, scale,
                             backend)
        fill_ring_state(self.state, rows, k.detach(), v.detach(), None if fk is None else fk.detach(),
                        config.effective_window_size, config.window)
        return y


class HybridAndLinearCacheLayer(LinearAttentionLayer, HybridCacheLayer):
    """A decoder layer whose linearized attention runs beside a conv/SSM mixer (Falcon-H1's "hybrid"
    layers): the hybrid's state and the mixer's stock conv/recurrent states, as transformers'
    `LinearAttentionAndFullAttentionLayer` pairs them with a KV cache."""
    is_croppable = False  # the linear state cannot forget tokens, whatever the conv states could

    def __init__(self, number_of_states: int = 1, **kwargs):
        HybridCacheLayer.__init__(self)
        LinearAttentionLayer.__init__(self, number_of_states=number_of_states)

    def lazy_initialization(self, *args, **kwargs) -> None:
        # `update` passes k, v positionally; the conv/SSM updates pass their states by keyword
        if args:
            HybridCacheLayer.lazy_initialization(self, *args)
        else:
            LinearAttentionLayer.lazy_initialization(self, **kwargs)

    def reset(self) -> None:
        LinearAttentionLayer.reset(self)
        HybridCacheLayer.reset(self)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        LinearAttentionLayer.reorder_cache(self, beam_idx)
        HybridCacheLayer.reorder_cache(self, beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        HybridCacheLayer.crop(self, tokens_to_remove)

    def nbytes(self) -> int:
        return HybridCacheLayer.nbytes(self) + _conv_ssm_nbytes(self)


def _conv_ssm_nbytes(layer) -> int:
    """Bytes of the conv/recurrent states transformers keeps in a layer (0 for a layer without any)."""
    if not isinstance(layer, LinearAttentionCacheLayerMixin):
        return 0
    states = (*layer.conv_states.values(), *layer.recurrent_states.values())
    return sum(state.nbytes for state in states if state is not None)


def _left_padding(real: torch.Tensor | None, length: int) -> torch.Tensor:
    """[B,T] bool tokens-not-padding -> [B] padding columns in front of each row; refuses other masks."""
    if real is None:
        return torch.zeros(1, dtype=torch.long)
    pads = (~real).sum(dim=1)
    expected = torch.arange(length, device=real.device)[None, :] >= pads[:, None]
    if not bool((real == expected).all()):
        raise ValueError("HybridCache supports left padding only (padding columns before each row's tokens): "
                         "set tokenizer.padding_side = 'left', or generate row by row")
    if bool((pads == length).any()):
        raise ValueError("HybridCache: a prompt row is all padding; give every row at least one token")
    return pads


class HybridCache(Cache):
    """Constant-memory cache for linearized models; its layers are laid out at the first forward (`fit`).

    Pass it to `generate` or `forward` as `past_key_values`; a cache handed back
    (`return_dict_in_generate=True`, or the same object) continues where it stopped.
    `cuda_graph`: one-token decode steps on CUDA replay one captured graph (`decode_graph.py`). None
    (the default) does so where the state is on CUDA, warning once of a step it cannot take, and decodes
    eagerly off CUDA without a word; True warns there too; False always decodes eagerly.
    `compile`: see decode_graph.py.
    """

    def __init__(self, cuda_graph: bool | None = None, compile: str = "off"):
        super().__init__(layer_class_to_replicate=HybridCacheLayer)
        if compile != "off" and cuda_graph is False:
            raise ValueError(f"HybridCache(compile={compile!r}) compiles the captured decode step: it needs CUDA "
                             "graphs; leave cuda_graph at its default or set it to True")
        self.graphs = None if cuda_graph is False else DecodeGraphs(compile=compile, explicit=cuda_graph is True)

    def fit(self, model_config: PreTrainedConfig, linearized: set[int]) -> None:
        """Lay out every decoder layer's state before the first forward: conv/SSM layers read theirs
        before any attention layer is reached, so they cannot be created on demand as attention ones are.

        `linearized`: the indices of the layers whose attention `linearize` swapped; every other layer
        keeps the layer `DynamicCache(config=model_config)` gives it (transformers' public layout,
        the same across its 5.x releases, where its helpers for it are not).
        """
        stock = DynamicCache(config=model_config).layers
        self.layers = [_layer_cache(layer, index in linearized) for index, layer in enumerate(stock)]
        self.layer_class_to_replicate = None

    def nbytes(self) -> int:
        """Bytes held by every layer's state, conv/SSM states included: independent of the context length."""
        return sum(layer.nbytes() if isinstance(layer, HybridCacheLayer) else _conv_ssm_nbytes(layer)
                   for layer in self.layers)


def _layer_cache(stock: CacheLayerMixin, linearized: bool) -> CacheLayerMixin:
    """One layer's state: the stock one, the hybrid's in place of a KV cache, or the hybrid's beside the
    stock conv/SSM states (a layer whose attention runs beside a mixer)."""
    if not linearized:
        return stock
    if isinstance(stock, LinearAttentionCacheLayerMixin):
        return HybridAndLinearCacheLayer(number_of_states=stock.number_of_states)
    return HybridCacheLayer()
