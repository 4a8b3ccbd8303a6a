"""Hybrid attention kernel vs softmax flash attention vs fla linear attention, side by side on one GPU.

Usage (repo root): python -m benchmarks.gpu_attention [--shapes llama3-8b smollm2-135m]
    [--lengths 1024 4096 16384 32768] [--tokens 32768] [--window terrace] [--out DIR]
    [--cuda-graphs] [--smoke]
Every (shape, T) gets B = tokens / T and fresh bf16 inputs; every column is timed forward (under
no_grad) and forward+backward (torch.autograd.grad of the output against a random upstream gradient,
w.r.t. every input that requires grad), with its peak memory. --cuda-graphs also times both replayed
from a CUDA graph: the device's time where the host's launches are the slower part (small shapes).
Writes <out>/gpu_attention.json and prints a summary table last. --smoke: tiny fp32 shapes on CPU, to
check the script without a GPU.
"""
import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.hybrid_attention import BACKENDS, hybrid_attention

from .attention_inputs import SHAPES, SMOKE_SHAPES, WINDOW_SIZE, AttentionShape, HybridInputs, hybrid_module, \
    random_inputs, triton_runs_on
from .gpu_common import results_dir, Measured, bench_graph_ms, bench_ms, \
    copy_bandwidth_tb_s, environment, format_table, guarded, peak_memory_mib, ratio, release_memory, write_result

Run = tuple[Callable[[], torch.Tensor], list[torch.Tensor]]  # the output's function, the tensors grads are for


