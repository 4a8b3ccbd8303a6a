"""What "close" means for every fast-vs-reference comparison: the tests' and the GPU benchmarks' checks.

One tolerance table and one error measure, relative RMS error ||x - ref|| / ||ref||, so a CPU test
and a GPU check cannot disagree on either (as fla keeps its in fla/utils/_testing.py). Only torch is
imported: the benchmark scripts import this on a bare GPU image without pytest or the pipeline's
packages.
"""
import torch

# Relative RMS error allowed per dtype. fp32: paths differ only in summation order; a real bug shows as
# an error of order 1. bf16: inputs, dot operands and outputs carry 8 mantissa bits (~4e-3 per value).
# The GPU checks (benchmarks/gpu_attention_check.py, gpu_feature_map.py, gpu_decode.py) hold the same
# 1.6e-2 as the CPU tests, not a looser 2e-2 of their own: the worst bf16 error measured on an H200 was
# 4.9e-3 (dfq, phi3-mini, T 32768; benchmarks/h200/head-dims).
TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# dgamma sums B*T*w terms of both signs per head: in fp32 the summation order alone moves it by ~1e-4.
SEQUENCE_SUM_TOLERANCE = 1e-3
# Absolute RMS floor: a gradient that is exactly zero in theory (gamma when no key is linear)
# comes out as rounding noise on both sides, which no relative test can compare.
ABSOLUTE_FLOOR = 1e-5


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| (= relative RMS error) in fp64; ||x|| where ref is exactly zero (an input
    that cannot reach the output), so an exact zero is not divided by."""
    difference, size = (x.double() - ref.double()).norm(), ref.double().norm()
    return (difference / size if size > 0 else difference).item()


def tolerances_by_name() -> dict[str, float]:
    """The table keyed by dtype name ("torch.bfloat16"), as the benchmark JSONs write it."""
    return {str(dtype): ratio for dtype, ratio in TOLERANCE.items()}


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, ratio: float | None = None) -> None:
    """got matches ref in shape, is finite, and is within `ratio` (default: the fp32 tolerance) of it by
    relative RMS error, or within ABSOLUTE_FLOOR by RMS error."""
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    ratio = TOLERANCE[torch.float32] if ratio is None else ratio
    error = relative_error(got, ref)
    rms_difference = (got.double() - ref.double()).pow(2).mean().sqrt().item()
    assert error <= ratio or rms_difference <= ABSOLUTE_FLOOR, f"{name}: relative RMS error {error:.3e} > {ratio:.1e}"
