"""What every GPU benchmark script here shares: timing, peak memory, copy bandwidth, guarded runs, results.

Timings are medians of `triton.testing.do_bench`, which zeroes a 256 MB buffer before every timed
call, so each call starts with a cold L2 cache (50 MB on an H100) and reused inputs do not flatter
it. On CPU (the scripts' --smoke mode) a `perf_counter` median stands in, so the scripts can be
checked on a machine without a GPU. A measurement that runs out of memory, or fails in any other
way, becomes a short string in the results ("OOM", "error: ...") instead of ending the script.
"""
import gc
import importlib
import platform
import re
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.io import atomic_write_json

MIB = 2**20

Measured = float | dict[str, float] | str | None  # a value, or why there is none ("OOM", "error: ...")


def command_line() -> str:
    """The command that ran, as `<python> -m benchmarks.<script> <args>` (scripts run as modules)."""
    module = "benchmarks." + Path(sys.argv[0]).stem
    return " ".join([Path(sys.executable).name, "-m", module, *map(shlex.quote, sys.argv[1:])])


def module_version(name: str) -> str:
    """`__version__` of an importable module, else why not (fla may be absent or broken)."""
    try:
        return getattr(importlib.import_module(name), "__version__", "unknown")
    except Exception as error:  # noqa: BLE001 - any import failure is a fact to record
        return f"not importable: {type(error).__name__}: {error}"


def environment(device: torch.device, extra_modules: Sequence[str] = ()) -> dict[str, Any]:
    """The machine and the versions that produced a result."""
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda}
    for name in ("triton", "transformers", *extra_modules):
        env[name] = module_version(name)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = props.name
        env["capability"] = f"{props.major}.{props.minor}"
        env["memory_gib"] = round(props.total_memory / 2**30, 1)
        env["multiprocessors"] = props.multi_processor_count
    else:
        env["device"] = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    return env


def device_slug(device: torch.device) -> str:
    """The short name results are filed under: "h200" for "NVIDIA H200", "h100" for "NVIDIA H100 80GB
    HBM3", "cpu" for the --smoke runs."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).removeprefix("NVIDIA ").strip()
    return re.sub(r"[^a-z0-9]+", "-", name.split()[0].lower()).strip("-")


def results_dir(out: str | None, device: torch.device) -> Path:
    """--out when given, else benchmarks/<device slug>: a result is named after the device it ran on."""
    return Path(out) if out is not None else Path(__file__).parent / device_slug(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(fn: Callable[[], Any], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of one call of `fn` in milliseconds (do_bench on CUDA, perf_counter on CPU)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()  # warm-up
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def wall_ms(fn: Callable[[], Any], device: torch.device, calls: int = 200, wait: bool = False) -> float:
    """Host-clock time per call over back-to-back calls (what a CPU-bound decode loop sees); `wait`: the
    host waits for the device after every call, so nothing of one call overlaps the next."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
        if wait:
            synchronize(device)
    synchronize(device)
    return (time.perf_counter() - start) * 1000 / calls


def bench_graph_ms(fn: Callable[[], Any], device: torch.device, rep_ms: float = 100) -> Measured:
    """Median time of one call of `fn` replayed from a CUDA graph (`triton.testing.do_bench_cudagraph`):
    the device's time without the host's launch overhead, and without an L2 flush between calls.
    Where a step is cheaper on the device than its launches are on the host (small shapes),
    `bench_ms` measures the host; this measures the kernels. CPU has no graphs: a string says so."""
    if device.type != "cuda":
        return "skipped: CUDA graphs need a GPU"
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> dict[str, float] | None:
    """Peak allocated memory of one call: absolute, and above what was allocated before (inputs etc.).

    None on CPU, where the caching allocator's statistics do not exist.
    """
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return {"peak_mib": round(peak / MIB, 1), "above_start_mib": round((peak - before) / MIB, 1)}


def release_memory(device: torch.device) -> None:
    """Drop cached blocks between measurements so one column's leftovers cannot OOM the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(fn: Callable[[], Measured], device: torch.device) -> Measured:
    """fn(), or "OOM" / "error: ..." when it fails; the traceback goes to stderr for the log."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        release_memory(device)
        return "OOM"
    except Exception as error:  # noqa: BLE001 - one failing column must not cost the others
        traceback.print_exc(file=sys.stderr)
        release_memory(device)
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        return f"error: {type(error).__name__}: {first_line}"


def copy_bandwidth_tb_s(device: torch.device, size_mib: int = 2048) -> float:
    """Device-to-device copy bandwidth, counting each byte read and each byte written."""
    src = torch.empty(size_mib * MIB, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() / (ms / 1000) / 1e12


def ratio(numerator: Measured, denominator: Measured) -> float | None:
    """numerator / denominator when both are numbers (a failed measurement gives None)."""
    if isinstance(numerator, (int, float)) and isinstance(denominator, (int, float)) and denominator > 0:
        return round(numerator / denominator, 3)
    return None


def write_result(out_dir: Path, script: str, result: dict[str, Any]) -> Path:
    """`<out_dir>/<script>.json`, written atomically, with the command line first."""
    path = Path(out_dir) / f"{script}.json"
    atomic_write_json(path, {"command": command_line(), **result})
    return path


def format_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.2f}"
    if isinstance(value, str) and value.startswith(("error:", "skipped:")):
        return value.split(":")[0]  # the reason is in the JSON; the table only says there is no number
    return "-" if value is None else str(value)


def format_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain fixed-width table of `columns` over `rows` (missing cells show as '-')."""
    cells = [[format_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)
