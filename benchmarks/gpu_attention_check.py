"""The Triton hybrid attention at real shapes and lengths vs the PyTorch reference in fp32: values and grads.

Usage (repo root): python -m benchmarks.gpu_attention_check [--shapes ...] [--lengths 1000 4096 32768]
    [--out DIR] [--smoke]
Each case draws fresh inputs (Hedgehog features of random q and repeated k through random maps, so
fq, fk are positive like a real layer's; gamma = sigmoid(N(-2, 0.5))), runs the kernel on them in
the case's dtype and the reference (backend "torch") on the same values upcast to fp32, both fed one
upstream gradient, and compares o, dq, dk, dv, dfq, dfk, dgamma by ||x - ref|| / ||ref||. Before the
kernel runs, the CUDA caching allocator is filled with NaN, so a result the kernel forgets to write
shows up as NaN. Writes <out>/gpu_attention_check.json, prints a table last, exits 1 if any case fails.
--smoke: tiny fp32 cases on CPU (the Triton backend through TRITON_INTERPRET=1, else torch vs itself).
"""
import argparse
import sys
import zlib
from dataclasses import dataclass

import torch

from kernels.hybrid_attention import hybrid_attention
from kernels.testing import TOLERANCE, relative_error, tolerances_by_name

from .attention_inputs import SHAPES, SMOKE_SHAPES, WINDOW_SIZE, HybridInputs, random_inputs, \
    triton_runs_on
from .gpu_common import results_dir, environment, format_table, guarded, release_memory, write_result

TENSORS = ("o", "dq", "dk", "dv", "dfq", "dfk", "dgamma")
WINDOWS = ("sliding", "terrace")
TOKENS_PER_CASE = 8192  # B = max(1, this / T): several sequences at short T, one at 32K


@dataclass(frozen=True)
class Case:
    shape: str
    window: str
    dtype: torch.dtype
    batch: int
    length: int

    @property
    def name(self) -> str:
        return f"{self.shape}-{self.window}-{str(self.dtype).removeprefix('torch.')}-B{self.batch}-T{self.length}"


