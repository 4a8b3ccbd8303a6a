"""The decode step of a linearized model replayed from one CUDA graph (`HybridCache`, on CUDA by default).

    model.generate(ids, ...)  # generate() of a linearized model makes a HybridCache(): graphs on CUDA
    model.generate(ids, past_key_values=HybridCache(cuda_graph=True, compile="layers"), ...)

Every buffer of a HybridCache has a fixed size and address from the prefill on (state S, normaliser
z, the key/value ring, per-row positions), and each step updates them in place, on the device:
what a CUDA graph needs and a growing KV cache cannot give. So the one-token step (embedding,
every layer, final norm, lm_head) is captured once per cache and batch size and then replayed,
which removes the host's kernel launches, the cost that dominates eager decoding.

Order of a cache's decode steps: the first runs eagerly on a side stream (Triton compiles its
kernels and cuBLAS creates its handles there, as capture requires), unless this process already
warmed the same model up for the same batch, dtype, device and `compile` (a later generate() call); the
next is captured and replayed; every later one copies its token ids and positions into the captured
input buffers and replays. Python does not run during a replay, so what the step does on the host, the layers'
`seen` counters, is advanced here. The prefill, and any call that is not a plain one-token step,
runs eagerly. A state reallocated by beam search (`reorder_cache`) is recaptured.

`compile` (off by default) also runs the captured step's decoder layers ("layers": all but the hybrid
attention) or its norm/MLP/rotary modules ("regions") compiled by torch.compile, whose fused kernels
the graph then replays: fewer, larger kernels per layer, for a warm-up that takes tens of seconds
(Inductor compiles). Its fused norms and RoPE round differently from the eager modules, so its
tokens need not be the eager ones. Measured on an H200 at the Llama-3-8B shape:
benchmarks/h200/generate/2026-12-03b/README.md.

Refused with one log line each (the call then runs eagerly): a cache on the CPU, a layer that keeps
a stock cache (conv/SSM or KV: transformers' own updates may sync with the host), and a step asking
for more than logits (hidden states, attentions). A capture that fails (an op CUDA cannot record)
is logged with its cause, and that cache decodes eagerly from then on; `failure` says why.
"""
import contextlib
import logging
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

log = logging.getLogger(__name__)

# the keyword arguments generate() passes to a decode step that the graph takes or leaves unchanged
STEP_INPUTS = ("input_ids", "position_ids", "cache_position")
GRAPH_SAFE = {"attention_mask", "past_key_values", "use_cache", "return_dict", "logits_to_keep"}
_REPORTED: set[str] = set()  # one log line per reason and process
# per model, the steps this process has run eagerly on a side stream: (batch, dtype, device, compile mode)
_WARMED: "weakref.WeakKeyDictionary[torch.nn.Module, set[tuple]]" = weakref.WeakKeyDictionary()
CPU_REFUSAL = "CUDA graphs need a CUDA device; decoding eagerly on the CPU"
OFF_CUDA_REFUSAL = "the cache's state is not on a CUDA device; decoding eagerly"


def step_refusal(cache, kwargs: dict) -> str | None:
    """Why this one-token step of `cache` cannot be replayed from a graph; None: it can."""
    from .cache import HybridCacheLayer  # cache.py imports this module

    if not torch.cuda.is_available():
        return CPU_REFUSAL
    stock = [i for i, layer in enumerate(cache.layers) if type(layer) is not HybridCacheLayer]
    if stock:
        return (f"layers {stock} keep a stock (KV or conv/SSM) cache, whose updates may sync with the host; "
                "decoding eagerly")
    extra = sorted(k for k, v in kwargs.items() if k not in GRAPH_SAFE and k not in STEP_INPUTS
                   and v is not None and v is not False)
    if extra:
        return f"the step asks for {extra}, which a captured step does not return; decoding eagerly"
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        return "a custom (non 2-D) attention mask; decoding eagerly"
    keep = kwargs.get("logits_to_keep")
    if keep is not None and not (isinstance(keep, int) and keep >= 0):
        return "logits_to_keep is not a count of positions (indices, or negative); decoding eagerly"
    if any(layer.state is None or layer.state.positions.device.type != "cuda" for layer in cache.layers):
        return OFF_CUDA_REFUSAL
    return None


def is_one_token_step(cache, kwargs: dict) -> bool:
    """A call that decodes one token per row onto a filled cache (not the prefill, not a new turn)."""
    ids = kwargs.get("input_ids")
    return (ids is not None and ids.dim() == 2 and ids.shape[1] == 1 and kwargs.get("inputs_embeds") is None
            and bool(cache.layers) and cache.get_seq_length() > 0)


