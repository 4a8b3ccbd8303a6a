"""One comparison for every fast-vs-reference check: relative RMS error, named, NaN-proof."""
import torch

# Relative RMS error allowed per dtype: fp32 paths differ only in summation order, which matters
# for gradients reduced over a whole sequence (dgamma); a real bug shows as an error of order 1.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Absolute RMS floor: a gradient that is exactly zero in theory (gamma when no key is linear)
# comes out as rounding noise on both sides, which no relative test can compare.
ABSOLUTE_FLOOR = 1e-5


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, ratio: float | None = None) -> None:
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    ref, got = ref.double(), got.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    ratio = TOLERANCE[torch.float32] if ratio is None else ratio
    diff = (ref - got).pow(2).mean().sqrt()
    err = diff / ref.pow(2).mean().sqrt().clamp(min=1e-30)
    assert err <= ratio or diff <= ABSOLUTE_FLOOR, f"{name}: relative RMS error {err:.3e} > {ratio:.1e}"
