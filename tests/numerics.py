"""Comparing a result with a reference in tests: relative error against the reference's largest magnitude."""

from __future__ import annotations

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "output") -> None:
    """Max abs error relative to the largest expected magnitude; on failure name the worst element."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not actual.isnan().any(), f"{what}: contains NaN"
    err = (actual.double() - expected.double()).abs()
    rel = err.max().item() / max(expected.abs().max().item(), 1e-30)
    if rel > tol:
        worst = tuple(i.item() for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{what}: relative error {rel:.2e} > {tol:.0e}; worst at {worst}: "
            f"{actual[worst].item():.8g} vs {expected[worst].item():.8g}"
        )