@dataclass
class StaticInputs:
    """The buffers a captured step reads: token ids [B,1], positions [B,1], and the cache position [1]
    where generate() passes one (transformers before 5.2x; later ones derive it from the cache)."""
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cache_position: torch.Tensor | None

    @classmethod
    def like(cls, kwargs: dict) -> "StaticInputs":
        ids = kwargs["input_ids"]
        cache_position = None if kwargs.get("cache_position") is None else torch.zeros(1, dtype=torch.long,
                                                                                        device=ids.device)
        return cls(torch.zeros_like(ids), torch.zeros_like(ids), cache_position)

    def load(self, kwargs: dict, seen: int) -> None:
        """Copy this step's values in place (the graph keeps reading these addresses). Positions as the
        eager forward would take them: the position_ids given, else the cache position, else the cache's
        length `seen` (transformers' own default, arange(T) + past_seen_tokens), which left on the host
        would be baked into the graph."""
        ids = kwargs["input_ids"]
        if ids.shape != self.input_ids.shape:
            raise ValueError(f"a captured step takes input_ids {tuple(self.input_ids.shape)}, got {tuple(ids.shape)}")
        if (kwargs.get("cache_position") is None) != (self.cache_position is None):
            raise ValueError("a step was captured with cache_position and replayed without it, or the reverse")
        self.input_ids.copy_(ids)
        if self.cache_position is not None:
            self.cache_position.copy_(kwargs["cache_position"].reshape(1))
        positions = kwargs.get("position_ids")
        if positions is not None:
            self.position_ids.copy_(positions)
        elif self.cache_position is not None:
            self.position_ids.copy_(self.cache_position.reshape(1, 1).expand_as(ids))
        else:
            self.position_ids.fill_(seen)

    def as_kwargs(self) -> dict:
        step = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        return step if self.cache_position is None else dict(step, cache_position=self.cache_position)


def states_of(cache) -> tuple:
    """Every layer's state object. A RingState is frozen and updated in place, so the same objects mean
    the same tensors at the same addresses; a reallocated state (beam search, a new prefill) is a new
    object and needs a new graph. (For 32 layers, comparing the objects takes the host about 2 us a step,
    reading the tensors' addresses 44 us, on a 2-core CPU.)"""
    return tuple(layer.state for layer in cache.layers)


@dataclass
class CapturedStep:
    graph: "torch.cuda.CUDAGraph"
    inputs: StaticInputs
    logits: torch.Tensor
    states: tuple  # the cache's RingStates the graph reads and writes (kept alive while it may replay)

    def reads(self, cache) -> bool:
        """Whether the graph's buffers are still `cache`'s state."""
        return len(self.states) == len(cache.layers) and all(
            captured is layer.state for captured, layer in zip(self.states, cache.layers))


@dataclass
class DecodeGraphs:
    """A HybridCache's captured steps, one per batch size, and how many steps were warmed up, captured
    and replayed, with the host seconds each took (the per-call cost a generate() pays before replays)."""
    compile: str = "off"  # one of COMPILE_MODES: which modules the captured step runs compiled
    # cuda_graph=True: every refusal is a warning. The default (on where the state is on CUDA) warns too,
    # except off CUDA, where eager decoding is simply the path
    explicit: bool = True
    captured: dict[int, CapturedStep] = field(default_factory=dict)
    warm_ups: int = 0
    captures: int = 0
    replays: int = 0
    warm_up_s: float = 0.0
    capture_s: float = 0.0
    failure: str | None = None  # why a capture failed: this cache then decodes eagerly (logged once)

    def __post_init__(self):
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"HybridCache(compile={self.compile!r}): expected one of {COMPILE_MODES}")

    def step(self, model, forward, cache, kwargs: dict) -> CausalLMOutputWithPast:
        """One decode step of `model` through the graph where it can be, else `forward(**kwargs)`, the
        model's eager forward (logged once)."""
        reason = self.failure or step_refusal(cache, kwargs)
        if reason is not None:
            self._report(reason)
            return forward(**kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask[:, -1].all()):  # the eager step refuses these with its message
            return forward(**kwargs)
        batch = kwargs["input_ids"].shape[0]
        step = self.captured.get(batch)
        if step is not None and not step.reads(cache):
            del self.captured[batch]  # its buffers are no longer the cache's: capture again
            step = None
        if step is None:
            warmed = _WARMED.setdefault(model, set())
            ring = cache.layers[0].state.ring_k  # in the model's dtype (S is always fp32)
            key = (batch, ring.dtype, ring.device, self.compile)
            if key not in warmed:
                started = time.perf_counter()
                with compiled(model, self.compile):
                    out = _warm_up(forward, cache, kwargs)
                warmed.add(key)
                self.warm_ups, self.warm_up_s = self.warm_ups + 1, self.warm_up_s + time.perf_counter() - started
                return out
            started = time.perf_counter()
            try:
                with compiled(model, self.compile):
                    step = self.captured[batch] = _capture(forward, cache, kwargs)
            except RuntimeError as e:  # torch.AcceleratorError too: an op the capture cannot record
                # the capture ran no kernel, so the state is untouched and this step can run eagerly
                self.failure = f"capturing the decode step failed ({type(e).__name__}: {e}); decoding eagerly"
                self._report(self.failure, exc_info=True)
                return forward(**kwargs)
            self.captures, self.capture_s = self.captures + 1, self.capture_s + time.perf_counter() - started
        step.inputs.load(kwargs, cache.get_seq_length())
        step.graph.replay()
        self.replays += 1
        for layer in cache.layers:  # what the step does on the host, which a replay skips
            layer.seen += 1
        return CausalLMOutputWithPast(logits=step.logits.clone(), past_key_values=cache)

    def _report(self, reason: str, exc_info: bool = False) -> None:
        """One warning per reason and process (see `explicit`)."""
        if not self.explicit and reason in (CPU_REFUSAL, OFF_CUDA_REFUSAL):
            return
        prefix = "HybridCache(cuda_graph=True)" if self.explicit else "HybridCache (CUDA graphs, on by default on CUDA)"
        _warn_once(prefix, reason, exc_info)


