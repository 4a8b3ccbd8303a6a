"""`HybridCache(cuda_graph=True)` on the CPU: the static-buffer logic a captured decode step relies on,
and the graph path refused with its reason. Replaying graphs needs CUDA: benchmarks/gpu_generate.py."""
import contextlib
import logging

import pytest
import torch

from pipeline.hybrid import HybridCache
from pipeline.hybrid import decode_graph
from pipeline.hybrid.decode_graph import StaticInputs, is_one_token_step, step_refusal
from tests.test_generation import swapped_stories


@pytest.fixture(scope="module")
def model(stories_path):
    return swapped_stories(stories_path)


def prefilled(model, ids, cache=None):
    cache = HybridCache(cuda_graph=True) if cache is None else cache
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    return cache


def test_on_the_cpu_the_graph_path_is_off_with_its_reason_and_tokens_are_the_eager_ones(model, caplog, monkeypatch):
    monkeypatch.setattr(decode_graph, "_REPORTED", set())
    ids = torch.tensor([[1, 403, 407, 261, 378, 426, 281, 352, 275, 270, 431]])
    eager = model.generate(ids, max_new_tokens=10, do_sample=False, past_key_values=HybridCache())
    with caplog.at_level(logging.WARNING, logger="pipeline.hybrid.decode_graph"):
        for _ in range(2):
            graphed = model.generate(ids, max_new_tokens=10, do_sample=False, past_key_values=HybridCache(cuda_graph=True))
            assert torch.equal(graphed, eager)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["HybridCache(cuda_graph=True): CUDA graphs need a CUDA device; decoding eagerly on the CPU"]


def state_addresses(cache) -> tuple[int, ...]:
    return tuple(t.data_ptr() for layer in cache.layers for t in layer.state.tensors())


def test_a_decode_step_updates_every_state_buffer_in_place(model):
    """What a replayed graph relies on: the state's addresses never move while decoding, and a
    reallocating reorder (beam search) moves them, which makes the cache capture again."""
    cache = prefilled(model, torch.tensor([[1, 403, 407, 261, 378, 426, 281, 352, 275, 270, 431]] * 2))
    before, positions = state_addresses(cache), cache.layers[0].state.positions.clone()
    with torch.no_grad():
        for step in range(12):  # past the window (8): keys leave the ring into S
            model(torch.tensor([[300 + step]] * 2), past_key_values=cache, use_cache=True)
    assert state_addresses(cache) == before
    assert torch.equal(cache.layers[0].state.positions, positions + 12)
    cache.reorder_cache(torch.tensor([1, 0]))
    assert state_addresses(cache) != before


def test_static_inputs_are_copied_in_place_with_the_positions_the_eager_step_would_use():
    given = {"input_ids": torch.tensor([[5], [6]]), "position_ids": torch.tensor([[9], [4]])}
    inputs = StaticInputs.like(given)
    addresses = [t.data_ptr() for t in inputs.as_kwargs().values()]
    inputs.load(given, seen=20)
    assert inputs.position_ids.tolist() == [[9], [4]] and set(inputs.as_kwargs()) == {"input_ids", "position_ids"}
    inputs.load({"input_ids": torch.tensor([[7], [8]])}, seen=21)  # what transformers 5.2x passes
    assert [t.data_ptr() for t in inputs.as_kwargs().values()] == addresses
    assert inputs.input_ids.tolist() == [[7], [8]] and inputs.position_ids.tolist() == [[21], [21]]
    with pytest.raises(ValueError, match=r"takes input_ids \(2, 1\), got \(3, 1\)"):
        inputs.load({"input_ids": torch.zeros(3, 1, dtype=torch.long)}, seen=22)
    with pytest.raises(ValueError, match="captured with cache_position and replayed without it, or the reverse"):
        inputs.load({"input_ids": torch.tensor([[7], [8]]), "cache_position": torch.tensor([22])}, seen=22)
    older = StaticInputs.like({"input_ids": torch.tensor([[5]]), "cache_position": torch.tensor([3])})
    older.load({"input_ids": torch.tensor([[5]]), "cache_position": torch.tensor([30])}, seen=30)
    assert older.cache_position.tolist() == [30] and older.position_ids.tolist() == [[30]]