def cases(shapes: list[str], lengths: list[int], small_lengths: list[int], smoke: bool) -> list[Case]:
    """bf16 at every (shape, window, length) on CUDA; fp32 at small lengths on CPU (--smoke) only: on CUDA
    the triton backend refuses fp32 (its dots would run in tf32), so there is no fp32 kernel to check."""
    out = []
    for shape in shapes:
        for window in WINDOWS:
            if smoke:
                out += [Case(shape, window, torch.float32, 2, t) for t in small_lengths]
            else:
                out += [Case(shape, window, torch.bfloat16, max(1, TOKENS_PER_CASE // t), t) for t in lengths]
    return out


def poison_cached_memory(device: torch.device, gib: float) -> None:
    """Leave `gib` of NaN-filled blocks in the caching allocator: later empty tensors start as NaN."""
    if device.type != "cuda" or gib <= 0:
        return
    free, _ = torch.cuda.mem_get_info(device)
    size = min(int(gib * 2**30), free // 2)
    torch.full((size // 4,), float("nan"), dtype=torch.float32, device=device)  # freed at once, stays cached


def output_and_grads(x: HybridInputs, upstream: torch.Tensor, window: str, backend: str) -> list[torch.Tensor]:
    """[o, dq, dk, dv, dfq, dfk, dgamma] of one backend."""
    o = hybrid_attention(x.q, x.k, x.v, x.fq, x.fk, x.gamma, WINDOW_SIZE, window, x.scale, backend)
    grads = torch.autograd.grad(o, x.leaves(), upstream)
    return [o.detach(), *grads]


def check(case: Case, candidate: str, device: torch.device, poison_gib: float) -> dict:
    """Errors of the candidate backend per tensor, the dtype's rounding floor, finiteness, verdict."""
    shape = {**SHAPES, **SMOKE_SHAPES}[case.shape]
    torch.manual_seed(zlib.crc32(case.name.encode()))  # fixed per case, fresh across cases
    x = random_inputs(shape, case.batch, case.length, case.dtype, device)
    upstream = torch.randn_like(x.q)
    poison_cached_memory(device, poison_gib)
    ours = output_and_grads(x, upstream, case.window, candidate)
    reference = output_and_grads(x.converted(torch.float32), upstream.float(), case.window, "torch")
    tolerance = TOLERANCE[case.dtype]  # the CPU tests' bound, no looser one on the GPU (kernels/testing.py)
    errors = {n: relative_error(a, r) for n, a, r in zip(TENSORS, ours, reference)}
    # what rounding the exact result to the case's dtype alone costs (gamma's grad stays fp32)
    floors = {n: relative_error(r.to(a.dtype), r) for n, a, r in zip(TENSORS, ours, reference)}
    finite = {n: bool(torch.isfinite(a).all()) for n, a in zip(TENSORS, ours)}
    passed = all(finite.values()) and all(e <= tolerance for e in errors.values())
    return {"case": case.name, "shape": case.shape, "window": case.window, "dtype": str(case.dtype),
            "batch": case.batch, "length": case.length, "tolerance": tolerance, "relative_error": errors,
            "rounding_floor": floors, "finite": finite, "passed": passed}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--lengths", nargs="+", type=int, default=[1000, 4096, 32768], help="bf16 cases")
    parser.add_argument("--small-lengths", nargs="*", type=int, default=[150, 256], help="fp32 cases (--smoke)")
    parser.add_argument("--poison-gib", type=float, default=8.0)
    parser.add_argument("--out", help="results folder (default: benchmarks/<this GPU>, e.g. benchmarks/h200)")
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 cases on CPU")
    args = parser.parse_args()
    if args.smoke:
        args.shapes = list(SMOKE_SHAPES)  # the small lengths leave linear keys in both windows
    return args


def main() -> None:
    args = parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    candidate = "triton" if device.type == "cuda" or triton_runs_on(device) else "torch"
    rows = []
    for case in cases(args.shapes, args.lengths, args.small_lengths, args.smoke):
        result = guarded(lambda: check(case, candidate, device, args.poison_gib), device)
        if isinstance(result, str):  # OOM or a failing kernel: a failed case, not a crashed script
            result = {"case": case.name, "error": result, "passed": False}
        rows.append(result)
        release_memory(device)
        print(f"{'ok  ' if result['passed'] else 'FAIL'} {case.name}", flush=True)

    failed = [r["case"] for r in rows if not r["passed"]]
    path = write_result(results_dir(args.out, device), "gpu_attention_check", {
        "environment": environment(device),
        "candidate": candidate, "reference": "backend 'torch' on the candidate's inputs upcast to fp32",
        "metric": "||x - ref|| / ||ref|| per tensor (relative RMS error; ||x|| where ref is exactly 0)",
        "tolerances": tolerances_by_name(),
        "tolerance_notes": "kernels.testing.TOLERANCE, the CPU tests' table; bf16: inputs, dot operands and "
                           "outputs in bf16; fp32 runs only in --smoke (CPU)",
        "poison": f"caching allocator filled with NaN ({args.poison_gib} GiB) before each kernel call; "
                  "every output and grad must be finite",
        "window_size": WINDOW_SIZE, "passed": not failed, "failed": failed, "cases": rows,
    })
    print(f"wrote {path}")
    print(summary(rows))
    sys.exit(1 if failed else 0)


def summary(rows: list[dict]) -> str:
    table = []
    for row in rows:
        line = {"case": row["case"], "pass": "yes" if row["passed"] else "NO"}
        if "error" in row:
            line["error"] = row["error"].removeprefix("error: ")[:60]
        else:
            line.update({"tol": row["tolerance"], **row["relative_error"],
                         "nan": "none" if all(row["finite"].values()) else "YES"})
        table.append(line)
    columns = ["case", "pass", "tol", *TENSORS, "nan", "error"]
    return format_table(table, [c for c in columns if any(c in line for line in table)])


if __name__ == "__main__":
    main()
