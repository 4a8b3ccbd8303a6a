"""The decode step's tile and warp counts (`_state_kernel`, `_window_kernel`), side by side, at batch 1 and in batch.

Usage (repo root): python -m benchmarks.gpu_decode_tiles [--batches 1 64] [--kernels state window]
    [--tiles 32 64 128] [--warps 4 8 16] [--window-tiles 4 8 16] [--window-warps 4 8 16] [--window-heads 1 4]
    [--window terrace] [--variants maps_in_kernel maps_given window_only] [--out DIR] [--smoke]
One Llama-3-8B-shaped layer (H 32, Hkv 8, D 128, Hedgehog 64 -> F 128, window 64) after a 4K prompt,
the Hedgehog maps applied by the step (`HedgehogMaps`), as a HybridCache decode step runs it. Per
batch, --kernels `state` (S columns per program --tiles x --warps) and `window` (head-dim columns per
loop step --window-tiles x --warps of `_window_kernel`, taken as given, while its default is capped by a
register budget; --window-heads query heads per program, by default its rule by batch; the row gives
the tile and heads it ran), the other kernel at its defaults: the step replayed from a CUDA graph
(device time, no launch overhead), ms, and its output's largest difference from the default
configuration's (the same step from the same state: tiles change the order of fp32 sums only). `bytes_floor_ms` is the state
and ring bytes the step must read and write (`state_bytes`) over the copy bandwidth measured in the run.
--variants times parts of the step, to place its time: `maps_in_kernel` (the step as HybridCache runs it),
`maps_given` (fq, fk computed beforehand and read by the step: the Hedgehog maps' share) and
`window_only` (no linear branch: neither maps nor S, z). Each variant's max_abs_diff is against its own
default tile and warps.
Writes <out>/gpu_decode_tiles.json. --smoke: tiny fp32 shapes on CPU, no timings (the kernel runs there
under TRITON_INTERPRET=1 only; without it each batch says it was skipped).
"""
import argparse
from typing import Any

import torch

from kernels.hybrid_attention import RingState, fill_ring_state, ring_size
from kernels.hybrid_attention.decode_maps import HedgehogMaps
from kernels.hybrid_attention.fused_recurrent import StepTiles, _decode_step_fwd, launches
from kernels.hybrid_attention.kernel_windows import kernel_code
from pipeline.hybrid.feature_maps import PHI_EPS, HedgehogFeatureMap

from .attention_inputs import SHAPES, SMOKE_SHAPES, WINDOW_SIZE, AttentionShape, triton_runs_on
from .gpu_common import bench_graph_ms, copy_bandwidth_tb_s, environment, format_table, guarded, results_dir, \
    write_result

PROMPT = 4096 + 7  # not a block boundary: every replay computes the same step from the same state