def test_only_one_token_steps_onto_a_filled_cache_go_to_the_graph(model):
    empty = HybridCache(cuda_graph=True)
    ids = torch.tensor([[1, 403, 407]])
    assert not is_one_token_step(empty, {"input_ids": ids})
    cache = prefilled(model, ids)
    assert is_one_token_step(cache, {"input_ids": ids[:, :1]})
    assert not is_one_token_step(cache, {"input_ids": ids[:, :2]})  # a new turn: eager, token by token
    assert not is_one_token_step(cache, {"input_ids": None, "inputs_embeds": torch.zeros(1, 1, 64)})


def test_each_refusal_names_why(model, monkeypatch):
    ids = torch.tensor([[1, 403, 407]])
    cache = prefilled(model, ids)
    assert step_refusal(cache, {"input_ids": ids[:, :1]}).startswith("CUDA graphs need a CUDA device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the checks behind the first one
    assert step_refusal(cache, {"input_ids": ids[:, :1]}) == "the cache's state is not on a CUDA device; decoding eagerly"
    with_stock = HybridCache(cuda_graph=True)
    with_stock.fit(model.config, linearized={0, 2, 3, 4})
    assert step_refusal(with_stock, {}).startswith("layers [1] keep a stock (KV or conv/SSM) cache")
    assert step_refusal(cache, {"input_ids": ids[:, :1], "output_hidden_states": True}) == (
        "the step asks for ['output_hidden_states'], which a captured step does not return; decoding eagerly")
    assert step_refusal(cache, {"input_ids": ids[:, :1], "attention_mask": torch.ones(1, 1, 1, 4)}) == (
        "a custom (non 2-D) attention mask; decoding eagerly")
    assert step_refusal(cache, {"input_ids": ids[:, :1], "logits_to_keep": 1}) == step_refusal(cache, {}) == (
        "the cache's state is not on a CUDA device; decoding eagerly")  # a count: any keeps the one row
    assert step_refusal(cache, {"input_ids": ids[:, :1], "logits_to_keep": torch.tensor([0])}) == (
        "logits_to_keep is not a count of positions (indices, or negative); decoding eagerly")


def test_a_failed_capture_is_logged_with_its_cause_and_the_cache_decodes_eagerly(model, monkeypatch, caplog):
    """What a CUDA capture that cannot record an op leaves: one warning naming the cause, the eager
    tokens, and `failure` set so that later steps do not try again (faked here: no CUDA on the CPU)."""
    ids = torch.tensor([[1, 403, 407, 261, 378, 426, 281, 352, 275, 270, 431]])
    eager = model.generate(ids, max_new_tokens=10, do_sample=False, past_key_values=HybridCache())
    attempts = []

    def failing_capture(forward, cache, kwargs):
        attempts.append(cache.get_seq_length())
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(decode_graph, "_REPORTED", set())
    monkeypatch.setattr(decode_graph, "step_refusal", lambda cache, kwargs: None)
    monkeypatch.setattr(decode_graph, "_warm_up", lambda forward, cache, kwargs: forward(**kwargs))
    monkeypatch.setattr(decode_graph, "_capture", failing_capture)
    cache = HybridCache(cuda_graph=True)
    with caplog.at_level(logging.WARNING, logger="pipeline.hybrid.decode_graph"):
        graphed = model.generate(ids, max_new_tokens=10, do_sample=False, past_key_values=cache)
    assert torch.equal(graphed, eager)
    assert len(attempts) == 1 and cache.graphs.captures == 0 and cache.graphs.replays == 0
    assert cache.graphs.failure == ("capturing the decode step failed (RuntimeError: operation not permitted when "
                                    "stream is capturing); decoding eagerly")
    assert [r.getMessage() for r in caplog.records] == [f"HybridCache(cuda_graph=True): {cache.graphs.failure}"]


def test_a_model_is_warmed_up_once_per_batch_and_later_caches_capture_at_their_first_step(model, monkeypatch):
    """The eager warm-up compiles kernels for the process: a second generate() at the same batch
    captures at its first decode step, while a new batch size is warmed up first (capture faked to
    fail, so that the steps run eagerly: no CUDA on the CPU)."""
    steps = []

    def warm_up(forward, cache, kwargs):
        steps.append(("warm_up", kwargs["input_ids"].shape[0], cache.get_seq_length()))
        return forward(**kwargs)

    def capture(forward, cache, kwargs):
        steps.append(("capture", kwargs["input_ids"].shape[0], cache.get_seq_length()))
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(decode_graph, "_REPORTED", set())
    monkeypatch.setattr(decode_graph, "_WARMED", decode_graph.weakref.WeakKeyDictionary())
    monkeypatch.setattr(decode_graph, "step_refusal", lambda cache, kwargs: None)
    monkeypatch.setattr(decode_graph, "_warm_up", warm_up)
    monkeypatch.setattr(decode_graph, "_capture", capture)
    one, two = torch.tensor([[1, 403, 407, 261, 378]]), torch.tensor([[1, 403, 407, 261, 378]] * 2)
    caches = [HybridCache(cuda_graph=True) for _ in range(3)]
    for ids, cache in zip((one, one, two), caches):
        model.generate(ids, max_new_tokens=4, do_sample=False, past_key_values=cache)
    assert steps == [("warm_up", 1, 5), ("capture", 1, 6), ("capture", 1, 5), ("warm_up", 2, 5), ("capture", 2, 6)]
    assert [c.graphs.warm_ups for c in caches] == [1, 0, 1]
    assert all(c.graphs.warm_up_s > 0 for c in (caches[0], caches[2])) and caches[1].graphs.warm_up_s == 0


class EagerGraph:
    """Stands in for a CUDA graph on the CPU: `replay` runs the recorded step eagerly from its input
    buffers into its logits buffer, and puts back the host counters the step advanced (a replay runs no
    Python: DecodeGraphs.step advances them)."""

    def __init__(self, forward, cache, kwargs: dict, vocab_size: int):
        self.forward, self.cache = forward, cache
        self.inputs = StaticInputs.like(kwargs)
        self.logits = torch.zeros(kwargs["input_ids"].shape[0], 1, vocab_size)

    def replay(self) -> None:
        seen = [layer.seen for layer in self.cache.layers]
        with torch.no_grad():
            self.logits.copy_(self.forward(**decode_graph._graph_kwargs(self.inputs, self.cache)).logits)
        for layer, count in zip(self.cache.layers, seen):
            layer.seen = count


def test_one_captured_step_serves_plain_calls_and_generate_and_a_reallocated_state_captures_again(model,
                                                                                                 monkeypatch):
    """DecodeGraphs.step's bookkeeping around replays, with `EagerGraph` for the graph: a plain call (no
    logits_to_keep) and generate()'s steps (logits_to_keep=1) replay one captured step; beam search,
    which reallocates the state at each step, captures again; the tokens are the eager ones."""
    captures = []

    def capture(forward, cache, kwargs):
        captures.append(cache.get_seq_length())
        graph = EagerGraph(forward, cache, kwargs, model.config.vocab_size)
        return decode_graph.CapturedStep(graph, graph.inputs, graph.logits, decode_graph.states_of(cache))

    monkeypatch.setattr(decode_graph, "_WARMED", decode_graph.weakref.WeakKeyDictionary())
    monkeypatch.setattr(decode_graph, "step_refusal", lambda cache, kwargs: None)
    monkeypatch.setattr(decode_graph, "_warm_up", lambda forward, cache, kwargs: forward(**kwargs))
    monkeypatch.setattr(decode_graph, "_capture", capture)
    ids = torch.tensor([[1, 403, 407, 261, 378, 426, 281, 352, 275, 270, 431]])
    caches = {"eager": HybridCache(cuda_graph=False), "graph": HybridCache(cuda_graph=True)}
    tokens = {}
    for name, cache in caches.items():
        prefilled(model, ids, cache)
        with torch.no_grad():  # plain calls: the warm-up, then the capture
            steps = [model(input_ids=torch.tensor([[300 + t]]), past_key_values=cache, use_cache=True).logits
                     for t in range(2)]
        start = torch.cat([ids, torch.tensor([[300, 301, 302]])], dim=1)  # generate() feeds the new 302 only
        tokens[name] = (steps, model.generate(start, past_key_values=cache, max_new_tokens=12, do_sample=False))
    torch.testing.assert_close(tokens["graph"][0], tokens["eager"][0])
    assert torch.equal(tokens["graph"][1], tokens["eager"][1])
    graphs = caches["graph"].graphs
    assert captures == [ids.shape[1] + 1] and (graphs.warm_ups, graphs.captures, graphs.replays) == (1, 1, 1 + 12)
    captures.clear()
    beams = [model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, past_key_values=HybridCache(cuda_graph=graph))
             for graph in (False, True)]
    assert torch.equal(*beams) and len(captures) > 1


