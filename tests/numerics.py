"""Comparing a result with a reference in tests: one tolerance table, one relative error, one assert_close."""

from __future__ import annotations

import torch

from archgen.testing import relative_error

__all__ = ["TOLERANCE", "assert_close", "relative_error", "relative_norm_error"]

# Worst relative error allowed, max|actual - expected| / max|expected|, by the dtype the result was computed in.
# float32: a few roundings (2**-24 = 6e-8 each) amplified by sums over short sequences; bfloat16 has 8 significant
# bits (one rounding is 2**-8 = 3.9e-3), float16 11 (4.9e-4), each compounded over a handful of operations.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float | None = None, what: str = "output") -> None:
    """Fail unless relative_error(actual, expected) <= tol (default TOLERANCE[actual.dtype]); name the worst element."""
    tol = TOLERANCE[actual.dtype] if tol is None else tol
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: {(~torch.isfinite(actual)).sum().item()} non-finite values"
    error = relative_error(actual, expected)
    if error > tol:
        diff = (actual.double() - expected.double()).abs()
        worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(f"{what}: relative error {error:.2e} > {tol:.0e}; worst at {worst}: "
                             f"got {actual[worst].item():.8g}, expected {expected[worst].item():.8g}")


def relative_norm_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64: the kernel issues' "relative norm" (bf16 bar 1e-2), which a few
    large elements cannot dominate the way they do max-based relative_error. Fails on a shape mismatch or a NaN."""
    assert actual.shape == expected.shape, f"{tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not actual.isnan().any(), "NaN in the result"
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()