def layer(shape: AttentionShape, batch: int, window: str, dtype: torch.dtype, device: torch.device):
    """A state after PROMPT tokens, one token's q, k, v, gamma and the maps."""
    H, Hkv, D, F = shape.heads, shape.kv_heads, shape.head_dim, shape.features
    maps = [HedgehogFeatureMap(H, D, shape.feature_dim, "kaiming").to(device) for _ in range(2)]
    state = RingState.empty(batch, H, Hkv, D, F, ring_size(WINDOW_SIZE, window), device=device, dtype=dtype)
    tail = 2 * WINDOW_SIZE  # only the last keys reach the ring; S and z get random positive values
    k, v = (torch.randn(batch, Hkv, tail, D, device=device, dtype=dtype) for _ in range(2))
    with torch.no_grad():
        fk = maps[1](k.repeat_interleave(H // Hkv, dim=1))
        fill_ring_state(state, torch.arange(batch, device=device), k, v, fk, WINDOW_SIZE, window)
        state.kv_state.uniform_(0, 1)
        state.k_state.uniform_(1, 2)
        state.positions.fill_(PROMPT)
    q = torch.randn(batch, H, D, device=device, dtype=dtype)
    k_new, v_new = (torch.randn(batch, Hkv, D, device=device, dtype=dtype) for _ in range(2))
    gamma = torch.rand(H, device=device) * 0.8 + 0.1
    return state, (q, k_new, v_new, None, None, gamma), HedgehogMaps(maps[0].weight.detach(), maps[1].weight.detach(),
                                                                      PHI_EPS)


def state_bytes(state: RingState, batch: int, shape: AttentionShape, window: str) -> int:
    """What one step must move: S and z read (and written when keys leave: every step for sliding
    windows, once a block for terrace ones), the window of keys and values read."""
    writes = 1.0 if window == "sliding" else 1 / WINDOW_SIZE
    S = state.kv_state.nbytes * (1 + writes)
    keys_values = 2 * batch * shape.kv_heads * WINDOW_SIZE * shape.head_dim * state.ring_k.element_size()
    return int(S + state.k_state.nbytes * (1 + writes) + keys_values)


VARIANTS = ("maps_in_kernel", "maps_given", "window_only")


def variant_inputs(variant: str, args: tuple, maps: HedgehogMaps) -> tuple[tuple, HedgehogMaps | None]:
    """The kernel's (q, k, v, fq, fk, gamma) and hedgehog arguments for one variant of the step;
    maps_in_kernel's gamma is the window factors (logits), whose sigmoid the kernel takes."""
    q, k, v, _, _, gamma = args
    if variant == "maps_in_kernel":
        return (q, k, v, None, None, torch.logit(gamma)), maps
    if variant == "window_only":
        return args, None
    fq, fk = (hedgehog(w, x) for w, x in ((maps.weight_q, q), (maps.weight_k, k)))
    return (q, k, v, fq, fk, gamma), None


def hedgehog(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """phi [B,H,F] of x [B,Hx,D] under the Hedgehog map of weight [H,D,F/2] (the PyTorch module)."""
    feature_map = HedgehogFeatureMap(*weight.shape, "kaiming").to(weight.device)
    feature_map.weight.data = weight
    with torch.no_grad():
        return feature_map.grouped(x[:, :, None], fused=False)[:, :, 0]


def configurations(kernel: str, tiles: list[int], warps: list[int], heads: list[int | None] = (None,)
                   ) -> list[StepTiles]:
    """The swept kernel's (tile, warps) pairs (the window kernel's for each heads per program; None: its
    rule), the other kernel at its defaults."""
    if kernel == "state":
        return [StepTiles(state_tile=tile, state_warps=warp) for tile in tiles for warp in warps]
    return [StepTiles(window_tile=tile, window_warps=warp, window_heads=head)
            for head in heads for tile in tiles for warp in warps]


def sweep(shape: AttentionShape, batch: int, window: str, kernel: str, configs: list[StepTiles], dtype: torch.dtype,
          device: torch.device, variant: str = "maps_in_kernel") -> list[dict[str, Any]]:
    if not triton_runs_on(device):
        return [{"batch": batch, "skipped": "the Triton kernel needs CUDA, or TRITON_INTERPRET=1 on the CPU"}]
    state, args, maps = layer(shape, batch, window, dtype, device)
    args, maps = variant_inputs(variant, args, maps)
    logits = variant == "maps_in_kernel"
    kind, scale = kernel_code(window, "fused decode step"), shape.head_dim ** -0.5

    def step(tiles: StepTiles):
        fresh = RingState(*(t.clone() for t in state.tensors()))
        return _decode_step_fwd(fresh, *args, WINDOW_SIZE, kind, scale, maps, tiles, logits)

    def launch(tiles: StepTiles):
        plan = launches(batch, shape.heads, shape.kv_heads, shape.head_dim, state.kv_state.shape[2],
                        state.ring_k.shape[2], WINDOW_SIZE, kind, args[3] is not None or maps is not None,
                        maps is not None, True, tiles, logits)
        return plan.get(kernel)

    if launch(StepTiles()) is None:
        return [{"variant": variant, "batch": batch, "kernel": kernel, "skipped": f"the {variant} step has no {kernel} kernel"}]
    reference = step(StepTiles()).float()
    rows = []
    for tiles in configs:
        constexprs = launch(tiles).constexprs
        row: dict[str, Any] = {"variant": variant, "batch": batch, "kernel": kernel, "tile": constexprs["BV"],
                               "heads": constexprs.get("HP"), "num_warps": launch(tiles).num_warps,
                               "default": launch(tiles) == launch(StepTiles())}
        row["max_abs_diff"] = guarded(lambda: float((step(tiles).float() - reference).abs().max()), device)
        work = RingState(*(t.clone() for t in state.tensors()))
        row["ms"] = guarded(lambda: bench_graph_ms(
            lambda: _decode_step_fwd(work, *args, WINDOW_SIZE, kind, scale, maps, tiles, logits), device), device)
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--kernels", nargs="+", default=["state", "window"], choices=["state", "window"])
    parser.add_argument("--tiles", type=int, nargs="+", default=[32, 64, 128], help="state kernel: S columns")
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16], help="state kernel")
    parser.add_argument("--window-tiles", type=int, nargs="+", default=[4, 8, 16], help="window kernel: D columns")
    parser.add_argument("--window-warps", type=int, nargs="+", default=[4, 8, 16], help="window kernel")
    parser.add_argument("--window-heads", type=int, nargs="+", default=[None],
                        help="window kernel: query heads per program (default: its rule by batch)")
    parser.add_argument("--window", default="terrace", choices=["sliding", "terrace"])
    parser.add_argument("--variants", nargs="+", default=["maps_in_kernel"], choices=VARIANTS)
    parser.add_argument("--out", help="results folder (default: benchmarks/<this GPU>, e.g. benchmarks/h200)")
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 shapes on CPU")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shape = SMOKE_SHAPES["tiny"] if args.smoke else SHAPES["llama3-8b"]
    if args.smoke:
        args.batches, args.tiles, args.warps, args.window_tiles, args.window_warps = [1, 2], [16, 32], [4], [4, 16], [4]
        args.window_heads = [None, 1]
    torch.manual_seed(0)
    bandwidth = copy_bandwidth_tb_s(device) if device.type == "cuda" else None
    result: dict[str, Any] = {"environment": environment(device), "shape": vars(shape), "window": args.window,
                              "window_size": WINDOW_SIZE, "dtype": str(dtype), "copy_bandwidth_tb_s": bandwidth,
                              "defaults": vars(StepTiles()), "batches": {}}
    swept = {"state": configurations("state", args.tiles, args.warps),
             "window": configurations("window", args.window_tiles, args.window_warps, args.window_heads)}
    for batch in args.batches:
        rows = [row for variant in args.variants for kernel in args.kernels
                for row in sweep(shape, batch, args.window, kernel, swept[kernel], dtype, device, variant)]
        state, _, _ = layer(shape, batch, args.window, dtype, device)
        floor = state_bytes(state, batch, shape, args.window) / (bandwidth * 1e12) * 1e3 if bandwidth else None
        result["batches"][str(batch)] = {"bytes_floor_ms": floor, "rows": rows}
        write_result(results_dir(args.out, device), "gpu_decode_tiles", result)
    print("wrote", write_result(results_dir(args.out, device), "gpu_decode_tiles", result))
    print(format_table([r for b in result["batches"].values() for r in b["rows"]],
                       ["variant", "batch", "kernel", "tile", "heads", "num_warps", "default", "ms", "max_abs_diff"]))


if __name__ == "__main__":
    main()