def test_a_capture_interrupted_mid_step_puts_the_host_side_counters_back(model, monkeypatch):
    """A capture stopped between a layer's update and its attend leaves the cache as before it."""
    cache = prefilled(model, torch.tensor([[1, 403, 407]]))
    seen = [layer.seen for layer in cache.layers]

    def interrupted(**kwargs):
        cache.layers[0].update(torch.zeros(1), torch.zeros(1))  # awaiting_attend, as mid-layer
        for layer in cache.layers:
            layer.seen += 1
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: contextlib.nullcontext())
    with pytest.raises(RuntimeError, match="not permitted when stream is capturing"):
        decode_graph._capture(interrupted, cache, {"input_ids": torch.tensor([[5]])})
    assert [layer.seen for layer in cache.layers] == seen
    assert not any(layer.awaiting_attend for layer in cache.layers)


def test_while_capturing_a_decode_step_reads_no_mask_on_the_host(model, monkeypatch):
    """A capture fails on any host read (the H200 run: `bool(real.all())` in attend). While capturing,
    the step leaves the padding check to DecodeGraphs.step, which checks the mask before each replay;
    eagerly, a padded decode token is still refused."""
    ids = torch.tensor([[1, 403, 407, 261, 378]])
    padded = torch.tensor([[1, 1, 1, 1, 1, 0]])
    cache = prefilled(model, ids, HybridCache())
    with torch.no_grad(), pytest.raises(ValueError, match="tokens after the prompt must not be padding"):
        model(torch.tensor([[300]]), attention_mask=padded, past_key_values=cache, use_cache=True)
    cache = prefilled(model, ids, HybridCache())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # as under a capture on the GPU
    with torch.no_grad():
        model(torch.tensor([[300]]), attention_mask=padded, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == ids.shape[1] + 1


def test_by_default_a_cache_decodes_through_graphs_on_cuda_and_silently_eagerly_on_the_cpu(model, caplog,
                                                                                              monkeypatch):
    monkeypatch.setattr(decode_graph, "_REPORTED", set())
    ids = torch.tensor([[1, 403, 407, 261, 378, 426, 281, 352]])
    eager = model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=HybridCache(cuda_graph=False))
    default = HybridCache()
    assert default.graphs is not None and not default.graphs.explicit
    assert HybridCache(cuda_graph=False).graphs is None
    with caplog.at_level(logging.DEBUG, logger="pipeline.hybrid.decode_graph"):
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=default), eager)
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), eager)  # generate's own cache
    assert caplog.records == [] and default.graphs.replays == 0