def _warn_once(prefix: str, reason: str, exc_info: bool = False) -> None:
    if reason not in _REPORTED:
        _REPORTED.add(reason)
        log.warning("%s: %s", prefix, reason, exc_info=exc_info)


COMPILE_MODES = ("off", "regions", "layers")


def compiled_modules(model: torch.nn.Module, mode: str) -> list[torch.nn.Module]:
    """The modules whose forward the captured step runs compiled: `regions`, the per-token modules every
    decoder has (norms, dense MLPs, the rotary embedding), found by their class names; `layers`, the
    decoder layers (HF's `_no_split_modules`) around the hybrid attention, which stays eager."""
    if mode == "off":
        return []
    if mode == "layers":
        units = set(getattr(model, "_no_split_modules", None) or ())
        return [m for m in model.modules() if type(m).__name__ in units]
    return [m for m in model.modules()
            if type(m).__name__.endswith(("RMSNorm", "LayerNorm", "MLP", "RotaryEmbedding"))]


@contextlib.contextmanager
def compiled(model: torch.nn.Module, mode: str) -> Iterator[None]:
    """Run `model`'s step with `compiled_modules` compiled by torch.compile (Inductor fuses their
    elementwise ops, which a graph would otherwise replay as dozens of tiny kernels per layer). Only the
    warm-up and the capture run inside: a replay runs whatever kernels were recorded, and the prefill
    and every other call keep the eager modules. A module torch.compile cannot take runs eagerly
    (`suppress_errors`, logged by torch)."""
    if mode == "off":  # nothing compiled, and torch.compile's settings left as they are
        yield
        return
    modules = compiled_modules(model, mode)
    if not modules:
        _warn_once("HybridCache", f"compile={mode!r} finds no module to compile in {type(model).__name__}; "
                                  "the step runs uncompiled")
    # a forward set on the instance (accelerate's hooks set one) is compiled too, and put back after
    own = {module: vars(module).get("forward") for module in modules}
    for module in modules:
        module.forward = torch.compile(module.forward, dynamic=False)
    # layers: one entry per layer and batch size (each guards its own layer_idx), past the default limit of 8
    limits = dict(recompile_limit=max(8, 8 * len(modules)), accumulated_recompile_limit=max(256, 64 * len(modules)))
    try:
        with torch._dynamo.config.patch(suppress_errors=True, **limits):
            yield
    finally:
        for module, forward in own.items():
            if forward is None:
                del module.forward  # the class's forward again
            else:
                module.forward = forward


def _graph_kwargs(inputs: StaticInputs, cache) -> dict:
    """The keyword arguments of the step a graph records: its input buffers and the cache, no mask and
    no logits_to_keep. (Decode tokens are never padding, which is checked before each replay, and left
    padding of the prompt lives in each row's state positions, not in the mask. Any integer
    logits_to_keep keeps a one-token step's only row: generate() passes 1, a plain call none, and both
    replay one graph.)"""
    return dict(inputs.as_kwargs(), past_key_values=cache, use_cache=True, return_dict=True)


def _warm_up(forward, cache, kwargs: dict):
    """This step eagerly, on a side stream, with the arguments the capture will give it, so that every
    kernel (Triton's, Inductor's under `compiled`) is compiled and tuned for exactly those inputs."""
    inputs = StaticInputs.like(kwargs)
    inputs.load(kwargs, cache.get_seq_length())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = forward(**_graph_kwargs(inputs, cache))
    torch.cuda.current_stream().wait_stream(stream)
    return out


def _capture(forward, cache, kwargs: dict) -> CapturedStep:
    """Record one step; recording runs no kernel, so the state is untouched and the host-side counters,
    which did run, are put back."""
    inputs = StaticInputs.like(kwargs)
    inputs.load(kwargs, cache.get_seq_length())
    seen = [layer.seen for layer in cache.layers]
    graph = torch.cuda.CUDAGraph()
    step_kwargs = _graph_kwargs(inputs, cache)
    try:
        with torch.cuda.graph(graph):
            logits = forward(**step_kwargs).logits
    finally:  # also after a failed capture, so that the eager step that follows starts clean
        for layer, count in zip(cache.layers, seen):
            layer.seen, layer.awaiting_attend = count, False
    return CapturedStep(graph, inputs, logits, states_of(cache))