def load_fla() -> tuple[Callable | None, str | None]:
    """fla's chunk_linear_attn, or why it cannot be had (the other columns run regardless)."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception as error:  # noqa: BLE001 - ImportError, or a triton/device check failing at import
        return None, f"fla not importable: {type(error).__name__}: {error}"
    return chunk_linear_attn, None


CHUNK_LINEAR_ATTN, FLA_ERROR = load_fla()


@dataclass(frozen=True)
class Column:
    name: str
    measures: str  # what exactly is timed, for the JSON
    build: Callable[[HybridInputs, AttentionShape, str], Run]  # (inputs, shape, window) -> Run
    backend: str | None = None  # our hybrid backend, if the column runs one


def sdpa_run(x: HybridInputs, shape: AttentionShape, window: str) -> Run:
    def output() -> torch.Tensor:  # [B,H,T,D]
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(x.q, x.k, x.v, is_causal=True, scale=x.scale, enable_gqa=True)
    return output, [x.q, x.k, x.v]


def fla_run(x: HybridInputs, shape: AttentionShape, window: str) -> Run:
    """fla wants [B,T,H,K] and has no GQA: it gets fq, fk and the GQA-repeated v in its layout."""
    if CHUNK_LINEAR_ATTN is None:
        raise RuntimeError(FLA_ERROR)
    fq, fk = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (x.fq, x.fk))  # [B,T,H,F]
    v = x.v.detach().repeat_interleave(shape.heads // shape.kv_heads, dim=1)  # [B,H,T,D]
    v = v.transpose(1, 2).contiguous().requires_grad_()  # [B,T,H,D]

    def output() -> torch.Tensor:  # [B,T,H,D]
        # scale 1: our linear branch is fq.fk unscaled; normalize: it is divided by fq.sum(fk), as ours
        return CHUNK_LINEAR_ATTN(fq, fk, v, scale=1.0, normalize=True)[0]
    return output, [fq, fk, v]


def attention_only(backend: str) -> Callable[[HybridInputs, AttentionShape, str], Run]:
    def build(x: HybridInputs, shape: AttentionShape, window: str) -> Run:
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not registered; known: {sorted(BACKENDS)}")

        def output() -> torch.Tensor:  # [B,H,T,D]
            return hybrid_attention(x.q, x.k, x.v, x.fq, x.fk, x.gamma, WINDOW_SIZE, window, x.scale, backend)
        return output, x.leaves()
    return build


def with_feature_maps(backend: str) -> Callable[[HybridInputs, AttentionShape, str], Run]:
    def build(x: HybridInputs, shape: AttentionShape, window: str) -> Run:
        module = hybrid_module(shape, window, backend, x.q.device)

        def output() -> torch.Tensor:  # [B,H,T,D]: phi_q(q), phi_k(repeat_kv(k)), gamma, then attention
            return module(x.q, x.k, x.v, x.scale)
        return output, [x.q, x.k, x.v, *module.parameters()]
    return build


COLUMNS = [
    Column("sdpa_flash", "F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) forced to "
           "SDPBackend.FLASH_ATTENTION; grads q, k, v", sdpa_run),
    Column("fla_chunk_linear_attn", "fla.ops.linear_attn.chunk_linear_attn(fq, fk, v_repeated, scale=1, "
           "normalize=True), [B,T,H,*] layout, F = 2 feature_dim, v repeated to H heads (fla has no GQA); "
           "grads fq, fk, v_repeated", fla_run),
    Column("torch_attention", "hybrid_attention(q, k, v, fq, fk, gamma, backend='torch'), fq/fk given; "
           "grads q, k, v, fq, fk, gamma", attention_only("torch"), "torch"),
    Column("triton_attention", "hybrid_attention(..., backend='triton'), fq/fk given; "
           "grads q, k, v, fq, fk, gamma", attention_only("triton"), "triton"),
    Column("torch_with_feature_maps", "HybridAttention(backend='torch')(q, k, v): Hedgehog maps on q and "
           "repeated k (fp32), sigmoid gamma, attention; grads q, k, v, map weights, window factors",
           with_feature_maps("torch"), "torch"),
    Column("triton_with_feature_maps", "as torch_with_feature_maps with backend='triton'",
           with_feature_maps("triton"), "triton"),
]
GRAPH_MEASUREMENTS = ("fwd_graph_ms", "fwd_bwd_graph_ms")
MEASUREMENTS = ("fwd_ms", "fwd_bwd_ms", "fwd_memory", "fwd_bwd_memory", *GRAPH_MEASUREMENTS)
NOT_ASKED = "not measured: run with --cuda-graphs"


Calls = tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], Callable[[], tuple[torch.Tensor, ...]]]]


def column_calls(build: Callable[[], Run], device: torch.device) -> Calls | str:
    """A column's forward (under no_grad) and, given an upstream gradient, its forward+backward; or why
    the column could not be built."""
    built = guarded(build, device)
    if isinstance(built, str):
        return built
    output, leaves = built

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return output()

    def forward_backward(upstream: torch.Tensor) -> Callable[[], tuple[torch.Tensor, ...]]:
        return lambda: torch.autograd.grad(output(), leaves, upstream)
    return forward, forward_backward


def measure(build: Callable[[], Run], device: torch.device, warmup_ms: float, rep_ms: float) -> dict[str, Measured]:
    """Forward and forward+backward time and peak memory of one column; failures become strings."""
    calls = column_calls(build, device)
    if isinstance(calls, str):
        return dict.fromkeys(MEASUREMENTS, calls)
    forward, with_backward = calls
    result: dict[str, Measured] = {"fwd_ms": guarded(lambda: bench_ms(forward, device, warmup_ms, rep_ms), device),
                                   **dict.fromkeys(GRAPH_MEASUREMENTS, NOT_ASKED)}
    if isinstance(result["fwd_ms"], str) and result["fwd_ms"] != "OOM":
        return dict.fromkeys(MEASUREMENTS, result["fwd_ms"])  # broken, not just too big: skip the rest
    result["fwd_memory"] = guarded(lambda: peak_memory_mib(forward, device), device)
    upstream = guarded(lambda: torch.randn_like(forward()), device)
    if isinstance(upstream, str):
        return dict(result, fwd_bwd_ms=upstream, fwd_bwd_memory=upstream)
    forward_backward = with_backward(upstream)
    result["fwd_bwd_ms"] = guarded(lambda: bench_ms(forward_backward, device, warmup_ms, rep_ms), device)
    result["fwd_bwd_memory"] = guarded(lambda: peak_memory_mib(forward_backward, device), device)
    return result


def measure_graphs(build: Callable[[], Run], device: torch.device, rep_ms: float) -> dict[str, Measured]:
    """Forward and forward+backward of one column replayed from CUDA graphs; failures become strings."""
    calls = column_calls(build, device)
    if isinstance(calls, str):
        return dict.fromkeys(GRAPH_MEASUREMENTS, calls)
    forward, with_backward = calls
    result = {"fwd_graph_ms": guarded(lambda: bench_graph_ms(forward, device, rep_ms), device)}
    upstream = guarded(lambda: torch.randn_like(forward()), device)
    if isinstance(upstream, str):
        return dict(result, fwd_bwd_graph_ms=upstream)
    result["fwd_bwd_graph_ms"] = guarded(lambda: bench_graph_ms(with_backward(upstream), device, rep_ms), device)
    return result


def minimal_bytes(shape: AttentionShape, batch: int, length: int, element_size: int) -> dict[str, int]:
    """Bytes the op must move at least: each input read once, each output written once.

    Forward: q, k, v, fq, fk in and o out. Backward adds do in and dq, dk, dv, dfq, dfk out: the same
    tensor sizes again, so forward+backward moves twice the forward bytes (gamma's H values ignored).
    """
    tokens = batch * length
    q_or_o = tokens * shape.heads * shape.head_dim
    k_or_v = tokens * shape.kv_heads * shape.head_dim
    feature = tokens * shape.heads * shape.features
    forward = element_size * (2 * q_or_o + 2 * k_or_v + 2 * feature)
    return {"fwd": forward, "fwd_bwd": 2 * forward}


def goals(columns: dict[str, dict[str, Measured]], moved: dict[str, int], copy_tb_s: float) -> dict[str, Any]:
    """Ours vs fla, vs the reference and vs flash softmax (speedup = their time / ours), and bandwidth."""
    ours, ours_fm = columns["triton_attention"], columns["triton_with_feature_maps"]
    out: dict[str, Any] = {}
    for mode in ("fwd", "fwd_bwd"):
        key = f"{mode}_ms"
        out[f"speedup_vs_fla_{mode}"] = ratio(columns["fla_chunk_linear_attn"][key], ours[key])
        graph_key = f"{mode}_graph_ms"
        out[f"speedup_vs_fla_{mode}_graph"] = ratio(columns["fla_chunk_linear_attn"][graph_key], ours[graph_key])
        out[f"speedup_vs_reference_{mode}"] = ratio(columns["torch_attention"][key], ours[key])
        out[f"speedup_vs_reference_with_feature_maps_{mode}"] = ratio(columns["torch_with_feature_maps"][key],
                                                                      ours_fm[key])
        out[f"speedup_vs_sdpa_flash_{mode}"] = ratio(columns["sdpa_flash"][key], ours[key])
        seconds = ours[key] / 1000 if isinstance(ours[key], float) else None
        tb_s = moved[mode] / seconds / 1e12 if seconds else None
        out[f"bandwidth_{mode}_tb_s"] = None if tb_s is None else round(tb_s, 3)
        out[f"bandwidth_{mode}_of_copy"] = None if tb_s is None else round(tb_s / copy_tb_s, 3)
    return out


SKIPPED = "skipped: not chosen with --columns, or the triton backend on CPU without TRITON_INTERPRET=1"


def runnable_columns(device: torch.device, names: list[str]) -> list[Column]:
    """The chosen columns; on CPU the Triton ones only if the interpreter can run them.

    On CUDA a missing Triton backend is not skipped: its columns record the error.
    """
    triton_ok = device.type == "cuda" or triton_runs_on(device)
    return [c for c in COLUMNS if c.name in names and (triton_ok or c.backend != "triton")]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384, 32768])
    parser.add_argument("--tokens", type=int, default=32768, help="B*T of every case")
    parser.add_argument("--columns", nargs="+", choices=[c.name for c in COLUMNS], default=[c.name for c in COLUMNS])
    parser.add_argument("--window", default="terrace", help="window kind of our columns")
    parser.add_argument("--warmup-ms", type=float, default=25)
    parser.add_argument("--rep-ms", type=float, default=100)
    parser.add_argument("--cuda-graphs", action="store_true", help="also time every column replayed from a CUDA graph")
    parser.add_argument("--out", help="results folder (default: benchmarks/<this GPU>, e.g. benchmarks/h200)")
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 shapes on CPU")
    args = parser.parse_args()
    if args.smoke:
        args.shapes, args.lengths, args.tokens, args.rep_ms = list(SMOKE_SHAPES), [128, 256], 512, 20
    return args


def main() -> None:
    args = parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shapes = {**SHAPES, **SMOKE_SHAPES}
    columns = runnable_columns(device, args.columns)
    copy_tb_s = copy_bandwidth_tb_s(device, size_mib=64 if args.smoke else 2048)
    rows = []
    for shape_name in args.shapes:
        shape = shapes[shape_name]
        for length in args.lengths:
            batch = args.tokens // length
            torch.manual_seed(0)
            x = random_inputs(shape, batch, length, dtype, device)
            measured = {c.name: measure(lambda c=c: c.build(x, shape, args.window), device, args.warmup_ms,
                                        args.rep_ms) if c in columns else dict.fromkeys(MEASUREMENTS, SKIPPED)
                        for c in COLUMNS}
            moved = minimal_bytes(shape, batch, length, x.q.element_size())
            rows.append({"shape": shape_name, **shape.__dict__, "batch": batch, "length": length,
                         "columns": measured, "minimal_bytes": moved, "goals": goals(measured, moved, copy_tb_s)})
            del x
            release_memory(device)
            print(f"done {shape_name} T={length}", flush=True)
            path = write_result(results_dir(args.out, device), "gpu_attention", report(args, device, dtype, copy_tb_s, rows))  # so far
    if args.cuda_graphs:  # last: the graphs' memory pools stay allocated and would shift later peaks
        for row in rows:
            shape = shapes[row["shape"]]
            torch.manual_seed(0)
            x = random_inputs(shape, row["batch"], row["length"], dtype, device)
            for c in columns:
                row["columns"][c.name].update(measure_graphs(lambda c=c: c.build(x, shape, args.window), device,
                                                             args.rep_ms))
            row["goals"] = goals(row["columns"], row["minimal_bytes"], copy_tb_s)
            del x
            release_memory(device)
            print(f"graphs done {row['shape']} T={row['length']}", flush=True)
            path = write_result(results_dir(args.out, device), "gpu_attention", report(args, device, dtype, copy_tb_s, rows))

    print(f"wrote {path}; copy bandwidth {copy_tb_s:.2f} TB/s")
    print(summary(rows, args.cuda_graphs))


def report(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, copy_tb_s: float,
           rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON document: written after every case, so a run cut short keeps what it measured."""
    return {
        "environment": environment(device, extra_modules=("fla",)),
        "fla_import_error": FLA_ERROR,
        "settings": {"dtype": str(dtype), "window": args.window, "window_size": WINDOW_SIZE, "tokens": args.tokens,
                     "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms,
                     "timing": "median of triton.testing.do_bench (L2 flushed before each call); fwd under "
                               "no_grad, fwd_bwd = output + torch.autograd.grad w.r.t. the column's inputs",
                     "graph_timing": "fwd_graph_ms, fwd_bwd_graph_ms (--cuda-graphs): median of "
                                     "triton.testing.do_bench_cudagraph, the same calls replayed from a CUDA "
                                     "graph: no host launch overhead, no L2 flush",
                     "memory": "torch.cuda.max_memory_allocated after reset_peak_memory_stats, one call; "
                               "above_start_mib excludes what was allocated before (inputs)"},
        "columns": {c.name: c.measures for c in COLUMNS},
        "copy_bandwidth_tb_s": round(copy_tb_s, 3),
        "results": rows,
    }


def summary(rows: list[dict[str, Any]], graphs: bool) -> str:
    """Two tables, one line per (shape, T): ms per column (fwd, fwd+bwd); our speedups, bandwidth, memory
    (with `graphs`, also the CUDA-graph times of fla and ours and those speedups)."""
    short = {"sdpa_flash": "sdpa", "fla_chunk_linear_attn": "fla", "torch_attention": "ref",
             "triton_attention": "ours", "torch_with_feature_maps": "ref+fm", "triton_with_feature_maps": "ours+fm"}
    times, goal_lines = [], []
    for row in rows:
        case = {"shape": row["shape"], "T": row["length"], "B": row["batch"]}
        columns, g = row["columns"], row["goals"]
        line = dict(case)
        for name, label in short.items():
            line[f"{label} fwd"] = columns[name]["fwd_ms"]
            line[f"{label} f+b"] = columns[name]["fwd_bwd_ms"]
        g_graph = {}
        if graphs:
            for name in ("fla_chunk_linear_attn", "triton_attention"):
                line[f"{short[name]} f+b graph"] = columns[name]["fwd_bwd_graph_ms"]
            g_graph = {"xfla fwd graph": g["speedup_vs_fla_fwd_graph"],
                       "xfla f+b graph": g["speedup_vs_fla_fwd_bwd_graph"]}
        times.append(line)
        goal_lines.append({**case, "xfla fwd": g["speedup_vs_fla_fwd"], "xfla f+b": g["speedup_vs_fla_fwd_bwd"],
                           "xref fwd": g["speedup_vs_reference_fwd"], "xref f+b": g["speedup_vs_reference_fwd_bwd"],
                           "xref+fm f+b": g["speedup_vs_reference_with_feature_maps_fwd_bwd"],
                           "xsdpa f+b": g["speedup_vs_sdpa_flash_fwd_bwd"], "TB/s fwd": g["bandwidth_fwd_tb_s"],
                           "TB/s f+b": g["bandwidth_fwd_bwd_tb_s"], "of copy f+b": g["bandwidth_fwd_bwd_of_copy"],
                           "ours MiB f+b": peak(columns["triton_attention"]["fwd_bwd_memory"]),
                           "ref MiB f+b": peak(columns["torch_attention"]["fwd_bwd_memory"]), **g_graph})
    return format_table(times, list(times[0])) + "\n\n" + format_table(goal_lines, list(goal_lines[0]))


def peak(memory: Measured) -> Measured:
    """The peak MiB of a memory measurement, or why there is none."""
    return memory["peak_mib"] if isinstance(memory, dict) else memory


if __name__ == "__main__":
    main()