def test_compile_needs_graphs_and_a_known_mode():
    with pytest.raises(ValueError, match="needs CUDA graphs"):
        HybridCache(cuda_graph=False, compile="layers")
    with pytest.raises(ValueError, match=r"compile='fast'\): expected one of \('off', 'regions', 'layers'\)"):
        HybridCache(compile="fast")


@pytest.mark.parametrize("mode", ["regions", "layers"])
def test_a_step_run_with_compiled_modules_gives_the_eager_logits_and_restores_the_modules(model, mode, monkeypatch):
    """What the warm-up and the capture run under `compiled`: torch.compile's tracing (graph breaks at
    the cache, one entry per layer) with its eager backend here, since Inductor's CPU build would take
    minutes; the GPU benchmarks run Inductor (benchmarks/gpu_decode_profile.py)."""
    modules = decode_graph.compiled_modules(model, mode)
    names = {type(m).__name__ for m in modules}
    assert names == ({"LlamaDecoderLayer"} if mode == "layers" else {"LlamaRMSNorm", "LlamaMLP", "LlamaRotaryEmbedding"})
    monkeypatch.setattr(decode_graph.torch, "compile", lambda fn, **kwargs: torch._dynamo.optimize("eager")(fn))
    ids = torch.tensor([[1, 403, 407, 261, 378, 426, 281, 352, 275, 270, 431]])
    eager_cache, compiled_cache = prefilled(model, ids, HybridCache(cuda_graph=False)), prefilled(model, ids)
    torch._dynamo.reset()
    with torch.no_grad():
        for token in (300, 301, 302):
            step = torch.tensor([[token]])
            expected = model(step, past_key_values=eager_cache, use_cache=True).logits
            with decode_graph.compiled(model, mode):
                assert all("forward" in vars(m) for m in modules)
                got = model(step, past_key_values=compiled_cache, use_cache=True).logits
            torch.testing.assert_close(got, expected)
    assert not any("forward" in vars(m) for m in modules)  # the class's forward again


def test_compiled_puts_back_a_forward_set_on_the_instance_and_says_when_it_finds_nothing(model, caplog,
                                                                                        monkeypatch):
    """accelerate's hooks set `forward` on the module instance: the compiled step must leave it in place."""
    monkeypatch.setattr(decode_graph, "_REPORTED", set())
    monkeypatch.setattr(decode_graph.torch, "compile", lambda fn, **kwargs: fn)
    norm = model.model.norm
    hooked = norm.forward  # a bound method, as accelerate's new_forward stands in for
    norm.forward = hooked
    try:
        with decode_graph.compiled(model, "regions"):
            pass
        assert vars(norm)["forward"] is hooked
    finally:
        del norm.forward
    with caplog.at_level(logging.WARNING, logger="pipeline.hybrid.decode_graph"):
        with decode_graph.compiled(torch.nn.Linear(2, 2), "layers"):
            pass
    assert [r.getMessage() for r in caplog.records] == [
        "HybridCache: compile='layers' finds no module to compile in Linear; the step runs uncompiled"]


def test_the_default_cache_warns_of_every_refusal_but_the_cpu(caplog, monkeypatch):
    """A model on CUDA whose graphs cannot run (a layer with a stock cache, a failed capture) decodes at
    eager speed: the default says so, as cuda_graph=True does; only the CPU, where eager is the path, is quiet."""
    monkeypatch.setattr(decode_graph, "_REPORTED", set())
    default, asked = HybridCache().graphs, HybridCache(cuda_graph=True).graphs
    with caplog.at_level(logging.INFO, logger="pipeline.hybrid.decode_graph"):
        default._report(decode_graph.CPU_REFUSAL)
        default._report(decode_graph.OFF_CUDA_REFUSAL)
        default._report("layers [1] keep a stock cache")
        asked._report("a capture failed")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "HybridCache (CUDA graphs, on by default on CUDA): layers [1] keep a stock cache"),
        ("WARNING", "HybridCache(cuda_graph=True): a capture failed")]
